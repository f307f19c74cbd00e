"""The built-in supervisor: an fd store and restarter for the serving processes.

    vhost-user-balloon --socket-path P ...      (standalone: supervised by default)
    vhost-user-balloon --guest a=P --guest b=Q  (one unit per guest + a manager)

The supervisor is a small parent process. It never maps guest memory and never
parses guest data: it only keeps fds. It runs one or more *units*: children, each
with its own notify socket (its $NOTIFY_SOCKET) and its own fd store, spoken with
systemd's protocol: FDSTORE=1 + FDNAME=name with fds attached stores them,
FDSTOREREMOVE=1 + FDNAME=name drops them. When a unit dies the supervisor logs
why and starts it again alone, with that unit's stored fds at 3, 4, ... and
LISTEN_FDS / LISTEN_FDNAMES / LISTEN_PID, exactly as systemd does: at once if
the dead one had served for STABLE_AFTER seconds after READY=1, else after a
back-off that grows to 5 s (a crash loop). Because it holds a copy of every fd
(the frontend's socket among them), QEMU never sees the connection close.

A single-guest daemon is one unit: the supervisor stops when it exits 0 (a clean
shutdown) or when it fails before it was ever ready (a configuration error).

A multi-guest daemon (--guest, --socket-dir) is one unit per guest (the serving
process restricted to that guest: --unit guest --only-guest NAME=PATH, its own
control socket CONTROL.NAME) and one manager unit (--unit manager: the main
control socket, metrics and the policy; no guest memory). A fault of one guest's
unit (SIGBUS, a crash, a hang caught by the watchdog) costs that guest one
restart and the others nothing. The manager adds and removes guest units at run
time with a notification from its own pid (VUB_ADD_GUEST=NAME + VUB_GUEST_PATH=PATH,
VUB_REMOVE_GUEST=NAME). A guest's unit starts only when its frontend comes: until
then the supervisor holds the guest's listening socket (created by hold_socket, kept
in that unit's store as the unit would keep it) and forks the unit once a connection
is pending; the unit takes the socket from the store and accepts it. A guest without
a frontend costs no process. With a watchdog (--unit-watchdog S) every unit pings
WATCHDOG=1; a unit silent for S seconds after it got ready is SIGKILLed and
restarted.

SIGTERM, SIGINT and SIGHUP are passed on to every unit. A unit that exits with
EXIT_UPGRADE is restarted at once (ctl upgrade).
"""

import array
import ctypes
import json
import logging
import os
import secrets
import select
import signal
import socket
import struct
import sys
import time

from .fdstore import fd_name, same_fd

log = logging.getLogger("vhost-user-balloon.supervisor")

EXIT_UPGRADE = 75          # the child asks to be replaced now (EX_TEMPFAIL)
MAX_FDS = 4096             # systemd's FileDescriptorStoreMax= upper bound in our unit
BACKOFF = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)
STABLE_AFTER = 1.0         # a child that served this long after READY=1 resets the back-off
STOP_TIMEOUT = 5.0         # a removed unit that does not stop after SIGTERM is SIGKILLed
_UCRED = struct.Struct("iII")
_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15


def _describe(status):
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"killed by {name}"
    return f"exited with status {os.WEXITSTATUS(status)}"


class Unit:
    """One supervised child: its command, notify socket, fd store, restarts."""

    def __init__(self, name, argv, env=None, guest=None):
        self.name = name
        self.argv = list(argv)
        self.env = dict(env or {})   # added to the supervisor's environment
        self.guest = guest           # (name, socket path) of a guest unit, else None
        self.store = []              # [name, fd] in the order they came
        self.child = None
        self.ready = False
        self.restarts = 0
        self.failures = 0
        self.ready_times = []        # monotonic time each child said READY=1
        self.started_at = 0.0
        self.start_at = 0.0          # when to (re)start it; None: not scheduled
        self.last_ping = None
        self.removed = False         # being removed: never restarted
        self.kill_at = None          # SIGKILL a removed unit that did not stop by then
        self.exec_only = False       # True: always exec the program (an upgrade asked so)
        self.socket_path = None      # a guest unit started on demand: its vhost-user socket
        self.control_path = None     # ... and its own control socket
        self.waiting = None          # the listening fd held while no frontend came, else None
        self.address = f"\0vub-supervisor-{os.getpid()}-{secrets.token_hex(8)}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(self.address)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.setblocking(False)

    def label(self):
        return "serving process" if self.name is None else f"unit {self.name}"


class Supervisor:
    def __init__(self, argv=None, env=None, units=None, watchdog=0.0, multi=False,
                 manager=None, unit_factory=None, hold_socket=None):
        self.env = dict(os.environ if env is None else env)
        for k in ("WATCHDOG_USEC", "WATCHDOG_PID"):
            self.env.pop(k, None)
        self.units = list(units) if units is not None else [Unit(None, argv)]
        self.watchdog = watchdog       # seconds; 0 = off
        self.multi = multi             # several units: one dying never stops the others
        self.manager = manager         # the unit allowed to add and remove guests
        self.unit_factory = unit_factory   # (name, path) -> Unit, for VUB_ADD_GUEST
        self.hold_socket = hold_socket     # path -> listening fd: start guest units on demand
        # start units by fork from this process (which has imported everything) instead
        # of exec: their code pages stay shared. Off after an upgrade (the new program
        # must be exec'd, and so must every later start).
        self.fork_units = multi
        self.stopping = False
        self.exit_code = None
        self._wake_r, self._wake_w = socket.socketpair()
        for s in (self._wake_r, self._wake_w):
            s.setblocking(False)

    # compatibility with the one-unit supervisor
    @property
    def unit(self):
        return self.units[0]

    @property
    def store(self):
        return self.unit.store

    def guest_units(self):
        return [u for u in self.units if u.guest is not None]

    # ---- the notify sockets ------------------------------------------------------

    def _drain(self, unit):
        while True:
            try:
                data, anc, flags, _ = unit.sock.recvmsg(
                    4096, socket.CMSG_SPACE(253 * 4) + socket.CMSG_SPACE(_UCRED.size))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            fds, pid = [], None
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(raw[:len(raw) - len(raw) % a.itemsize])
                    fds.extend(a)
                elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = _UCRED.unpack(raw[:_UCRED.size])[0]
            for fd in fds:
                os.set_inheritable(fd, False)
            if unit.child is None or pid != unit.child:
                log.warning("ignoring a notification from pid %s (not %s's process)", pid,
                            unit.label())
                self._close(fds)
                continue
            self._message(unit, data.decode(errors="replace"), fds)

    def _message(self, unit, text, fds):
        fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
        name = fields.get("FDNAME", "stored")
        if fields.get("FDSTORE") == "1":
            for fd in fds:
                if len(unit.store) >= MAX_FDS:
                    log.error("fd store of %s full (%d fds): dropping %s", unit.label(),
                              MAX_FDS, name)
                    self._close([fd])
                elif any(same_fd(fd, kept) for _, kept in unit.store):
                    self._close([fd])  # as systemd: an fd already in the store is not added
                else:
                    unit.store.append([name, fd])
            return
        self._close(fds)
        if fields.get("FDSTOREREMOVE") == "1":
            keep = []
            for n, fd in unit.store:
                if n == name:
                    self._close([fd])
                else:
                    keep.append([n, fd])
            unit.store = keep
        if fields.get("WATCHDOG") == "1":
            unit.last_ping = time.monotonic()
        if fields.get("READY") == "1" and not unit.ready:
            unit.ready = True
            unit.last_ping = time.monotonic()
            unit.ready_times.append(unit.last_ping)
            log.info("%s (pid %d) is ready (%d fds in its store)", unit.label(), unit.child,
                     len(unit.store))
        if unit is self.manager and not self.stopping:
            if "VUB_ADD_GUEST" in fields:
                self.add_guest(fields["VUB_ADD_GUEST"], fields.get("VUB_GUEST_PATH", ""))
            if "VUB_REMOVE_GUEST" in fields:
                self.remove_guest(fields["VUB_REMOVE_GUEST"])

    @staticmethod
    def _close(fds):
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    # ---- guests added and removed at run time -------------------------------------

    def current_guests(self):
        return [list(u.guest) for u in self.guest_units() if not u.removed]

    def add_guest(self, name, path):
        if self.unit_factory is None or not name or not path:
            log.warning("add-guest %r=%r ignored: not a multi-guest daemon or incomplete",
                        name, path)
            return
        if any(u.guest[0] == name for u in self.guest_units() if not u.removed):
            log.warning("add-guest %s: there is already a unit for that guest", name)
            return
        unit = self.unit_factory(name, path)
        log.info("adding guest %s on %s (%s)", name, path, unit.label())
        try:
            self._hold(unit)
        except Exception as e:   # noqa: BLE001 - the socket cannot be made: no unit
            log.error("add-guest %s: %s", name, e)
            unit.sock.close()
            return
        self.units.append(unit)
        if unit.waiting is None:
            self._spawn(unit)
        self._tell_manager()

    def remove_guest(self, name):
        for unit in self.guest_units():
            if unit.guest[0] == name and not unit.removed:
                log.info("removing guest %s: stopping %s", name, unit.label())
                unit.removed = True
                unit.start_at = None
                if unit.child is not None:
                    unit.kill_at = time.monotonic() + STOP_TIMEOUT
                    self._signal(unit, signal.SIGTERM)
                else:
                    self._forget(unit)
                self._tell_manager()
                return
        log.warning("remove-guest %s: no such guest", name)

    def _tell_manager(self):
        """The manager's guest list, for its next start (it changes at run time)."""
        if self.manager is not None:
            self.manager.env["VUB_UNIT_GUESTS"] = json.dumps(self.current_guests())

    def _hold(self, unit):
        """A guest unit with nothing in its store starts when its frontend comes: make its
        listening socket and keep it in the unit's store meanwhile."""
        if self.hold_socket is None or unit.socket_path is None or unit.store:
            return
        fd = self.hold_socket(unit.socket_path)
        if unit.control_path:
            _unlink(unit.control_path)   # no control socket: the manager shows "waiting"
        unit.store.append([fd_name(unit.guest[0], "listen"), fd])
        unit.waiting = fd
        unit.start_at = None
        log.info("%s: listening on %s; its process starts when its frontend connects",
                 unit.label(), unit.socket_path)

    def _forget(self, unit):
        """A removed unit is gone: drop its fds (its frontend sees the session end)."""
        if unit.waiting is not None:
            _unlink(unit.socket_path)    # never started: nobody else removes its socket
            unit.waiting = None
        self._close([fd for _, fd in unit.store])
        unit.store = []
        unit.sock.close()
        if unit in self.units:
            self.units.remove(unit)
        log.info("%s removed (its fds dropped from the store)", unit.label())

    # ---- the children ---------------------------------------------------------------

    def _spawn(self, unit):
        if unit.waiting is not None:
            log.info("%s: its frontend connected", unit.label())
            unit.waiting = None
        names = [n for n, _ in unit.store]
        fds = [fd for _, fd in unit.store]
        env = dict(self.env, **unit.env, NOTIFY_SOCKET="@" + unit.address[1:],
                   VUB_RESTARTS=str(unit.restarts),
                   LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=":".join(names))
        if self.watchdog:
            env["WATCHDOG_USEC"] = str(int(self.watchdog * 1e6))
        parent = os.getpid()
        if self.fork_units and unit.exec_only is False:
            pid = os.fork()
            if pid == 0:
                self._forked_child(unit, fds, env, parent)
        else:
            pid = os.fork()
        if pid == 0:  # child: only dup2/exec from here
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
                if os.getppid() != parent:
                    os._exit(1)
                signal.pthread_sigmask(signal.SIG_SETMASK, [])
                base = 3 + len(fds)
                high = [fcntl_dupfd(fd, base + 16) for fd in fds]
                for i, fd in enumerate(high):
                    os.dup2(fd, 3 + i, inheritable=True)
                os.closerange(base, 1 << 16)
                env["LISTEN_PID"] = str(os.getpid())
                if self.watchdog:
                    env["WATCHDOG_PID"] = str(os.getpid())
                os.execve(unit.argv[0], unit.argv, env)
            except BaseException:
                os._exit(127)
        unit.child = pid
        unit.ready = False
        unit.last_ping = None
        unit.start_at = None
        unit.started_at = time.monotonic()
        log.info("started %s: pid %d with %d stored fds", unit.label(), pid, len(fds))

    def _forked_child(self, unit, fds, env, parent):
        """A unit started without exec: this process already imported everything (the
        modules' pages stay shared with the supervisor and the other units, copy on
        write). Same fds and environment as an exec'd one; never returns."""
        code = 1
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:
                os._exit(1)
            title = ("vub-guests" if unit.name is None else "vub-manager" if unit.guest is None
                     else f"vub-guest-{unit.guest[0]}")
            libc.prctl(_PR_SET_NAME, title.encode()[:15], 0, 0, 0)   # ps, top: which unit
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            # the supervisor's sockets: their numbers are reused below, so no Python
            # object may close them later
            for other in self.units:
                if other.sock.fileno() >= 0:
                    other.sock.detach()
            self._wake_r.detach()
            self._wake_w.detach()
            base = 3 + len(fds)
            high = [fcntl_dupfd(fd, base + 16) for fd in fds]
            for i, fd in enumerate(high):
                os.dup2(fd, 3 + i, inheritable=False)
            os.closerange(base, 1 << 16)
            env["LISTEN_PID"] = str(os.getpid())
            if self.watchdog:
                env["WATCHDOG_PID"] = str(os.getpid())
            os.environ.clear()
            os.environ.update(env)
            from . import cli
            code = cli.main(unit.argv[3:], parser=self._parser)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            log.exception("%s failed", unit.label())
        finally:
            try:
                logging.shutdown()
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code if isinstance(code, int) else 1)

    def _warm_up(self):
        """Run what every guest's process runs first (its command line, its device) once
        here: the caches and specialised code that leaves behind are shared with every
        unit instead of made again in each."""
        unit = next((u for u in self.units if u.guest is not None), None)
        if unit is None:
            return
        try:
            from . import cli
            from .multi import make_device
            cfg = cli.config_from_args(self._parser.parse_args(unit.argv[3:]))
            for _ in range(2):
                dev = make_device(cfg)
                json.dumps(dev.status().to_dict())
            del dev
        except Exception:   # noqa: BLE001 - only an optimisation
            log.debug("warm-up failed", exc_info=True)

    def _signal(self, unit, sig):
        if unit.child is not None:
            try:
                os.kill(unit.child, sig)
            except ProcessLookupError:
                pass

    def _on_signal(self, signum, _frame):
        if signum == signal.SIGCHLD:
            return  # the wakeup fd does the work
        self.stopping = signum != signal.SIGHUP
        for unit in self.units:
            self._signal(unit, signal.SIGTERM if signum == signal.SIGHUP else signum)

    def _reap(self, unit):
        """The unit's exit status if its child is gone (its last messages read), else None."""
        try:
            res = os.waitid(os.P_PID, unit.child, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            res = None
        if res is None:
            return None
        self._drain(unit)  # the dead child's last messages, before its pid is gone
        _, status = os.waitpid(unit.child, 0)
        return status

    def _exited(self, unit, status):
        """A unit's child exited. Returns False when the whole supervisor should stop."""
        uptime = time.monotonic() - unit.started_at
        served = time.monotonic() - unit.ready_times[-1] if unit.ready else 0.0
        pid, unit.child = unit.child, None
        code = os.waitstatus_to_exitcode(status)
        if unit.removed:
            log.info("%s (pid %d) %s", unit.label(), pid, _describe(status))
            self._forget(unit)
            return True
        if self.stopping or (code == 0 and not self.multi):
            log.info("%s %d %s; stopping", unit.label(), pid, _describe(status))
            # killed by the SIGTERM/SIGINT we passed on counts as a clean stop (as systemd)
            clean = code == 0 or (self.stopping and -code in (signal.SIGTERM, signal.SIGINT))
            if not clean and self.exit_code is None:
                self.exit_code = code if code >= 0 else 128 - code
            return False
        never_ready = not unit.ready and not unit.ready_times and unit.restarts == 0
        if never_ready and (not self.multi or unit in self._initial):
            log.error("%s %d %s before it was ready; not restarting", unit.label(), pid,
                      _describe(status))
            self.exit_code = code if code > 0 else 1
            return False
        if code == EXIT_UPGRADE:
            delay = 0.0
            self.fork_units = False   # from now on every start runs the installed program
            unit.failures = 0
            log.info("%s %d handed over for an upgrade; starting %s", unit.label(), pid,
                     unit.argv[0])
        else:
            # a crash loop (dies before or right after READY=1) backs off; a process
            # that served for a while is replaced at once
            unit.failures = 0 if served > STABLE_AFTER else unit.failures + 1
            delay = BACKOFF[min(unit.failures, len(BACKOFF) - 1)]
            log.warning("%s %d %s after %.1f s; restart %d in %.2f s (%d fds kept)",
                        unit.label(), pid, _describe(status), uptime, unit.restarts + 1,
                        delay, len(unit.store))
        unit.restarts += 1
        unit.start_at = time.monotonic() + delay
        return True

    def _check_watchdog(self, now):
        if not self.watchdog:
            return
        for unit in self.units:
            if (unit.child is not None and unit.ready and not unit.removed
                    and unit.last_ping is not None and now - unit.last_ping > self.watchdog):
                log.error("watchdog: %s (pid %d) sent no WATCHDOG=1 for %.1f s (limit %g s): "
                          "killing it", unit.label(), unit.child, now - unit.last_ping,
                          self.watchdog)
                unit.last_ping = None   # once
                self._signal(unit, signal.SIGKILL)

    def run(self):
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(s, self._on_signal)
        self._initial = list(self.units)
        if self.fork_units:
            import gc
            # what the units import on top of the command line: shared once, here
            from . import cli, control, manager, metrics, sandbox, state  # noqa: F401
            try:   # the manager's policy (--policy): its modules shared too, not its own
                from . import policy  # noqa: F401
            except ImportError:
                pass
            self._parser = cli._daemon_parser()   # built once, shared with every unit
            self._warm_up()
            gc.collect()
            gc.freeze()   # the forked units' collector leaves these objects' pages shared
        for unit in self.units:
            self._hold(unit)
        self._tell_manager()
        going = True
        while going or any(u.child is not None for u in self.units):
            now = time.monotonic()
            for unit in list(self.units):
                if (going and unit.child is None and unit.start_at is not None
                        and unit.start_at <= now and not self.stopping):
                    self._spawn(unit)
            if not going or self.stopping:
                going = False
            timeout = 1.0
            for unit in self.units:
                if unit.child is None and unit.start_at is not None:
                    timeout = min(timeout, max(0.0, unit.start_at - now))
                if unit.kill_at is not None:
                    timeout = min(timeout, max(0.0, unit.kill_at - now))
            if self.watchdog:
                timeout = min(timeout, self.watchdog / 4)
            try:
                waiting = {u.waiting: u for u in self.units
                           if u.waiting is not None and u.child is None and not self.stopping}
                readable, _, _ = select.select([u.sock for u in self.units] + [self._wake_r]
                                               + list(waiting), [], [], timeout)
            except (InterruptedError, ValueError, OSError):
                readable = []
            for fd in readable:
                if fd in waiting and not waiting[fd].removed:
                    waiting[fd].start_at = time.monotonic()   # a frontend is knocking
            try:
                while self._wake_r.recv(512):
                    pass
            except BlockingIOError:
                pass
            now = time.monotonic()
            for unit in list(self.units):
                self._drain(unit)
                if unit.child is None:
                    continue
                if unit.kill_at is not None and now >= unit.kill_at:
                    log.warning("%s did not stop within %g s: killing it", unit.label(),
                                STOP_TIMEOUT)
                    unit.kill_at = None
                    self._signal(unit, signal.SIGKILL)
                status = self._reap(unit)
                if status is not None and not self._exited(unit, status) and going:
                    going = False
                    self.stopping = True
                    for other in self.units:   # one stops: stop the others
                        self._signal(other, signal.SIGTERM)
            self._check_watchdog(now)
            if not going:
                for unit in self.units:
                    unit.start_at = None
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # the children are gone: a late stop is moot
        for unit in self.units:
            if unit.waiting is not None:
                _unlink(unit.socket_path)   # as the unit would when it stops
            self._close([fd for _, fd in unit.store])
            unit.store = []
        return self.exit_code or 0


def _unlink(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def fcntl_dupfd(fd, lowest):
    import fcntl
    return fcntl.fcntl(fd, fcntl.F_DUPFD, lowest)


def child_argv(argv):
    """The serving process's command line: this program, not supervised."""
    return [sys.executable, "-m", "balloon_device.host.cli", *argv, "--no-supervise"]


def guest_unit(argv, cfg, name, path):
    from .config import guest_control_path
    control = guest_control_path(cfg.control_path, name)
    unit = Unit(f"guest {name}", child_argv(argv) + [
        "--unit", "guest", "--only-guest", f"{name}={path}",
        "--control-socket", control], guest=(name, path))
    unit.socket_path, unit.control_path = path, control
    return unit


def socket_holder(cfg):
    """path -> a listening fd for a guest's socket, made as its serving process would
    make it (mode 0600, or --socket-group's 0660; owned by --user/--group)."""
    from vhostuser.connection import Listener

    def hold(path):
        listener = Listener.at_path(path)
        try:
            from . import sandbox
            gid = None
            if cfg.socket_group is not None:
                gid = sandbox.share_sockets([path], cfg.socket_group, "--socket-group")
            if cfg.user is not None or cfg.group is not None:
                uid, ugid = sandbox.resolve_ids(cfg.user, cfg.group)
                g = gid if gid is not None else ugid
                os.chown(path, -1 if uid is None else uid, -1 if g is None else g)
        except BaseException:
            listener.sock.close()
            _unlink(path)
            raise
        return listener.sock.detach()
    return hold


def run(argv, cfg=None, watchdog=0.0, shared=False):
    if cfg is None or not cfg.guests:
        return Supervisor(child_argv(argv), watchdog=watchdog).run()
    if shared:
        # --guest-processes shared: one serving process for every guest (and the control
        # socket, metrics, policy), forked like the per-guest ones; restarts survive, a
        # fault in it costs every guest one restart
        sup = Supervisor(child_argv(argv), watchdog=watchdog)
        sup.fork_units = True
        return sup.run()
    manager = Unit("manager", child_argv(argv) + ["--unit", "manager"])
    units = [guest_unit(argv, cfg, n, p) for n, p in cfg.guests] + [manager]
    sup = Supervisor(units=units, watchdog=watchdog, multi=True, manager=manager,
                     unit_factory=lambda n, p: guest_unit(argv, cfg, n, p),
                     hold_socket=socket_holder(cfg))
    try:
        for unit in units:      # a socket that cannot be made stops the start, as before
            sup._hold(unit)
    except BaseException:
        for unit in units:
            sup._forget(unit)
        raise
    return sup.run()
