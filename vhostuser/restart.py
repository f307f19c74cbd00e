"""Hooks that let a host keep a backend's session alive across a process restart.

The backend tells an ``FdObserver`` about every fd it keeps (so that a copy can
live outside the process, e.g. in systemd's fd store) and asks it to persist its
state (``checkpoint``) before acting on a message. Nothing here knows about
systemd or any particular device: see balloon_device/host/fdstore.py.

fd kinds: "conn" (the frontend socket), "mem" (index: the region's key),
"kick"/"call"/"err" (index: the queue), "backend" (the backend channel),
"inflight" (the inflight area).
"""


class FdObserver:
    """Told about the fds a Server/Backend keeps and when to persist its state."""

    def fd_added(self, kind, index, fd):
        """fd now belongs to the session as (kind, index), replacing the one it had if
        any (that one is already closed); keep a copy."""

    def fd_removed(self, kind, index):
        """(kind, index) was closed; drop the copy (once the next checkpoint is written)."""

    def checkpoint(self, pending=None):
        """Persist the session now. pending: None, or the message being handled:
        {"msg": raw bytes, "reply": bytes or None, "reply_fd": kind or None,
         "stage": "handled"} (written before the message leaves the socket)."""

    def progress(self, stage):
        """The pending message moved on: "consumed" (out of the socket) or None (replied)."""
