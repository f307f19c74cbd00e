"""Unix socket transport: listening socket, message framing, fd passing."""

import array
import errno
import fcntl
import logging
import os
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
        if self.path:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            except OSError as e:  # e.g. privileges dropped (--user) or seccomp: leave it stale
                log.warning("cannot remove socket %s: %s", self.path, e.strerror)


class Connection:
    """One vhost-user peer: reads whole messages with their fds."""

    def __init__(self, sock):
        self.sock = sock
        self.sock.settimeout(RECV_TIMEOUT)

    def fileno(self):
        return self.sock.fileno()

    def _recv(self, n, fds):
        buf = bytearray()
        while len(buf) < n:
            try:
                data, anc, flags, _ = self.sock.recvmsg(n - len(buf), _FD_SPACE)
            except InterruptedError:
                continue
            except socket.timeout as e:
                raise ProtocolError("peer stopped in the middle of a message") from e
            except ConnectionResetError as e:
                raise ConnectionClosed("peer reset the connection") from e
            fds.extend(_take_fds(anc, flags))
            if not data:
                if buf:
                    raise ConnectionClosed("peer closed the connection inside a message")
                raise ConnectionClosed("peer closed the connection")
            buf += data
        return bytes(buf)

    def recv_message(self):
        """Read one message; the caller owns the returned fds."""
        fds = []
        try:
            header = messages.parse_header(self._recv(messages.HEADER.size, fds))
            payload = self._recv(header.size, fds) if header.size else b""
        except BaseException:
            _close_all(fds)
            raise
        if len(fds) > messages.MAX_FDS:
            _close_all(fds)
            raise ProtocolError(f"{len(fds)} fds attached to one message")
        return messages.Message(header, payload, fds)

    # ---- peek, then consume: a process killed while handling a message leaves it
    # in the socket for its successor (see docs/operations.md, restarts) --------

    def queued(self):
        """Bytes waiting in the socket (FIONREAD)."""
        return struct.unpack("i", fcntl.ioctl(self.fileno(), termios.FIONREAD, b"\0" * 4))[0]

    def _peek(self, n, wait=True):
        """The first n bytes in the socket (and the fds attached to them), left there."""
        deadline = time.monotonic() + RECV_TIMEOUT
        while True:
            flags = socket.MSG_PEEK | (0 if wait else socket.MSG_DONTWAIT)
            try:
                data, anc, mflags, _ = self.sock.recvmsg(n, _FD_SPACE, flags)
            except InterruptedError:
                continue
            except (BlockingIOError, socket.timeout):
                if not wait:
                    return b"", []
                raise ProtocolError("peer stopped in the middle of a message") from None
            except ConnectionResetError as e:
                raise ConnectionClosed("peer reset the connection") from e
            fds = _take_fds(anc, mflags)
            if not data:
                raise ConnectionClosed("peer closed the connection")
            if len(data) >= n:
                return data[:n], fds
            if self.queued() >= n:  # the kernel stops a peek at a buffer carrying fds
                rest = self._peek_from(len(data), n - len(data))
                return data + rest, fds
            _close_all(fds)
            if not wait:
                return data, []
            if time.monotonic() > deadline:
                raise ProtocolError("peer stopped in the middle of a message")
            time.sleep(0.001)

    def _peek_from(self, offset, n):
        self.sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, offset)
        try:
            buf = b""
            while len(buf) < n:
                data, anc, mflags, _ = self.sock.recvmsg(n - len(buf), _FD_SPACE, socket.MSG_PEEK)
                _close_all(_take_fds(anc, mflags))
                if not data:
                    raise ConnectionClosed("peer closed the connection inside a message")
                buf += data
            return buf
        finally:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, -1)

    def peek_message(self):
        """Read one message without taking it out of the socket: (Message, raw bytes).
        The caller owns the message's fds; consume(len(raw)) takes it out."""
        head, fds = self._peek(messages.HEADER.size)
        _close_all(fds)
        header = messages.parse_header(head)
        raw, fds = self._peek(messages.HEADER.size + header.size)
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
        data, fds = self._peek(n, wait=False)
        _close_all(fds)
        return data

    def consume(self, n):
        """Take n peeked bytes out of the socket; their fds (copies) are closed."""
        fds = []
        try:
            self._recv(n, fds)
        finally:
            _close_all(fds)

    def send(self, data, fds=()):
        try:
            if fds:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                sent = self.sock.sendmsg([data], anc)
            else:
                sent = self.sock.send(data)
            if sent < len(data):
                self.sock.sendall(data[sent:])
        except (BrokenPipeError, ConnectionResetError) as e:
            raise ConnectionClosed("peer went away while we were replying") from e
        except socket.timeout as e:
            raise ConnectionClosed("peer does not read its socket") from e

    def close(self):
        self.sock.close()
