"""Unix socket transport: listening socket, message framing, fd passing."""

import array
import errno
import fcntl
import logging
import os
import select
import socket
import stat
import struct
import termios
import time

from . import messages
from .errors import ConnectionClosed, ProtocolError, SetupError

log = logging.getLogger(__name__)

_FD_SPACE = socket.CMSG_SPACE(messages.MAX_FDS * array.array("i").itemsize)
SO_PEEK_OFF = getattr(socket, "SO_PEEK_OFF", 42)
RECV_TIMEOUT = 5.0  # a frontend that stops inside a message is dropped


def _close_all(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _take_fds(ancdata, flags):
    fds = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[:len(data) - len(data) % a.itemsize])
            fds.extend(a)
    if flags & socket.MSG_CTRUNC:
        _close_all(fds)
        raise ProtocolError(f"more than {messages.MAX_FDS} fds attached to one message")
    return fds


_FD_REQUESTS = {5, 7, 12, 13, 14, 21, 32, 37, 38}  # MEM_TABLE, LOG_FD, KICK/CALL/ERR,
#                                                  BACKEND_REQ_FD, SET_INFLIGHT_FD, ADD/REM_MEM_REG
_VRING_FD_REQUESTS = {12, 13, 14}
_NOFD = 1 << 8


def _may_carry_fds(request, payload):
    if request not in _FD_REQUESTS:
        return False
    if request in _VRING_FD_REQUESTS and len(payload) >= 8:
        return not struct.unpack_from("<Q", payload)[0] & _NOFD
    return True


class Listener:
    """A listening Unix socket at a path (mode 0600) or an inherited fd."""

    def __init__(self, sock, path=None):
        self.sock = sock
        self.path = path
        self.unlink_on_close = True  # False under seccomp (no unlink): the next start removes it

    @classmethod
    def at_path(cls, path):
        path = os.fspath(path)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISSOCK(st.st_mode):
                raise SetupError(f"{path} exists and is not a socket; refusing to replace it")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError as e:
                if e.errno != errno.ECONNREFUSED:
                    raise SetupError(f"cannot check existing socket {path}: {e.strerror}") from e
                os.unlink(path)  # stale socket left by a crashed daemon
                log.info("removed stale socket %s", path)
            else:
                raise SetupError(f"{path} is in use by another process; stop it or pick another path")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(path)
        except OSError as e:
            sock.close()
            raise SetupError(f"cannot create socket {path}: {e.strerror}") from e
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(4)
        return cls(sock, path)

    @classmethod
    def from_fd(cls, fd):
        try:
            sock = socket.socket(fileno=fd)
        except OSError as e:
            raise SetupError(f"--fd {fd} is not a usable socket: {e.strerror}") from e
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.detach()
            raise SetupError(f"--fd {fd} is not a Unix stream socket")
        return cls(sock, None)

    @property
    def is_listening(self):
        """False for an already-connected socket (libvirt passes a socketpair end)."""
        return bool(self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))

    def fileno(self):
        return self.sock.fileno()

    def accept(self):
        conn, _ = self.sock.accept()
        return Connection(conn)

    def close(self):
        self.sock.close()
        if self.path and self.unlink_on_close:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            except OSError as e:  # e.g. privileges dropped (--user) or seccomp: leave it stale
                log.warning("cannot remove socket %s: %s", self.path, e.strerror)


class Connection:
    """One vhost-user peer: assembles whole messages with their fds, without blocking.

    The socket is non-blocking. ``poll_message()`` reads what is there and keeps a
    partial message (bytes and the fds that came with them) until the rest arrives,
    so one peer that stops inside a message never blocks the event loop. Reads never
    go past the end of the current message: fds always belong to the message whose
    bytes carried them. ``stalled_for()`` tells how long a partial message has waited.
    """

    def __init__(self, sock):
        self.sock = sock
        self.sock.setblocking(False)
        self._buf = bytearray()
        self._fds = []
        self._header = None
        self._since = None  # monotonic time the current partial message started

    def fileno(self):
        return self.sock.fileno()

    def stalled_for(self, now=None):
        """Seconds since a message started arriving and did not finish (0 if none)."""
        if self._since is None:
            return 0.0
        return (time.monotonic() if now is None else now) - self._since

    def _recv_some(self, n):
        """At most n bytes; None if nothing is there now; EOF raises."""
        try:
            data, anc, flags, _ = self.sock.recvmsg(n, _FD_SPACE, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None
        except ConnectionResetError as e:
            raise ConnectionClosed("peer reset the connection") from e
        self._fds.extend(_take_fds(anc, flags))
        if not data:
            if self._buf or self._header is not None:
                raise ConnectionClosed("peer closed the connection inside a message")
            raise ConnectionClosed("peer closed the connection")
        return data

    def poll_message(self):
        """One whole message if it has arrived, else None (a partial one is kept).
        The caller owns the returned fds. Raises ConnectionClosed / ProtocolError."""
        try:
            while True:
                size = messages.HEADER.size if self._header is None else self._header.size
                need = size - len(self._buf)
                if need > 0:
                    data = self._recv_some(need)
                    if data is None:
                        return None
                    if self._since is None:
                        self._since = time.monotonic()
                    self._buf += data
                    continue
                if self._header is None:
                    self._header = messages.parse_header(bytes(self._buf))
                    self._buf.clear()
                    continue
                msg_fds, self._fds = self._fds, []
                header, payload = self._header, bytes(self._buf)
                self._header = self._since = None
                self._buf.clear()
                if len(msg_fds) > messages.MAX_FDS:
                    _close_all(msg_fds)
                    raise ProtocolError(f"{len(msg_fds)} fds attached to one message")
                return messages.Message(header, payload, msg_fds)
        except BaseException:
            self.drop_partial()
            raise

    # ---- peek, then consume: a process killed while handling a message leaves it
    # in the socket for its successor (FdObserver, vhostuser/restart.py) -----------

    def queued(self):
        """Bytes waiting in the socket (FIONREAD)."""
        return struct.unpack("i", fcntl.ioctl(self.fileno(), termios.FIONREAD, b"\0" * 4))[0]

    def unread_sent(self):
        """Bytes this end sent that the peer has not read yet (SIOCOUTQ)."""
        return struct.unpack("i", fcntl.ioctl(self.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]

    def _peek(self, n):
        """The first n bytes in the socket and the fds attached to them, left there;
        None if fewer than n bytes have arrived."""
        try:
            data, anc, mflags, _ = self.sock.recvmsg(n, _FD_SPACE,
                                                     socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None
        except ConnectionResetError as e:
            raise ConnectionClosed("peer reset the connection") from e
        fds = _take_fds(anc, mflags)
        if not data:
            raise ConnectionClosed("peer closed the connection")
        if len(data) >= n:
            return data[:n], fds
        if self.queued() >= n:  # the kernel stops a peek at a buffer carrying fds
            return data + self._peek_from(len(data), n - len(data)), fds
        _close_all(fds)
        return None

    def _peek_from(self, offset, n):
        self.sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, offset)
        try:
            buf = b""
            while len(buf) < n:
                data, anc, mflags, _ = self.sock.recvmsg(n - len(buf), _FD_SPACE,
                                                         socket.MSG_PEEK | socket.MSG_DONTWAIT)
                _close_all(_take_fds(anc, mflags))
                if not data:
                    raise ConnectionClosed("peer closed the connection inside a message")
                buf += data
            return buf
        finally:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, -1)

    def peek_message(self):
        """One whole message read but left in the socket: (Message, raw bytes); None if
        it has not all arrived (stalled_for() then counts). The caller owns the fds;
        consume(len(raw)) takes the message out."""
        got = self._peek(messages.HEADER.size)
        if got is not None:
            head, fds = got
            _close_all(fds)
            header = messages.parse_header(head)
            got = self._peek(messages.HEADER.size + header.size)
        if got is None:
            if self._since is None and self.queued():
                self._since = time.monotonic()
            return None
        self._since = None
        raw, fds = got
        if fds and not _may_carry_fds(header.request, raw[messages.HEADER.size:]):
            # A peek also picks up the fds of the *next* buffer in the socket (Linux
            # unix_stream_read_generic); a message that carries none has none.
            _close_all(fds)
            fds = []
        if len(fds) > messages.MAX_FDS:
            _close_all(fds)
            raise ProtocolError(f"{len(fds)} fds attached to one message")
        return messages.Message(header, raw[messages.HEADER.size:], fds), raw

    def peek_raw(self, n):
        """Up to n bytes waiting in the socket, without waiting and without taking them."""
        try:
            data, anc, mflags, _ = self.sock.recvmsg(n, _FD_SPACE,
                                                     socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return b""
        _close_all(_take_fds(anc, mflags))
        return data

    def consume(self, n):
        """Take n peeked bytes out of the socket; their fds (copies) are closed."""
        got = 0
        while got < n:
            try:
                data, anc, mflags, _ = self.sock.recvmsg(n - got, _FD_SPACE, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                raise ProtocolError("a peeked message is no longer in the socket") from None
            _close_all(_take_fds(anc, mflags))
            if not data:
                raise ConnectionClosed("peer closed the connection")
            got += len(data)

    def drop_partial(self):
        """Forget a partial message and close the fds that came with it."""
        _close_all(self._fds)
        self._fds = []
        self._buf.clear()
        self._header = self._since = None

    def recv_message(self, timeout=RECV_TIMEOUT):
        """Blocking read of one message (tools and tests); the caller owns the fds."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self.poll_message()
            if msg is not None:
                return msg
            left = deadline - time.monotonic()
            if left <= 0:
                self.drop_partial()
                raise ProtocolError("peer stopped in the middle of a message")
            select.select([self.sock], [], [], left)

    def send(self, data, fds=(), timeout=RECV_TIMEOUT):
        """Send a whole message; a peer that does not read for `timeout` s is gone."""
        view = memoryview(data)
        anc = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
               if fds else [])
        deadline = None
        try:
            while view:
                try:
                    sent = self.sock.sendmsg([view], anc, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    if deadline is None:
                        deadline = time.monotonic() + timeout
                    left = deadline - time.monotonic()
                    if left <= 0 or not select.select([], [self.sock], [], left)[1]:
                        raise ConnectionClosed("peer does not read its socket") from None
                    continue
                anc = []  # the fds went with the first bytes
                view = view[sent:]
        except (BrokenPipeError, ConnectionResetError) as e:
            raise ConnectionClosed("peer went away while we were replying") from e
        except socket.timeout as e:
            raise ConnectionClosed("peer does not read its socket") from e

    def close(self):
        self.sock.close()
