"""Event loop (selectors/epoll, timers, no busy polling) and the backend server."""

import abc
import heapq
import itertools
import logging
import os
import select
import selectors
import signal
import socket
import struct
import time

from .connection import RECV_TIMEOUT, Listener
from .device import DeviceContext
from .errors import ConnectionClosed, ProtocolError
from .handler import Backend

log = logging.getLogger(__name__)

MESSAGES_PER_TURN = 32
PARTIAL_RETRY = 0.005   # journaled sessions: seconds between looks at a partial message  # frontend messages handled before other sources get their turn


class Loop(abc.ABC):
    """What a Server needs from an event loop: fd readers, one-shot timers,
    stop.  EventLoop implements it; a daemon may wrap one (a guest's view of
    a shared loop) as long as it keeps this interface."""

    @abc.abstractmethod
    def add_reader(self, fd, callback):
        """Call callback() whenever fd is readable (replaces an earlier one)."""

    @abc.abstractmethod
    def remove_reader(self, fd):
        """Stop watching fd (no error if it was not watched)."""

    @abc.abstractmethod
    def call_later(self, delay, callback):
        """Run callback() once after delay seconds; returns a handle for cancel()."""

    @abc.abstractmethod
    def call_soon(self, callback):
        """Run callback() on the next turn, after the fds ready then; returns a handle."""

    @abc.abstractmethod
    def cancel(self, handle):
        """Cancel a call_later() handle (None and fired handles are ignored)."""

    @abc.abstractmethod
    def stop(self):
        """Make run() return."""

    @abc.abstractmethod
    def run(self):
        """Run until stop()."""

    @abc.abstractmethod
    def run_once(self, timeout=None):
        """Wait for one round of events (at most timeout seconds) and run them."""

    @abc.abstractmethod
    def close(self):
        """Release the loop's resources."""


class EventLoop(Loop):
    """Readers on fds plus one-shot timers; sleeps in epoll when idle."""

    def __init__(self):
        self.sel = selectors.DefaultSelector()
        self._timers = []
        self._ready = []  # call_soon callbacks for the next turn (round-robin work)
        self._seq = itertools.count()
        self._stopping = False
        self._wake_r = self._wake_w = None

    def add_reader(self, fd, callback):
        if fd in self.sel.get_map():
            self.sel.modify(fd, selectors.EVENT_READ, callback)
        else:
            self.sel.register(fd, selectors.EVENT_READ, callback)

    def remove_reader(self, fd):
        try:
            self.sel.unregister(fd)
        except (KeyError, ValueError):
            pass

    def call_later(self, delay, callback):
        """Run callback after delay seconds. Returns a handle for cancel()."""
        entry = [time.monotonic() + max(0.0, delay), next(self._seq), callback]
        heapq.heappush(self._timers, entry)
        return entry

    def call_soon(self, callback):
        """Run callback on the next turn of the loop, after the fds that are ready then:
        work split into turns (queue budgets) takes turns with every other source."""
        entry = [0.0, next(self._seq), callback]
        self._ready.append(entry)
        return entry

    def cancel(self, handle):
        if handle is not None:
            handle[2] = None

    def stop(self):
        self._stopping = True
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"\0")
            except OSError:
                pass

    def handle_signals(self, signals=(signal.SIGINT, signal.SIGTERM)):
        """Stop cleanly on these signals (wakes epoll through a socketpair)."""
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        self.add_reader(self._wake_r.fileno(), self._drain_wakeup)
        for s in signals:
            signal.signal(s, lambda signum, frame: self._on_signal(signum))

    def _on_signal(self, signum):
        log.info("received %s, shutting down", signal.Signals(signum).name)
        self._stopping = True

    def _drain_wakeup(self):
        try:
            while self._wake_r.recv(512):
                pass
        except BlockingIOError:
            pass

    def _run_timers(self):
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, cb = heapq.heappop(self._timers)
            if cb is not None:
                cb()

    def _timeout(self):
        while self._timers and self._timers[0][2] is None:
            heapq.heappop(self._timers)
        if not self._timers:
            return None
        return max(0.0, self._timers[0][0] - time.monotonic())

    def run_once(self, timeout=None):
        t = self._timeout()
        if timeout is not None:
            t = timeout if t is None else min(t, timeout)
        if self._ready:
            t = 0
        for key, _ in self.sel.select(t):
            if key.fd in self.sel.get_map():  # an earlier callback may have removed it
                key.data()
        self._run_timers()
        ready, self._ready = self._ready, []  # what is added now runs next turn
        for _, _, cb in ready:
            if cb is not None:
                cb()

    def run(self):
        while not self._stopping:
            self.run_once()

    def close(self):
        if self._wake_r is not None:
            signal.set_wakeup_fd(-1)
            self._wake_r.close()
            self._wake_w.close()
        self.sel.close()


def peer_pid(sock):
    """The pid of the process at the other end of a connected Unix socket (SO_PEERCRED,
    taken when it connected), or None (not a Unix socket, or the pid is unknown)."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    pid = struct.unpack("3i", creds)[0]
    return pid if pid > 0 else None


class Server(DeviceContext):
    """Serves one device to one frontend at a time on a listener."""

    def __init__(self, device, listener, loop=None, keep_listening=False,
                 observer=None, accept=True):
        """observer: an FdObserver (vhostuser/restart.py) that keeps the session's fds
        and state outside the process; then each message is peeked, handled, checkpointed,
        and only then taken out of the socket and answered. accept=False: a connected
        socket in `listener` is not opened here (restore() does it)."""
        self.device = device
        self.listener = listener
        self.loop = loop or EventLoop()
        self.keep_listening = keep_listening
        self.observer = observer
        self.backend = Backend(device, observer=observer,
                               track_inflight=observer is not None)
        self.conn = None
        self.peer_pid = None       # the frontend's process (SO_PEERCRED), None if unknown
        self.sessions = 0
        self.protocol_errors = 0   # frontends dropped for a protocol error
        self._watched = {}
        self._runnable = set()
        self._resume = {}      # queue index -> call_soon handle (budget ran out)
        self._stall_timer = None
        device.attach(self)
        if listener is None:
            pass
        elif listener.is_listening:
            self.loop.add_reader(listener.fileno(), self._on_accept)
        elif accept:
            self._open(self._wrap(listener.sock))

    @staticmethod
    def _wrap(sock):
        from .connection import Connection
        return Connection(sock)

    # DeviceContext
    def notify_config_change(self):
        return self.backend.notify_config_change()

    def state_changed(self):
        """The device changed state it must not lose: persist it before acting."""
        if self.observer is not None:
            self.observer.checkpoint()

    def call_later(self, delay, callback):
        return self.loop.call_later(delay, callback)

    def cancel(self, handle):
        self.loop.cancel(handle)

    def add_reader(self, fd, callback):
        self.loop.add_reader(fd, callback)

    def remove_reader(self, fd):
        self.loop.remove_reader(fd)

    @property
    def connected(self):
        return self.conn is not None

    # connections
    def _on_accept(self):
        try:
            conn = self.listener.accept()
        except OSError as e:
            log.warning("accept failed: %s", e)
            return
        if self.conn is not None and self._peer_gone():
            # The previous frontend hung up but its EOF is not handled yet (it closed and
            # reconnected within one loop iteration): finish that session first.
            self._close("peer closed the connection")
        if self.conn is not None:
            log.warning("refusing a second frontend: this socket already serves one")
            conn.close()
            return
        self._open(conn)

    def _peer_gone(self):
        p = select.poll()
        p.register(self.conn.fileno(), select.POLLRDHUP)
        return bool(p.poll(0))

    def _open(self, conn):
        self.conn = conn
        self.sessions += 1
        self.peer_pid = peer_pid(conn.sock)
        log.info("frontend connected (pid %s)", self.peer_pid or "unknown")
        self.loop.add_reader(conn.fileno(), self._on_message)
        if self.observer is not None:
            self.observer.fd_added("conn", 0, conn.fileno())
            self.observer.checkpoint()

    def restore(self, sock, snapshot, fds, pending=None):
        """Carry on a session a killed process served: sock is the frontend socket it
        held, snapshot/fds as from Backend.snapshot()/kept_fds(), pending the message
        it was handling (see FdObserver.checkpoint)."""
        self.backend.restore(snapshot, fds)
        self.conn = self._wrap(sock)
        self.sessions += 1
        self.peer_pid = peer_pid(sock)   # SO_PEERCRED holds on an inherited socket too
        self.loop.add_reader(sock.fileno(), self._on_message)
        log.info("frontend session restored after a restart")
        if pending is not None:
            self._finish_pending(pending)
        elif self.observer.outbox is not None and self.observer.outbox.drain():
            # killed after loading a reply, before the checkpoint of its message: the
            # message is still in the socket and is handled again
            log.info("dropping a reply the previous process had not recorded")
        self._sync()

    def _finish_pending(self, pending):
        msg = pending["msg"]
        if pending["stage"] == "handled":
            # killed before the message left the socket: it is the first thing there
            # (its sender waits for the reply when one is due)
            if self.conn.peek_raw(len(msg)) == msg:
                self.conn.consume(len(msg))
        outbox = self.observer.outbox
        if pending.get("outbox") and outbox is not None:
            # what is left in the pipe is exactly what was not sent: send that only
            left = outbox.queued()
            log.info("the reply to the request the previous process was handling: "
                     "%d of %d bytes left to send", left, len(pending["reply"]))
            self._flush_outbox(self.conn)
        elif pending.get("reply") is not None and self.conn.unread_sent():
            # (a reply with an fd, or a state written before the outbox existed)
            # killed between sending the reply and recording it: it is still there
            log.info("the reply to the request the previous process was handling is "
                     "already in the socket")
        elif pending.get("reply") is not None:
            fds = []
            if pending.get("reply_fd") == "inflight" and self.backend.inflight is not None:
                fds = [self.backend.inflight.fd]
            log.info("answering the request the previous process was handling")
            self.conn.send(pending["reply"], fds)
        self.observer.progress(None)

    def _flush_outbox(self, conn):
        try:
            self.observer.outbox.flush(conn.sock, RECV_TIMEOUT)
        except (BrokenPipeError, ConnectionResetError) as e:
            raise ConnectionClosed("peer went away while we were replying") from e
        except TimeoutError as e:
            raise ConnectionClosed(str(e)) from e

    def disconnect(self, reason):
        """Drop the current frontend (no-op without one); reason is logged."""
        self._close(reason)

    def _close(self, reason):
        if self.conn is None:
            return
        log.info("frontend disconnected: %s", reason)
        self.loop.remove_reader(self.conn.fileno())
        for fd in list(self._watched):
            self.loop.remove_reader(fd)
        self._watched.clear()
        self._runnable.clear()
        for handle in self._resume.values():
            self.loop.cancel(handle)
        self._resume.clear()
        self.loop.cancel(self._stall_timer)
        self._stall_timer = None
        self.backend.disconnect()
        self.conn.close()
        self.conn = None
        if self.observer is not None:
            self.observer.fd_removed("conn", 0)
            self.observer.checkpoint()
        self.peer_pid = None
        if not self.keep_listening or not self.listener.is_listening:
            self.loop.stop()

    def _on_message(self):
        """Handle the messages that have arrived; a partial one waits, without blocking
        the loop, for at most RECV_TIMEOUT seconds."""
        if self.observer is not None:
            return self._on_message_journaled()
        conn = self.conn
        try:
            for _ in range(MESSAGES_PER_TURN):
                msg = conn.poll_message()
                if msg is None:
                    break
                log.debug("<- %s flags=%#x size=%d fds=%d", msg.header.name, msg.header.flags,
                          msg.header.size, len(msg.fds))
                reply = self.backend.handle(msg)
                self._send_reply(conn, reply)
                self._sync()
                if self.conn is not conn:
                    return
        except ConnectionClosed as e:
            self._close(str(e))
            return
        except ProtocolError as e:
            self._protocol_error(e)
            return
        if conn.stalled_for() and self._stall_timer is None:
            self._stall_timer = self.loop.call_later(RECV_TIMEOUT, self._check_stall)

    @staticmethod
    def _send_reply(conn, reply):
        if reply is not None:
            try:
                conn.send(reply.data, reply.fds)
            finally:
                for fd in reply.fds:
                    os.close(fd)

    def _protocol_error(self, reason):
        log.error("protocol error, dropping the frontend: %s", reason)
        self.protocol_errors += 1
        self._close(f"protocol error: {reason}")

    def _check_stall(self):
        self._stall_timer = None
        conn = self.conn
        if conn is None:
            return
        waited = conn.stalled_for()
        if waited >= RECV_TIMEOUT:
            self._protocol_error(f"it stopped in the middle of a message {waited:.1f}s ago")
        elif waited:
            self._stall_timer = self.loop.call_later(RECV_TIMEOUT - waited, self._check_stall)

    def _on_message_journaled(self):
        """Peek, handle, checkpoint, consume, reply: a kill at any point leaves either
        the message in the socket (and the state from before it) or the state after it
        with the reply to send."""
        conn = self.conn
        try:
            for _ in range(MESSAGES_PER_TURN):
                got = conn.peek_message()
                if got is None:
                    break
                msg, raw = got
                log.debug("<- %s flags=%#x size=%d fds=%d", msg.header.name, msg.header.flags,
                          msg.header.size, len(msg.fds))
                reply = self.backend.handle(msg)
                self.backend.sync_fds()
                outbox = self.observer.outbox
                via_outbox = outbox is not None and reply is not None and not reply.fds
                if via_outbox:
                    outbox.load(reply.data)   # before the checkpoint that says it is there
                self.observer.checkpoint({
                    "msg": raw, "reply": None if reply is None else reply.data,
                    "reply_fd": "inflight" if reply is not None and reply.fds else None,
                    "outbox": via_outbox, "stage": "handled"})
                conn.consume(len(raw))
                self.observer.progress("consumed")
                if via_outbox:
                    self._flush_outbox(conn)
                else:
                    self._send_reply(conn, reply)
                self.observer.progress(None)
                self._sync()
                if self.conn is not conn:
                    return
        except ConnectionClosed as e:
            self._close(str(e))
            return
        except ProtocolError as e:
            self._protocol_error(e)
            return
        if conn.stalled_for():
            # A partial message stays in the socket, which stays readable: look again in
            # a few ms rather than spin, and drop the frontend after RECV_TIMEOUT.
            self.loop.remove_reader(conn.fileno())
            self.loop.call_later(PARTIAL_RETRY, lambda: self._rewatch(conn))
            if self._stall_timer is None:
                self._stall_timer = self.loop.call_later(RECV_TIMEOUT, self._check_stall)

    def _rewatch(self, conn):
        if self.conn is conn:
            self.loop.add_reader(conn.fileno(), self._on_message)
            self._on_message()

    def _sync(self):
        """Refresh the watch list and process queues that just became runnable."""
        b = self.backend
        if b.fds_changed:
            b.fds_changed = False
            wanted = dict(b.watched_fds())
            for fd in list(self._watched):
                if fd not in wanted or self._watched[fd] != wanted[fd]:
                    self.loop.remove_reader(fd)
                    del self._watched[fd]
            for fd, what in wanted.items():
                if fd not in self._watched:
                    kind, q = what
                    try:
                        if kind == "kick":
                            os.set_blocking(fd, False)
                            self.loop.add_reader(fd, lambda q=q: self._on_kick(q))
                        else:
                            self.loop.add_reader(fd, self._on_backend_channel)
                    except (OSError, ValueError) as e:  # e.g. an fd epoll refuses
                        log.error("cannot watch the frontend's %s fd %d: %s", kind, fd, e)
                        self._close(f"protocol error: unusable {kind} fd ({e})")
                        return
                    self._watched[fd] = what
        now = {q.index for q in b.queues if b.runnable(q)}
        for index in sorted(now - self._runnable):
            self._process(b.queues[index])
        self._runnable = now

    def _process(self, q):
        """One turn of q (at most the backend's budget); come back on the next loop turn
        if there is more, after every other ready fd and queue had its turn."""
        if self.backend.process(q) and q.index not in self._resume:
            self._resume[q.index] = self.loop.call_soon(lambda: self._resumed(q))

    def _resumed(self, q):
        self._resume.pop(q.index, None)
        if self.conn is not None:
            self._process(q)

    def _on_kick(self, q):
        fd = q.kick_fd
        if fd is None:
            return
        try:
            os.read(fd, 8)
        except BlockingIOError:
            pass
        except OSError as e:
            log.warning("queue %d: reading the kick fd failed: %s", q.index, e)
        if q.index not in self._resume:  # else: it is already due for its next turn
            self._process(q)  # a disabled ring's kick is drained and ignored

    def _on_backend_channel(self):
        self.backend.read_backend_channel()
        if self.backend.fds_changed:
            if self.observer is not None:
                self.backend.sync_fds()
                self.observer.checkpoint()
            self._sync()

    def serve_forever(self):
        try:
            self.loop.run()
        finally:
            self._close("daemon shutting down")

    def close(self):
        self._close("daemon shutting down")
        self.listener.close()


def open_listener(socket_path=None, fd=None):
    if (socket_path is None) == (fd is None):
        raise ValueError("exactly one of socket_path and fd")
    return Listener.at_path(socket_path) if socket_path is not None else Listener.from_fd(fd)
