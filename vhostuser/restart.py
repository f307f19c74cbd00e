"""Hooks that let a host keep a backend's session alive across a process restart.

The backend tells an ``FdObserver`` about every fd it keeps (so that a copy can
live outside the process, e.g. in systemd's fd store) and asks it to persist its
state (``checkpoint``) before acting on a message. Nothing here knows about
systemd or any particular device: see balloon_device/host/fdstore.py.

fd kinds: "conn" (the frontend socket), "mem" (index: the region's key),
"kick"/"call"/"err" (index: the queue), "backend" (the backend channel),
"inflight" (the inflight area).
"""

import fcntl
import os
import select
import struct
import termios
import time


class FdObserver:
    """Told about the fds a Server/Backend keeps and when to persist its state."""

    outbox = None   # a ReplyOutbox kept outside the process, or None (replies sent directly)

    def fd_added(self, kind, index, fd):
        """fd now belongs to the session as (kind, index), replacing the one it had if
        any (that one is already closed); keep a copy."""

    def fd_removed(self, kind, index):
        """(kind, index) was closed; drop the copy (once the next checkpoint is written)."""

    def checkpoint(self, pending=None):
        """Persist the session now. pending: None, or the message being handled:
        {"msg": raw bytes, "reply": bytes or None, "reply_fd": kind or None,
         "outbox": True if the reply is in self.outbox, "stage": "handled"} (written
        before the message leaves the socket)."""

    def progress(self, stage):
        """The pending message moved on: "consumed" (out of the socket) or None (replied)."""


class ReplyOutbox:
    """Replies of the journaled path go out through a pipe that outlives the process
    (the fd store keeps both ends): the reply is written into the pipe before the
    message's checkpoint, and splice() moves it into the frontend's socket. The kernel
    takes from the pipe exactly what it puts into the socket, so after a kill the
    bytes left in the pipe are exactly the part of the reply not sent yet: a successor
    sends those and nothing else, whether or not the frontend had read the rest."""

    def __init__(self, rfd, wfd):
        self.rfd, self.wfd = rfd, wfd
        for fd in (rfd, wfd):
            os.set_blocking(fd, False)

    @classmethod
    def create(cls):
        r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        return cls(r, w)

    def queued(self):
        """Bytes in the pipe (the unsent part of the last reply loaded)."""
        return struct.unpack("i", fcntl.ioctl(self.rfd, termios.FIONREAD, b"\0" * 4))[0]

    def drain(self):
        """Forget what is in the pipe; returns how many bytes that was."""
        n = 0
        while True:
            try:
                data = os.read(self.rfd, 65536)
            except BlockingIOError:
                return n
            if not data:
                return n
            n += len(data)

    def load(self, data):
        """Put a whole reply in the pipe: 4 KiB + 12 at most, less than a pipe. The
        pipe holds only the reply of the message being handled: anything left there
        (a session dropped in the middle of a reply) is dropped first."""
        self.drain()
        view = memoryview(data)
        while view:
            view = view[os.write(self.wfd, view):]

    def flush(self, sock, timeout):
        """splice() everything in the pipe into sock; a peer that does not read for
        `timeout` s raises TimeoutError. splice() into a blocking socket blocks whatever
        its flags say, so it runs only once the socket is writable (then a whole reply,
        4 KiB + 12 at most, fits: nothing else writes to this socket meanwhile)."""
        deadline = time.monotonic() + timeout
        while True:
            left = self.queued()
            if not left:
                return
            wait = deadline - time.monotonic()
            if wait <= 0 or not select.select([], [sock], [], wait)[1]:
                raise TimeoutError("peer does not read its socket")
            try:
                os.splice(self.rfd, sock.fileno(), left, flags=os.SPLICE_F_NONBLOCK)
            except (BlockingIOError, InterruptedError):
                pass

    def fds(self):
        return self.rfd, self.wfd

    def close(self):
        for fd in (self.rfd, self.wfd):
            try:
                os.close(fd)
            except OSError:
                pass
        self.rfd = self.wfd = -1
