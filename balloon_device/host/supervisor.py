"""The built-in supervisor: an fd store and restarter for the serving process.

    vhost-user-balloon --socket-path P ...      (standalone: supervised by default)

The supervisor is a small parent process. It never maps guest memory and never
parses guest data: it only keeps fds. It listens on a notify socket (the child's
$NOTIFY_SOCKET) and speaks systemd's protocol: FDSTORE=1 + FDNAME=name with fds
attached stores them, FDSTOREREMOVE=1 + FDNAME=name drops them. When the child
dies it logs why, and starts a new one with the stored fds at 3, 4, ... and
LISTEN_FDS / LISTEN_FDNAMES / LISTEN_PID, exactly as systemd does: at once if the
dead one had served for STABLE_AFTER seconds after READY=1, else after a back-off
that grows to 5 s (a crash loop). Because it
holds a copy of every fd (the frontend's socket among them), QEMU never sees the
connection close. It restarts with back-off, and stops when the child exits 0
(a clean shutdown) or when the first child fails before it is ready (a
configuration error). SIGTERM, SIGINT and SIGHUP are passed on to the child.
A child that exits with EXIT_UPGRADE is restarted at once (ctl upgrade).
"""

import array
import ctypes
import errno
import logging
import os
import secrets
import select
import signal
import socket
import struct
import sys
import time

from .fdstore import same_fd

log = logging.getLogger("vhost-user-balloon.supervisor")

EXIT_UPGRADE = 75          # the child asks to be replaced now (EX_TEMPFAIL)
MAX_FDS = 4096             # systemd's FileDescriptorStoreMax= upper bound in our unit
BACKOFF = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)
STABLE_AFTER = 1.0         # a child that served this long after READY=1 resets the back-off
_UCRED = struct.Struct("iII")
_PR_SET_PDEATHSIG = 1


def _describe(status):
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"killed by {name}"
    return f"exited with status {os.WEXITSTATUS(status)}"


class Supervisor:
    def __init__(self, argv, env=None):
        self.argv = list(argv)
        self.env = dict(os.environ if env is None else env)
        self.store = []            # [name, fd] in the order they came
        self.child = None
        self.child_ready = False
        self.restarts = 0
        self.stopping = False
        self.exit_code = None
        self.address = f"\0vub-supervisor-{os.getpid()}-{secrets.token_hex(8)}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(self.address)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        for s in (self._wake_r, self._wake_w):
            s.setblocking(False)
        self.ready_times = []      # monotonic time each child said READY=1

    # ---- the notify socket -----------------------------------------------------

    def _drain(self):
        while True:
            try:
                data, anc, flags, _ = self.sock.recvmsg(
                    4096, socket.CMSG_SPACE(253 * 4) + socket.CMSG_SPACE(_UCRED.size))
            except (BlockingIOError, InterruptedError):
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
            if self.child is None or pid != self.child:
                log.warning("ignoring a notification from pid %s (not the serving process)", pid)
                self._close(fds)
                continue
            self._message(data.decode(errors="replace"), fds)

    def _message(self, text, fds):
        fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
        name = fields.get("FDNAME", "stored")
        if fields.get("FDSTORE") == "1":
            for fd in fds:
                if len(self.store) >= MAX_FDS:
                    log.error("fd store full (%d fds): dropping %s", MAX_FDS, name)
                    self._close([fd])
                elif any(same_fd(fd, kept) for _, kept in self.store):
                    self._close([fd])  # as systemd: an fd already in the store is not added
                else:
                    self.store.append([name, fd])
            return
        self._close(fds)
        if fields.get("FDSTOREREMOVE") == "1":
            keep = []
            for n, fd in self.store:
                if n == name:
                    self._close([fd])
                else:
                    keep.append([n, fd])
            self.store = keep
        if fields.get("READY") == "1" and not self.child_ready:
            self.child_ready = True
            self.ready_times.append(time.monotonic())
            log.info("serving process %d is ready (%d fds in the store)", self.child,
                     len(self.store))

    @staticmethod
    def _close(fds):
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    # ---- the child ---------------------------------------------------------------

    def _spawn(self):
        names = [n for n, _ in self.store]
        fds = [fd for _, fd in self.store]
        env = dict(self.env, NOTIFY_SOCKET="@" + self.address[1:], VUB_RESTARTS=str(self.restarts),
                   LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=":".join(names))
        parent = os.getpid()
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
                os.execve(self.argv[0], self.argv, env)
            except BaseException:
                os._exit(127)
        self.child = pid
        self.child_ready = False
        self.started_at = time.monotonic()
        log.info("started serving process %d with %d stored fds", pid, len(fds))

    def _on_signal(self, signum, _frame):
        if signum == signal.SIGCHLD:
            return  # the wakeup fd does the work
        self.stopping = signum != signal.SIGHUP
        if self.child is not None:
            try:
                os.kill(self.child, signal.SIGTERM if signum == signal.SIGHUP else signum)
            except ProcessLookupError:
                pass

    def _wait_child(self):
        """Sleep until the child exits; keep the store up to date meanwhile. Returns its status."""
        while True:
            try:
                res = os.waitid(os.P_PID, self.child, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                res = None
            if res is not None:
                self._drain()  # the dead child's last messages, before its pid is gone
                _, status = os.waitpid(self.child, 0)
                return status
            try:
                select.select([self.sock, self._wake_r], [], [], 1.0)
            except InterruptedError:
                pass
            try:
                while self._wake_r.recv(512):
                    pass
            except BlockingIOError:
                pass
            self._drain()

    def run(self):
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(s, self._on_signal)
        failures = 0
        while True:
            self._spawn()
            status = self._wait_child()
            uptime = time.monotonic() - self.started_at
            served = time.monotonic() - self.ready_times[-1] if self.child_ready else 0.0
            pid, self.child = self.child, None
            code = os.waitstatus_to_exitcode(status)
            if code == 0 or self.stopping:
                log.info("serving process %d %s; stopping", pid, _describe(status))
                # killed by the SIGTERM/SIGINT we passed on counts as a clean stop (as systemd)
                clean = self.stopping and -code in (signal.SIGTERM, signal.SIGINT)
                self.exit_code = 0 if clean else (code if code >= 0 else 128 - code)
                break
            if not self.child_ready and self.restarts == 0 and not self.ready_times:
                log.error("serving process %d %s before it was ready; not restarting",
                          pid, _describe(status))
                self.exit_code = code if code > 0 else 1
                break
            if code == EXIT_UPGRADE:
                delay = 0.0
                failures = 0
                log.info("serving process %d handed over for an upgrade; starting %s",
                         pid, self.argv[0])
            else:
                # a crash loop (dies before or right after READY=1) backs off; a process
                # that served for a while is replaced at once
                failures = 0 if served > STABLE_AFTER else failures + 1
                delay = BACKOFF[min(failures, len(BACKOFF) - 1)]
                log.warning("serving process %d %s after %.1f s; restart %d in %.2f s "
                            "(%d fds kept)", pid, _describe(status), uptime, self.restarts + 1,
                            delay, len(self.store))
            self.restarts += 1
            if delay:
                time.sleep(delay)
            if self.stopping:
                break
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # the child is gone: a late stop request is moot
        self._close([fd for _, fd in self.store])
        self.store = []
        return self.exit_code or 0


def fcntl_dupfd(fd, lowest):
    import fcntl
    return fcntl.fcntl(fd, fcntl.F_DUPFD, lowest)


def child_argv(argv):
    """The serving process's command line: this program, not supervised."""
    return [sys.executable, "-m", "balloon_device.host.cli", *argv, "--no-supervise"]


def run(argv):
    return Supervisor(child_argv(argv)).run()
