"""State that survives the serving process: a memfd in the fd store.

Layout: a 4 KiB header {magic, sequence, slot, length, crc32} and two slots of
SLOT_SIZE bytes. A write goes to the slot not in use, then the header flips to it
(one 32-byte pwrite), so a kill at any instruction leaves the old or the new state,
never half of one. At PROGRESS_AT in the header, a {sequence, stage} record moves the
message being handled on (consumed, replied) with one 12-byte pwrite: the window
between sending a reply and recording it is a few instructions, not a state write.

GuestSession is the FdObserver (vhostuser/restart.py) of one guest's Server: it
pushes each fd the session keeps to the fd store under a name that says what it is,
keeps the reply outbox (a pipe, both ends in the store: a reply goes out exactly
once across a kill), and writes the guest's state (protocol snapshot, device state,
fd names, the message being handled) ahead of acting on it. Stale fds leave the store only after the
checkpoint that stopped referring to them.
"""

import base64
import itertools
import json
import logging
import os
import struct
import zlib

from vhostuser.restart import ReplyOutbox

from .fdstore import fd_name, same_fd

log = logging.getLogger(__name__)

# Fault injection for tests: "<stage>:<REQUEST>" SIGKILLs the first serving process right
# after the checkpoint of that stage ("handled", "consumed") of that request, or
# right after its reply was sent, before that was recorded ("sent")
CRASH_AT = os.environ.get("VUB_CRASH_AT", "")
# Fault injection for tests: "N1,N2,..." makes the r-th serving process (r = 0 for the
# first, VUB_RESTARTS) SIGKILL itself at its N_r-th boundary (counted from 1 while a
# frontend is connected, from the restore on in a successor); "N" kills the first one
# only. Boundaries: a state write done ("write"), just before and just after a progress
# record ("pre-consumed": the message is out of the socket, unrecorded; "pre-replied":
# its reply is sent, unrecorded; "consumed", "replied"), a chain discarded before it is
# completed ("discard"), a CONFIG_CHANGE_MSG sent before its ack is read
# ("config-change"). tests/test_restart_machine.py picks the Ns.
def _crash_after():
    spec = os.environ.get("VUB_CRASH_AFTER", "")
    restarts = int(os.environ.get("VUB_RESTARTS", "0") or 0)
    ns = [int(n) for n in spec.split(",") if n.strip()]
    return ns[restarts] if restarts < len(ns) else 0


CRASH_AFTER = _crash_after()
_boundaries = itertools.count(1)


def boundary(kind, session=None):
    """One more kill point passed; SIGKILL ourselves if it is the CRASH_AFTER-th.
    session: only counted while its frontend is connected."""
    if not CRASH_AFTER:
        return
    if session is not None:
        server = session.guest.server
        if server is None or server.conn is None:
            return
    n = next(_boundaries)
    log.debug("VUB_CRASH_AFTER: boundary %d (%s)", n, kind)
    if n == CRASH_AFTER:
        log.warning("VUB_CRASH_AFTER: killing myself at boundary %d, a %s boundary", n, kind)
        os.kill(os.getpid(), 9)


MAGIC = b"VUBSTATE"
HEADER = struct.Struct("<8sQIII")
HEADER_SIZE = 4096
SLOT_SIZE = 1 << 20
VERSION = 1
PROGRESS = struct.Struct("<QI")
PROGRESS_AT = 64
STAGES = {"consumed": 1, None: 2}    # stage code 0: no record


def install_crash_points(device, backend):
    """Tests: SIGKILL the first serving process right after a reported chain was
    discarded, before it is completed (VUB_CRASH_AT=discarded:reporting), or right after
    a CONFIG_CHANGE_MSG was sent, before its ack is read (sent:CONFIG_CHANGE_MSG)."""
    if CRASH_AFTER:
        send_ = backend.notify_config_change
        discard_ = device._discard

        def send_counted():
            ok = send_()
            boundary("config-change")
            return ok

        def discard_counted(*args, **kw):
            done = discard_(*args, **kw)
            boundary("discard")
            return done
        backend.notify_config_change = send_counted
        device._discard = discard_counted
    if os.environ.get("VUB_RESTARTS", "0") != "0":
        return
    if CRASH_AT == "sent:CONFIG_CHANGE_MSG":
        send = backend.notify_config_change

        def send_then_die():
            ok = send()
            log.warning("VUB_CRASH_AT=%s: killing myself", CRASH_AT)
            os.kill(os.getpid(), 9)
            return ok
        backend.notify_config_change = send_then_die
    if CRASH_AT != "discarded:reporting":
        return
    real = device._discard

    def discard_then_die(memory, raw, kind, *args, **kw):
        done = real(memory, raw, kind, *args, **kw)
        if kind == "report":
            log.warning("VUB_CRASH_AT=%s: killing myself after discarding a chain", CRASH_AT)
            os.kill(os.getpid(), 9)
        return done
    device._discard = discard_then_die


class StateError(Exception):
    pass


class StateFile:
    def __init__(self, fd):
        self.fd = fd
        self.seq, self.slot = 0, 1

    @classmethod
    def create(cls):
        fd = os.memfd_create("vub-state", os.MFD_CLOEXEC)
        os.ftruncate(fd, HEADER_SIZE + 2 * SLOT_SIZE)
        return cls(fd)

    def read(self):
        """The last state written, or None if none was."""
        magic, seq, slot, length, crc = HEADER.unpack(os.pread(self.fd, HEADER.size, 0))
        if magic != MAGIC:
            return None
        if slot > 1 or length > SLOT_SIZE:
            raise StateError(f"state header is damaged (slot {slot}, length {length})")
        data = os.pread(self.fd, length, HEADER_SIZE + slot * SLOT_SIZE)
        if zlib.crc32(data) != crc:
            raise StateError("state slot does not match its checksum")
        self.seq, self.slot = seq, slot
        obj = json.loads(data)
        pseq, code = PROGRESS.unpack(os.pread(self.fd, PROGRESS.size, PROGRESS_AT))
        if pseq == seq and obj.get("pending") is not None:
            if code == STAGES[None]:
                obj["pending"] = None
            elif code == STAGES["consumed"]:
                obj["pending"]["stage"] = "consumed"
        return obj

    def write_progress(self, stage):
        """The pending message of the last state written moved on to `stage`."""
        os.pwrite(self.fd, PROGRESS.pack(self.seq, STAGES[stage]), PROGRESS_AT)

    def write(self, obj):
        data = json.dumps(obj, separators=(",", ":")).encode()
        if len(data) > SLOT_SIZE:
            raise StateError(f"state of {len(data)} bytes does not fit a {SLOT_SIZE}-byte slot")
        slot = 1 - self.slot
        os.pwrite(self.fd, data, HEADER_SIZE + slot * SLOT_SIZE)
        os.pwrite(self.fd, HEADER.pack(MAGIC, self.seq + 1, slot, len(data), zlib.crc32(data)), 0)
        self.seq, self.slot = self.seq + 1, slot

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _b(data):
    return None if data is None else base64.b64encode(data).decode()


def _unb(text):
    return None if text is None else base64.b64decode(text)


def outbox_names(guest):
    """The fd store names of a guest's reply outbox (read end, write end)."""
    return fd_name(guest, "outbox", "r"), fd_name(guest, "outbox", "w")


class GuestSession:
    """FdObserver for one guest: fd store names + write-ahead state."""

    def __init__(self, store, guest, state=None, outbox=None):
        self.store = store
        self.guest = guest            # host Guest (name, device, server)
        self.state = state or StateFile.create()
        self.names = {}               # (kind, index) -> name in the store
        self.copies = {}              # name -> our own copy of the stored fd (aliases, below)
        self.pinned = {}              # names kept by the host (listener): name -> fd
        self._gen = itertools.count(1)
        self._to_remove = []
        self.pending = None
        self.saved_counters = None
        self.checkpoints = 0
        self.restored = False
        self.state_name = fd_name(guest.name, "state")
        if state is None:
            store.push(self.state_name, self.state.fd)
        if outbox is None:  # replies go out through it (vhostuser/restart.py ReplyOutbox)
            outbox = ReplyOutbox.create()
            for name, fd in zip(outbox_names(guest.name), outbox.fds()):
                store.push(name, fd)
        self.outbox = outbox

    def pin(self, name, fd):
        """An fd the host stored itself (the listening socket): aliases may point at it."""
        self.pinned[name] = fd
        self.copies[name] = os.dup(fd)

    # FdObserver
    def fd_added(self, kind, index, fd):
        # An fd for a file already in the store (two memory regions of one memfd, a
        # connected --fd socket, the same call eventfd sent again) is not pushed again:
        # systemd drops such a copy. It gets the name already there.
        key = (kind, index)
        name = next((n for n, c in self.copies.items() if same_fd(fd, c)), None)
        if name is None:
            name = fd_name(self.guest.name, kind, index, next(self._gen))
            self.store.push(name, fd)
            self.copies[name] = os.dup(fd)
        old = self.names.get(key)
        self.names[key] = name
        if old is not None and old != name:
            self._release(old)

    def fd_removed(self, kind, index):
        old = self.names.pop((kind, index), None)
        if old is not None:
            self._release(old)

    def _release(self, name):
        if name not in self.pinned and name not in self.names.values():
            copy = self.copies.pop(name, None)
            if copy is not None:
                os.close(copy)
            self._to_remove.append(name)

    def checkpoint(self, pending=None):
        if pending is not None:
            self.pending = {"msg": _b(pending["msg"]), "reply": _b(pending["reply"]),
                            "reply_fd": pending["reply_fd"], "stage": pending["stage"],
                            "outbox": pending.get("outbox", False)}
        self._write()
        boundary("write", self)
        for name in self._to_remove:
            self.store.remove(name)
        self._to_remove = []
        if pending is not None:
            self._crash_point("handled", pending["msg"])

    def progress(self, stage):
        if self.pending is None:
            return
        boundary("pre-" + (stage or "replied"), self)
        if stage is None:
            self._crash_point("sent", _unb(self.pending["msg"]))
            self.pending = None
        else:
            self.pending["stage"] = stage
        self.state.write_progress(stage)
        boundary(stage or "replied", self)
        if stage is not None:
            self._crash_point(stage, _unb(self.pending["msg"]))

    @staticmethod
    def _crash_point(stage, msg):
        if not CRASH_AT or os.environ.get("VUB_RESTARTS", "0") != "0":
            return
        from vhostuser import messages
        try:
            name = messages.Request(struct.unpack_from("<I", msg)[0]).name
        except ValueError:
            return
        if CRASH_AT == f"{stage}:{name}":
            log.warning("VUB_CRASH_AT=%s: killing myself", CRASH_AT)
            os.kill(os.getpid(), 9)

    def _write(self):
        server = self.guest.server
        connected = server is not None and server.conn is not None
        device_state = self.guest.device.save_state()
        self.saved_counters = dict(self.guest.device.counters)
        obj = {"version": VERSION, "connected": connected,
               "fds": [[k, i, n] for (k, i), n in self.names.items()],
               "backend": server.backend.snapshot() if connected else None,
               "device": device_state,
               "pending": self.pending}
        self.state.write(obj)
        self.checkpoints += 1

    # restart
    def restore(self, inherited):
        """Carry on the session recorded in the state, with the fds in `inherited`
        ({name: fd}, those used are taken out). False if there was none to restore."""
        saved = self.state.read()
        if saved is None:
            return False
        if saved.get("version") != VERSION:
            raise StateError(f"state version {saved.get('version')} is not {VERSION}")
        self.guest.device.restore_state(saved.get("device"))
        if not saved["connected"]:
            return False
        fds, missing, taken = {}, [], dict(self.pinned)
        gens = [0]
        for kind, index, name in saved["fds"]:
            if name in taken:  # an alias: one stored fd for several uses
                fd = os.dup(taken[name])
            else:
                fd = inherited.pop(name, None)
                if fd is None:
                    missing.append(name)
                    continue
                taken[name] = fd
                self.copies[name] = os.dup(fd)
            fds[(kind, index)] = fd
            self.names[(kind, index)] = name
            if name not in self.pinned:
                gens.append(int(name.rsplit(".", 1)[1]))
        self._gen = itertools.count(max(gens) + 1)
        conn = fds.pop(("conn", 0), None)
        if missing or conn is None:
            for fd in fds.values():
                os.close(fd)
            if conn is not None:
                os.close(conn)
            self.names.clear()
            log.error("cannot restore the session: fds %s are not in the store",
                      ", ".join(missing) or "conn")
            return False
        pending = saved.get("pending")
        if pending is not None:
            pending = dict(pending, msg=_unb(pending["msg"]), reply=_unb(pending["reply"]))
            self.pending = dict(saved["pending"])
        import socket
        sock = socket.socket(fileno=conn)
        try:
            if CRASH_AT == "restore" and os.environ.get("VUB_RESTARTS") == "1":
                raise StateError("VUB_CRASH_AT=restore: this restore fails (test)")
            self.guest.server.restore(sock, saved["backend"], fds, pending)
        except Exception:
            # better one dropped session than a successor that dies the same way forever
            log.exception("cannot restore the session; dropping the frontend")
            for name in set(self.names.values()) - set(self.pinned):
                self._to_remove.append(name)
                copy = self.copies.pop(name, None)
                if copy is not None:   # else this process keeps the session open
                    os.close(copy)
            self.names.clear()
            server = self.guest.server
            if server.conn is None:
                server.conn = server._wrap(sock)
            server._close("the session could not be restored")
            return False
        self.restored = True
        return True
