"""Many guests, one daemon: one event loop, one Server + BalloonDevice per guest.

A single-guest daemon is the same thing with one guest. Each guest is isolated:

* its Server sees the shared loop through a ``GuestLoop`` that runs every one of
  its callbacks (socket, kicks, timers) under a guard: with several guests, an
  exception escaping a guest's callback is logged, counted and drops *that
  guest's* frontend only (so does a single guest with --keep-listening; without it,
  a single-guest daemon lets it propagate and exits, as the plain Server does, so
  that bugs stay loud);
* protocol errors already drop only the connection they happened on (Server);
* with several guests the servers keep listening, so a disconnect never stops
  the loop.

Log lines written while a guest's callback runs carry its name (``current_guest``
and ``GuestLogFilter``).
"""

import contextvars
import logging
import os
import time
from types import MappingProxyType

from vhostuser.connection import Listener
from vhostuser.loop import EventLoop, Loop, Server, open_listener
from vhostuser.restart import ReplyOutbox

from .fdstore import FdStore, fd_name, parse_name, take_listen_fds
from ..device import BalloonDevice
from .errors import ConfigError
from .services import HostServices
from .status import GuestStatus

log = logging.getLogger("vhost-user-balloon")

CHECKPOINT_EVERY = 2.0

current_guest = contextvars.ContextVar("current_guest", default=None)


class GuestLogFilter(logging.Filter):
    """Adds %(guest)s ("[name] " or "") to records; attach it to a handler."""

    def __init__(self, show=True):
        super().__init__()
        self.show = show

    def filter(self, record):
        name = current_guest.get()
        record.guest = f"[{name}] " if name and self.show else ""
        return True


class GuestLoop(Loop):
    """One guest's view of the shared EventLoop: same interface, guarded callbacks."""

    def __init__(self, loop, guest, stop_shared, isolate=True):
        self.shared = loop
        self.guest = guest
        self.stop_shared = stop_shared
        self.isolate = isolate

    def _guard(self, callback):
        guest, isolate = self.guest, self.isolate

        def run():
            token = current_guest.set(guest.name)
            try:
                callback()
            except Exception:
                if not isolate:
                    raise  # one guest: a bug stops the daemon, as before (systemd restarts it)
                guest.failed()
            finally:
                current_guest.reset(token)
        return run

    def add_reader(self, fd, callback):
        self.shared.add_reader(fd, self._guard(callback))

    def remove_reader(self, fd):
        self.shared.remove_reader(fd)

    def call_later(self, delay, callback):
        return self.shared.call_later(delay, self._guard(callback))

    def call_soon(self, callback):
        return self.shared.call_soon(self._guard(callback))

    def cancel(self, handle):
        self.shared.cancel(handle)

    def stop(self):
        """Server asks to stop after its frontend left (single guest, no --keep-listening)."""
        if self.stop_shared:
            self.shared.stop()

    def run(self):
        self.shared.run()

    def run_once(self, timeout=None):
        self.shared.run_once(timeout)

    def close(self):
        """The shared loop is closed by its owner (Daemon)."""


class Guest:
    """One served guest: its device, its server, its name."""

    def __init__(self, name, device, socket_path=None):
        self.name = name
        self.device = device
        self.socket_path = socket_path
        self.server = None
        self.session = None  # state.GuestSession when the fd store keeps this guest's fds
        self.internal_errors = 0

    def failed(self):
        self.internal_errors += 1
        log.exception("guest %s: internal error; dropping its frontend (other guests are "
                      "not affected)", self.name)
        try:
            self.server.disconnect("internal error in the daemon")
        except Exception:
            log.exception("guest %s: closing the connection failed too", self.name)

    def status(self, rings=False):
        """A GuestStatus snapshot; safe to call from the metrics thread (only copies and
        reads) unless rings=True (ring indices read from guest memory: loop thread only)."""
        dev = self.device.status()
        server = self.server
        backend = server.backend
        ring_info = None
        if rings:
            roles = dev.queues
            ring_info = tuple(dict(q.diagnostics(), role=roles[i] if i < len(roles) else None)
                              for i, q in enumerate(backend.queues))
        return GuestStatus(
            name=self.name, device=dev, socket=self.socket_path, connected=server.connected,
            sessions=server.sessions, protocol=MappingProxyType(dict(backend.counters)),
            protocol_errors=server.protocol_errors,
            internal_errors=self.internal_errors,
            memory_bytes=sum(r.size for r in list(backend.memory.regions)),
            ram_backed_bytes=backend.memory.backed_bytes(), rings=ring_info,
            process=MappingProxyType({
                "pid": os.getpid(), "restarts": int(os.environ.get("VUB_RESTARTS", "0")),
                "restored": bool(self.session and self.session.restored),
                "fd_store": self.session is not None,
                "checkpoints": self.session.checkpoints if self.session else 0}),
            frontend_pid=server.peer_pid)

    def call(self, fn, *args):
        """Run fn in this guest's logging context (control socket, policy)."""
        token = current_guest.set(self.name)
        try:
            return fn(*args)
        finally:
            current_guest.reset(token)

    def set_target(self, pages):
        return self.call(self.device.set_target, pages)

    def request_stats(self):
        return self.call(self.device.request_stats)

    def set_stats_interval(self, seconds):
        return self.call(self.device.set_stats_interval, seconds)

    def watch_stats(self, cb):
        """cb(name) after each fresh stats buffer of this guest (on the loop thread)."""
        self.device.on_stats = lambda: self.call(cb, self.name)


def make_device(cfg):
    return BalloonDevice(discard_mode=cfg.discard, reporting=cfg.reporting, stats=cfg.stats,
                         deflate_on_oom=cfg.deflate_on_oom, no_discard=cfg.no_discard,
                         stats_interval=cfg.stats_interval)


class Daemon(HostServices):
    """The whole daemon for a DaemonConfig: guests, control socket, metrics, policy."""

    def __init__(self, cfg, loop=None, host_reader=None, env=None):
        self.cfg = cfg
        self._own_loop = loop is None
        self.loop = loop or EventLoop()
        self.guests = {}
        self.control = self.metrics = self.policy = None
        self._watchdog = None
        self.live = True  # ctl add-guest / remove-guest (not in a supervisor's guest unit)
        specs = cfg.guest_specs
        self.multi = len(specs) > 1 or bool(cfg.guests)
        # An fd store (systemd's, or the built-in supervisor's) at $NOTIFY_SOCKET keeps the
        # fds of every session, so that a restarted daemon carries on (docs/operations.md).
        self.store = FdStore(env)
        # only fds named by us (vub.*): socket activation passes its own (--fd 3) alongside
        self.inherited = {n: fd for n, fd in take_listen_fds(env)
                          if parse_name(n) is not None} if self.store.enabled else {}
        try:
            for name, path, fd in specs:
                self.add_guest(name, path, fd)
            self._drop_unused_fds()
            if cfg.policy is not None:
                if not cfg.deflate_on_oom:
                    log.warning("--policy without --deflate-on-oom: a guest that allocates "
                                "faster than a policy tick meets its balloon and the guest's "
                                "OOM killer ends the allocating process; add --deflate-on-oom "
                                "so that the guest takes its balloon back instead")
                from .policy import PolicyLoop
                self.policy = PolicyLoop(cfg.policy, self.guests, self.loop, host_reader)
                self.policy.open_sources()
            if cfg.control_path:
                from .control import ControlServer
                self.control = ControlServer(cfg.control_path, guests=self.guests, loop=self.loop,
                                             policy=self.policy,
                                             admin=self if self.multi and self.live else None)
            if cfg.metrics_port is not None:
                from .metrics import MetricsServer
                self.metrics = MetricsServer(self.guests, cfg.metrics_address,
                                             cfg.metrics_port, self.policy)
        except BaseException:
            self.close()
            raise

    def add_guest(self, name, socket_path=None, fd=None):
        if name in self.guests:
            raise ConfigError(f"guest {name!r} is given twice")
        guest = Guest(name, make_device(self.cfg), socket_path)
        keep = self.cfg.keep_listening or self.multi
        # --keep-listening promises to outlive a frontend: a guest's error drops it alone
        gloop = GuestLoop(self.loop, guest, stop_shared=not self.multi, isolate=keep)
        token = current_guest.set(name)
        try:
            if self.store.enabled:
                self._add_kept_guest(guest, socket_path, fd, gloop, keep)
            else:
                listener = open_listener(socket_path, fd)
                try:
                    guest.server = Server(guest.device, listener, loop=gloop,
                                          keep_listening=keep)
                except BaseException:
                    listener.close()
                    raise
        finally:
            current_guest.reset(token)
        self.guests[name] = guest
        return guest

    def _add_kept_guest(self, guest, socket_path, fd, gloop, keep):
        """A guest whose fds and state live in the fd store: take them back if a
        previous process left them there, else start afresh and push them."""
        from .state import GuestSession, StateFile, install_crash_points, outbox_names
        t0 = time.monotonic()
        listen_name = fd_name(guest.name, "listen")
        kept = self.inherited.pop(listen_name, None)
        if kept is not None:
            listener = Listener.from_fd(kept)
            listener.path = socket_path
        else:
            listener = open_listener(socket_path, fd)
            self.store.push(listen_name, listener.fileno())
        state_fd = self.inherited.pop(fd_name(guest.name, "state"), None)
        state = StateFile(state_fd) if state_fd is not None else None
        names = outbox_names(guest.name)
        ends = [self.inherited.pop(n, None) for n in names]
        outbox = ReplyOutbox(*ends) if None not in ends else None
        for name, fd in zip(names, ends) if outbox is None else ():
            if fd is not None:  # half of one: a new outbox replaces it
                self.store.remove(name)
                os.close(fd)
        session = GuestSession(self.store, guest, state, outbox)
        session.pin(listen_name, listener.fileno())
        guest.session = session
        connected = not listener.is_listening
        try:
            guest.server = Server(guest.device, listener, loop=gloop, keep_listening=keep,
                                  observer=session, accept=state is None)
        except BaseException:
            listener.close()
            raise
        install_crash_points(guest.device, guest.server.backend)
        if state is None:
            session.checkpoint()
            return
        if session.restore(self.inherited):
            log.info("session restored from the fd store in %.1f ms",
                     (time.monotonic() - t0) * 1e3)
            if guest.device.acked:
                guest.server.notify_config_change()  # in case one was lost in the restart
        elif connected:
            guest.server._open(guest.server._wrap(listener.sock))
        else:
            session.checkpoint()

    def add_guest_live(self, name, path):
        """ctl add-guest in the one-process daemon (--no-supervise)."""
        from .config import check_new_guest
        check_new_guest(name, path, self.guests)
        guest = self.add_guest(name, path)
        if self.store.enabled and guest.session is not None:
            guest.session.checkpoint()
        log.info("guest %s added on %s", name, path)
        return {"guest": name, "socket": path, "added": True}

    def remove_guest_live(self, name):
        """ctl remove-guest in the one-process daemon: its session ends (its QEMU sees
        the socket close) and its fds leave the fd store."""
        guest = self.guests.get(name) if isinstance(name, str) else None
        if guest is None:
            raise ConfigError(f"no guest {name!r} here; this daemon serves "
                              f"{', '.join(self.guests) or 'no guest'}")
        del self.guests[name]
        token = current_guest.set(name)
        try:
            from .state import outbox_names
            guest.server.close()
            session = guest.session
            if session is not None:
                for stored in (set(session.names.values()) | set(session.pinned)
                               | set(session._to_remove) | {session.state_name}
                               | set(outbox_names(name))):
                    self.store.remove(stored)
                session.outbox.close()
                for copy in session.copies.values():
                    try:
                        os.close(copy)
                    except OSError:
                        pass
                session.copies.clear()
                session.state.close()
        finally:
            current_guest.reset(token)
        log.info("guest %s removed: its session is closed", name)
        return {"guest": name, "removed": True}

    def _drop_unused_fds(self):
        """fds in the store that no guest claimed (left by a changed configuration or
        by a process killed between two checkpoints): close them, drop them."""
        for name, fd in self.inherited.items():
            log.info("dropping fd %s from the fd store: nothing refers to it", name)
            self.store.remove(name)
            try:
                os.close(fd)
            except OSError:
                pass
        self.inherited.clear()

    def describe(self):
        names = ", ".join(f"{n} on {g.socket_path or 'fd'}" for n, g in self.guests.items())
        return f"serving {len(self.guests)} guest(s): {names}"

    def start(self):
        """Everything is listening: tell systemd, start timers."""
        if self.policy is not None:
            self.policy.start()
        if self.store.enabled:
            self._checkpoint_tick()
        self._announce()

    def _checkpoint_tick(self):
        """Counters move with every chain; keep them in the state every CHECKPOINT_EVERY s
        (the rest of the state is written ahead of every change)."""
        for guest in self.guests.values():
            if guest.session is not None and guest.session.pending is None:
                if guest.device.counters != guest.session.saved_counters:
                    guest.call(guest.session.checkpoint)
        self._checkpoints = self.loop.call_later(CHECKPOINT_EVERY, self._checkpoint_tick)

    def close(self):
        self._close_services()
        for guest in self.guests.values():
            try:
                guest.server.close()
            except Exception:
                log.exception("guest %s: error while closing", guest.name)
        self.loop.cancel(getattr(self, "_checkpoints", None))
        self._close_loop()


def socket_dir_guests(directory, names):
    """--socket-dir DIR --guests a,b -> [(a, DIR/a.sock), (b, DIR/b.sock)]."""
    out = []
    for name in names.split(","):
        name = name.strip()
        if name:
            out.append((name, os.path.join(directory, f"{name}.sock")))
    if not out:
        raise ConfigError("--guests needs at least one name (a,b,c)")
    return out


def parse_guest_arg(text):
    """--guest NAME=PATH -> (NAME, PATH)."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ConfigError(f"--guest {text!r}: write NAME=SOCKET_PATH, e.g. web1=/run/vub/web1.sock")
    return name, path
