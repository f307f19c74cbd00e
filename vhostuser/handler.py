"""Protocol state of one vhost-user session: features, memory, rings, config.

``Backend.handle(msg)`` takes one validated-header message and returns the
reply to send (or None). It knows nothing about any particular device:
device work goes through the ``Device`` interface.
"""

import itertools
import logging
import os
import socket
import stat

from . import messages as m
from .connection import Connection
from .device import VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_RING_F_EVENT_IDX
from .errors import ConnectionClosed, GuestMemoryError, ProtocolError, RequestError, VringError
from .inflight import InflightArea
from .memory import MAX_MEM_SLOTS, MemoryTable, Region, check_sealed
from .messages import ProtocolFeature as PF
from .messages import Request as R
from .vring import VirtQueue

log = logging.getLogger(__name__)

SUPPORTED_PROTOCOL_FEATURES = (
    (1 << PF.MQ) | (1 << PF.REPLY_ACK) | (1 << PF.BACKEND_REQ) | (1 << PF.CONFIG)
    | (1 << PF.INFLIGHT_SHMFD) | (1 << PF.RESET_DEVICE) | (1 << PF.CONFIGURE_MEM_SLOTS))
BACKEND_SEND_TIMEOUT = 1.0  # a frontend that does not read its backend channel loses it
QUEUE_BUDGET = 64  # chains one queue may pop per turn of the event loop (fairness)

# Requests that carry their own reply; every other one may get a REPLY_ACK.
_OWN_REPLY = {R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.GET_QUEUE_NUM, R.GET_VRING_BASE,
              R.GET_CONFIG, R.GET_INFLIGHT_FD, R.GET_MAX_MEM_SLOTS}


EVENTFD = "anon_inode:[eventfd]"


def fd_kind(fd):
    """What an fd is, as /proc/self/fd names it ("anon_inode:[eventfd]", "/dev/null",
    "socket:[123]", ...). Readable by the process itself even when it is not dumpable."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        pass
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            if "eventfd-count:" in f.read():
                return EVENTFD
    except OSError:
        pass
    try:
        return f"a file of mode {stat.filemode(os.fstat(fd).st_mode)}"
    except OSError as e:
        return f"unusable ({e.strerror})"


class Reply:
    __slots__ = ("data", "fds")

    def __init__(self, data, fds=()):
        self.data = data
        self.fds = list(fds)


class Backend:
    """One device served over one frontend connection at a time."""

    def __init__(self, device, observer=None, track_inflight=False):
        self.device = device
        self.observer = observer          # FdObserver (vhostuser/restart.py) or None
        self.track_inflight = track_inflight  # keep our own inflight area if the frontend gives none
        self._own_inflight = False
        self._kept = {}                   # (kind, index) -> fd the observer was told about
        self._region_keys = itertools.count(1)
        self.memory = MemoryTable(max_regions=MAX_MEM_SLOTS)
        self.queues = [VirtQueue(i, size) for i, size in enumerate(device.queue_sizes())]
        self.backend_channel = None
        self.inflight = None
        self.fds_changed = True  # tells the event loop to resync its watch list
        self.counters = {"messages": 0, "errors": 0, "ring_errors": 0}
        self._init_session_state()
        self._handlers = {
            R.GET_FEATURES: self._get_features,
            R.SET_FEATURES: self._set_features,
            R.SET_OWNER: self._set_owner,
            R.RESET_OWNER: self._reset_owner,
            R.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            R.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            R.GET_QUEUE_NUM: self._get_queue_num,
            R.SET_MEM_TABLE: self._set_mem_table,
            R.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            R.ADD_MEM_REG: self._add_mem_reg,
            R.REM_MEM_REG: self._rem_mem_reg,
            R.SET_VRING_NUM: self._set_vring_num,
            R.SET_VRING_ADDR: self._set_vring_addr,
            R.SET_VRING_BASE: self._set_vring_base,
            R.GET_VRING_BASE: self._get_vring_base,
            R.SET_VRING_KICK: self._set_vring_kick,
            R.SET_VRING_CALL: self._set_vring_call,
            R.SET_VRING_ERR: self._set_vring_err,
            R.SET_VRING_ENABLE: self._set_vring_enable,
            R.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            R.GET_CONFIG: self._get_config,
            R.SET_CONFIG: self._set_config,
            R.RESET_DEVICE: self._reset_device,
            R.GET_INFLIGHT_FD: self._get_inflight_fd,
            R.SET_INFLIGHT_FD: self._set_inflight_fd,
        }

    def _init_session_state(self):
        self.owner = False
        self.acked_features = None
        self.protocol_features = 0
        self.started = [False] * len(self.queues)

    # ---- helpers -----------------------------------------------------------

    def offered_features(self):
        return self.device.features() | VHOST_USER_F_PROTOCOL_FEATURES

    def has_protocol(self, bit):
        return bool(self.protocol_features & (1 << bit))

    def queue(self, index):
        """The one checked accessor for a queue index sent by the frontend."""
        if not 0 <= index < len(self.queues):
            raise RequestError(f"queue index {index} out of range: the device has "
                               f"{len(self.queues)} queues")
        return self.queues[index]

    def _ack(self, msg):
        return msg.header.need_reply and self.has_protocol(PF.REPLY_ACK)

    # ---- entry point -------------------------------------------------------

    def handle(self, msg):
        """Handle one message; returns a Reply or None. Raises ProtocolError to disconnect."""
        self.counters["messages"] += 1
        hdr = msg.header
        try:
            try:
                req = R(hdr.request)
                handler = self._handlers[req]
            except (ValueError, KeyError):
                raise RequestError(f"{hdr.name} is not supported by this backend") from None
            result = handler(msg)
        except RequestError as e:
            self.counters["errors"] += 1
            return self._error_reply(msg, e)
        finally:
            for fd in msg.fds:  # fds a handler did not take
                try:
                    os.close(fd)
                except OSError:
                    pass
            msg.fds.clear()
        if isinstance(result, Reply):
            return Reply(m.reply_header(hdr, result.data), result.fds)
        if result is not None:
            return Reply(m.reply_header(hdr, result))
        if self._ack(msg):
            return Reply(m.reply_header(hdr, m.U64.pack(0)))
        return None

    def _error_reply(self, msg, err):
        hdr = msg.header
        if hdr.request == R.GET_CONFIG:
            log.warning("GET_CONFIG refused: %s", err)
            return Reply(m.reply_header(hdr, b""))  # zero-length reply = error
        if hdr.request in _OWN_REPLY or not self._ack(msg):
            raise ProtocolError(f"{hdr.name}: {err}") from err
        log.warning("%s refused: %s", hdr.name, err)
        return Reply(m.reply_header(hdr, m.U64.pack(1)))

    # ---- features ----------------------------------------------------------

    def _get_features(self, msg):
        m.decode_none(msg)
        return m.U64.pack(self.offered_features())

    def _set_features(self, msg):
        features = m.decode_u64(msg)
        extra = features & ~self.offered_features()
        if extra:
            raise RequestError(f"frontend acked features {extra:#x} that were never offered")
        self.acked_features = features
        for q in self.queues:
            q.event_idx = bool(features & VIRTIO_RING_F_EVENT_IDX)
        self.device.set_features(features & ~VHOST_USER_F_PROTOCOL_FEATURES)

    def _get_protocol_features(self, msg):
        m.decode_none(msg)
        return m.U64.pack(SUPPORTED_PROTOCOL_FEATURES)

    def _set_protocol_features(self, msg):
        features = m.decode_u64(msg)
        extra = features & ~SUPPORTED_PROTOCOL_FEATURES
        if extra:
            raise RequestError(f"frontend asked for protocol features {extra:#x} that were never offered")
        self.protocol_features = features

    def _get_queue_num(self, msg):
        m.decode_none(msg)
        return m.U64.pack(len(self.queues))

    def _set_owner(self, msg):
        m.decode_none(msg)
        self.owner = True

    def _reset_owner(self, msg):
        m.decode_none(msg)
        self.reset()

    def _reset_device(self, msg):
        m.decode_none(msg)
        if not self.has_protocol(PF.RESET_DEVICE):
            raise RequestError("RESET_DEVICE without the RESET_DEVICE protocol feature")
        self.reset()

    # ---- memory ------------------------------------------------------------

    def _take_region(self, msg, spec, fd):
        # The fd leaves msg.fds only once the Region owns it: a refused region's fd is
        # closed by handle() with the other unused fds (it used to leak).
        check_sealed(fd)
        try:
            region = Region(spec.gpa, spec.size, spec.uaddr, spec.mmap_offset, fd)
        except OSError as e:
            raise RequestError(f"unusable memory region fd: {e}") from e
        msg.fds.remove(fd)
        region.key = next(self._region_keys)
        return region

    def _set_mem_table(self, msg):
        specs = m.decode_mem_table(msg)
        regions = []
        try:
            for spec, fd in zip(specs, list(msg.fds)):
                regions.append(self._take_region(msg, spec, fd))
        except RequestError:
            for r in regions:
                r.close()
            raise
        self._check_memory(regions, regions)
        self.memory.replace(regions)
        self._memory_changed()

    def _get_max_mem_slots(self, msg):
        m.decode_none(msg)
        return m.U64.pack(MAX_MEM_SLOTS)

    def _add_mem_reg(self, msg):
        if not self.has_protocol(PF.CONFIGURE_MEM_SLOTS):
            raise RequestError("ADD_MEM_REG without the CONFIGURE_MEM_SLOTS protocol feature")
        spec = m.decode_mem_reg(msg, 1)
        region = self._take_region(msg, spec, msg.fds[0])
        self._check_memory(list(self.memory.regions) + [region], [region])
        self.memory.add(region)
        self._memory_changed()

    def _rem_mem_reg(self, msg):
        if not self.has_protocol(PF.CONFIGURE_MEM_SLOTS):
            raise RequestError("REM_MEM_REG without the CONFIGURE_MEM_SLOTS protocol feature")
        spec = m.decode_mem_reg(msg, min(len(msg.fds), 1))  # QEMU attaches the fd; it is closed
        self.memory.remove(spec.gpa, spec.size, spec.uaddr)
        self._memory_changed()

    def _check_memory(self, proposed, new):
        """Ask the device before installing a table (validate, then commit):
        a refused table is never installed; its new regions are unmapped."""
        try:
            self.device.check_memory(proposed)
        except Exception as e:
            for r in new:
                r.close()
            log.error("device refused the memory table: %s", e)
            raise RequestError(f"device refused the memory table: {e}") from e

    def _memory_changed(self):
        for q in self.queues:
            if self.started[q.index]:
                try:
                    q.map(self.memory)
                except GuestMemoryError as e:
                    log.error("queue %d: rings are no longer in guest memory (%s); stopping it",
                              q.index, e)
                    self._stop_queue(q)
        self.device.memory_changed(self.memory)

    # ---- rings -------------------------------------------------------------

    def _running(self, q):
        return self.started[q.index]

    def _set_vring_num(self, msg):
        index, num = m.decode_vring_state(msg)
        q = self.queue(index)
        if self._running(q):
            raise RequestError(f"SET_VRING_NUM on running queue {index}; GET_VRING_BASE first")
        q.set_num(num)

    def _set_vring_addr(self, msg):
        a = m.decode_vring_addr(msg)
        q = self.queue(a.index)
        q.set_addr(a.flags, a.desc, a.used, a.avail, a.log)
        if self._running(q):
            q.map(self.memory)

    def _set_vring_base(self, msg):
        index, base = m.decode_vring_state(msg)
        q = self.queue(index)
        if base > 0xFFFF:
            raise RequestError(f"queue {index}: base {base} does not fit a split ring's 16-bit index")
        if self._running(q):
            raise RequestError(f"SET_VRING_BASE on running queue {index}; GET_VRING_BASE first")
        q.set_base(base)
        if self._own_inflight and q.inflight is not None:
            q.inflight.reset()  # chains of an earlier run of this ring are not ours to redo

    def _get_vring_base(self, msg):
        index, _ = m.decode_vring_state(msg)
        q = self.queue(index)
        base = self._stop_queue(q)
        return m.VRING_STATE.pack(index, base)

    def _stop_queue(self, q):
        was = self.started[q.index]
        if was:
            self.device.queue_stopping(q)
        self.started[q.index] = False
        base = q.stop()
        if q.kick_fd is not None:
            os.close(q.kick_fd)
            q.kick_fd = None
            self.fds_changed = True
        if was:
            self.device.queue_stopped(q)
        return base

    def _take_vring_fd(self, msg, what):
        """(queue, fd) of a SET_VRING_KICK/CALL/ERR; the fd must be an eventfd."""
        index, fd = m.decode_vring_fd(msg)
        q = self.queue(index)
        if fd is not None:
            kind = fd_kind(fd)
            if kind != EVENTFD:
                raise RequestError(f"queue {index}: the {what} fd is {kind}, not an eventfd")
            msg.fds.remove(fd)
            os.set_blocking(fd, False)  # never block the loop on a full counter
        return q, fd

    @staticmethod
    def _replace(old, new):
        if old is not None:
            os.close(old)
        return new

    def _set_vring_kick(self, msg):
        q, fd = self._take_vring_fd(msg, "kick")
        q.kick_fd = self._replace(q.kick_fd, fd)
        self.fds_changed = True
        if fd is None:
            log.warning("queue %d: kick without fd (polling) is not supported; "
                        "the queue is processed only on other events", q.index)
        if not (self.acked_features or 0) & VHOST_USER_F_PROTOCOL_FEATURES:
            q.enabled = True
        self._start_queue(q)

    def _start_queue(self, q):
        if q.size == 0 or q.desc_uva is None:
            raise RequestError(f"queue {q.index} kicked before SET_VRING_NUM/SET_VRING_ADDR")
        if self.inflight is None and self.track_inflight:
            sizes = [x.max_size for x in self.queues]
            self._install_inflight(InflightArea.create(len(self.queues), max(sizes)))
            self._own_inflight = True
        q.map(self.memory)
        self.started[q.index] = True
        if q.enabled:
            self.device.queue_started(q)

    def _set_vring_call(self, msg):
        q, fd = self._take_vring_fd(msg, "call")
        q.call_fd = self._replace(q.call_fd, fd)

    def _set_vring_err(self, msg):
        q, fd = self._take_vring_fd(msg, "err")
        q.err_fd = self._replace(q.err_fd, fd)

    def _set_vring_enable(self, msg):
        index, num = m.decode_vring_state(msg)
        q = self.queue(index)
        if num not in (0, 1):
            raise RequestError(f"SET_VRING_ENABLE({num}) for queue {index}: only 0 or 1")
        was = q.enabled
        if self._running(q) and was and not num:
            self.device.queue_stopping(q)   # QEMU disables the rings before GET_VRING_BASE
        q.enabled = bool(num)
        if self._running(q) and was != q.enabled:
            if q.enabled:
                self.device.queue_started(q)
            else:
                self.device.queue_stopped(q)

    def runnable(self, q):
        return self.started[q.index] and q.enabled and q.broken is None

    def process(self, q):
        """Let the device handle up to QUEUE_BUDGET of q's chains; never raises.
        Returns True when the budget ran out: call again (the loop reschedules it)."""
        if not self.runnable(q):
            return False
        q.budget, q.budget_spent = QUEUE_BUDGET, False
        try:
            self.device.handle_queue(q, self.memory)
        except VringError as e:
            self.counters["ring_errors"] += 1
            log.error("queue %d: %s; the queue is stopped until the driver resets it", q.index, e)
        except Exception:  # a device bug must not take the daemon down
            self.counters["ring_errors"] += 1
            log.exception("queue %d: device failed while handling the queue", q.index)
        finally:
            q.budget = None
        try:
            q.signal()
        except Exception as e:  # e.g. the rings were unmapped under us
            log.warning("queue %d: cannot signal the driver: %s", q.index, e)
        return q.budget_spent and self.runnable(q)

    # ---- backend channel ---------------------------------------------------

    def _set_backend_req_fd(self, msg):
        if not self.has_protocol(PF.BACKEND_REQ):
            raise RequestError("SET_BACKEND_REQ_FD without the BACKEND_REQ protocol feature")
        m._expect(msg, 0, 1)
        fd = msg.fds.pop()
        try:
            sock = socket.socket(fileno=fd)
        except OSError as e:
            os.close(fd)
            raise RequestError(f"SET_BACKEND_REQ_FD: fd is not a socket ({e.strerror})") from e
        self._close_backend_channel()
        self.backend_channel = Connection(sock)  # non-blocking; acks are read by the loop
        self.fds_changed = True

    def _close_backend_channel(self):
        if self.backend_channel is not None:
            self.backend_channel.close()
            self.backend_channel = None
            self.fds_changed = True

    def notify_config_change(self):
        """Ask the frontend to raise a config interrupt. Returns False if it cannot."""
        if self.backend_channel is None:
            log.warning("cannot signal a config change: the frontend set up no backend channel")
            return False
        flags = m.VERSION
        if self.has_protocol(PF.REPLY_ACK):
            flags |= m.FLAG_NEED_REPLY  # the ack is read by the event loop
        try:
            self.backend_channel.send(m.encode(m.BackendRequest.CONFIG_CHANGE_MSG, b"", flags),
                                      timeout=BACKEND_SEND_TIMEOUT)
        except (ConnectionClosed, OSError) as e:
            log.warning("backend channel failed (%s); closing it", e)
            self._close_backend_channel()
            return False
        return True

    def read_backend_channel(self):
        """Consume one reply (ack) from the backend channel."""
        try:
            data = self.backend_channel.sock.recv(4096)
        except (BlockingIOError, InterruptedError, socket.timeout):
            return
        except OSError:
            data = b""
        if not data:
            log.warning("frontend closed the backend channel")
            self._close_backend_channel()

    # ---- config space ------------------------------------------------------

    def _get_config(self, msg):
        if not self.has_protocol(PF.CONFIG):
            raise RequestError("GET_CONFIG without the CONFIG protocol feature")
        c = m.decode_config(msg, with_data=False)
        try:
            data = self.device.read_config(c.offset, c.size)
        except ValueError as e:
            raise RequestError(f"GET_CONFIG offset {c.offset} size {c.size}: {e}") from e
        return m.encode_config(c.offset, c.flags, data)

    def _set_config(self, msg):
        if not self.has_protocol(PF.CONFIG):
            raise RequestError("SET_CONFIG without the CONFIG protocol feature")
        c = m.decode_config(msg, with_data=True)
        try:
            self.device.write_config(c.offset, c.data)
        except ValueError as e:
            raise RequestError(f"SET_CONFIG offset {c.offset} size {c.size}: {e}") from e

    # ---- inflight tracking -------------------------------------------------

    def _get_inflight_fd(self, msg):
        if not self.has_protocol(PF.INFLIGHT_SHMFD):
            raise RequestError("GET_INFLIGHT_FD without the INFLIGHT_SHMFD protocol feature")
        req = m.decode_inflight(msg, 0)
        if not 1 <= req.num_queues <= len(self.queues) or not 1 <= req.queue_size <= 32768:
            raise RequestError(f"GET_INFLIGHT_FD for {req.num_queues} queues of "
                               f"{req.queue_size}: out of range")
        area = InflightArea.create(req.num_queues, req.queue_size)
        self._install_inflight(area)
        fd = os.dup(area.fd)
        reply = m.Inflight(area.size, 0, req.num_queues, req.queue_size)
        packed = m.INFLIGHT if len(msg.payload) == m.INFLIGHT.size else m.INFLIGHT_PACKED
        return Reply(packed.pack(*reply), [fd])

    def _set_inflight_fd(self, msg):
        if not self.has_protocol(PF.INFLIGHT_SHMFD):
            raise RequestError("SET_INFLIGHT_FD without the INFLIGHT_SHMFD protocol feature")
        req = m.decode_inflight(msg, 1)
        fd = msg.fds.pop()
        area = InflightArea.attach(fd, req.mmap_size, req.mmap_offset, req.num_queues,
                                   req.queue_size, max_queues=len(self.queues))
        self._install_inflight(area)

    def _install_inflight(self, area):
        if self.inflight is not None:
            self.inflight.close()
        self.inflight = area
        self._own_inflight = False
        for q in self.queues:
            q.inflight = area.queue(q.index) if q.index < area.num_queues else None

    # ---- reset / teardown --------------------------------------------------

    def reset(self):
        for q in self.queues:
            self._stop_queue(q)
            q.close_fds()
            q.reset()
        self.fds_changed = True
        self.acked_features = None
        self.device.reset()

    def disconnect(self):
        """The frontend went away: release everything it gave us."""
        self.reset()
        self.memory.clear()
        self._close_backend_channel()
        if self.inflight is not None:
            self.inflight.close()
            self.inflight = None
        self._own_inflight = False
        for q in self.queues:
            q.inflight = None
        self._init_session_state()
        self.sync_fds()

    # ---- restart support (vhostuser/restart.py) ------------------------------

    def kept_fds(self):
        """{(kind, index): fd} of every fd this session holds."""
        out = {("mem", r.key if r.key is not None else id(r)): r.fd for r in self.memory.regions}
        for q in self.queues:
            for kind in ("kick", "call", "err"):
                fd = getattr(q, kind + "_fd")
                if fd is not None:
                    out[(kind, q.index)] = fd
        if self.backend_channel is not None:
            out[("backend", 0)] = self.backend_channel.fileno()
        if self.inflight is not None:
            out[("inflight", 0)] = self.inflight.fd
        return out

    def sync_fds(self):
        """Tell the observer which fds came and went since the last call."""
        if self.observer is None:
            return
        now = self.kept_fds()
        for key in self._kept:
            if key not in now:
                self.observer.fd_removed(*key)
        for key, fd in now.items():  # a replaced fd: fd_added again (same file or not)
            if self._kept.get(key) != fd:
                self.observer.fd_added(key[0], key[1], fd)
        self._kept = now

    def snapshot(self):
        """The protocol state as plain data (fds are referred to by (kind, index))."""
        area = self.inflight
        return {
            "owner": self.owner, "acked_features": self.acked_features,
            "protocol_features": self.protocol_features, "started": list(self.started),
            "regions": [[r.key, r.gpa, r.size, r.uaddr, r.mmap_offset]
                        for r in self.memory.regions],
            "queues": [{"size": q.size, "enabled": q.enabled, "flags": q.addr_flags,
                        "desc": q.desc_uva, "used": q.used_uva, "avail": q.avail_uva,
                        "log": q.log_addr, "event_idx": q.event_idx, "broken": q.broken}
                       for q in self.queues],
            "inflight": None if area is None else {
                "size": area.size, "offset": area.offset, "num_queues": area.num_queues,
                "queue_size": area.queue_size, "own": self._own_inflight},
        }

    def restore(self, snap, fds):
        """Rebuild a session from snapshot() and its fds {(kind, index): fd} (all taken).
        Started rings continue from their used ring and inflight area: chains popped
        and not completed before the restart are popped again first."""
        fds = dict(fds)
        try:
            self._restore(snap, fds)
        finally:
            for fd in fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._kept = self.kept_fds()
        self.fds_changed = True

    def _restore(self, snap, fds):
        self.owner = snap["owner"]
        self.protocol_features = snap["protocol_features"]
        self.acked_features = snap["acked_features"]
        regions = []
        for key, gpa, size, uaddr, offset in snap["regions"]:
            fd = fds.pop(("mem", key))
            region = Region(gpa, size, uaddr, offset, fd)
            region.key = key
            regions.append(region)
        if regions:
            self._region_keys = itertools.count(max(r.key for r in regions) + 1)
            self.memory.replace(regions)
        if self.acked_features is not None:
            for q in self.queues:
                q.event_idx = bool(self.acked_features & VIRTIO_RING_F_EVENT_IDX)
            self.device.set_features(self.acked_features & ~VHOST_USER_F_PROTOCOL_FEATURES)
        if len(self.memory):
            self.device.memory_changed(self.memory)
        area = snap.get("inflight")
        if area is not None and ("inflight", 0) in fds:
            self._install_inflight(InflightArea.attach(
                fds.pop(("inflight", 0)), area["size"], area["offset"], area["num_queues"],
                area["queue_size"], max_queues=len(self.queues)))
            self._own_inflight = area["own"]
        if ("backend", 0) in fds:
            sock = socket.socket(fileno=fds.pop(("backend", 0)))
            self.backend_channel = Connection(sock)
            self.backend_channel.sock.settimeout(1.0)
        for q, qs in zip(self.queues, snap["queues"]):
            if qs["size"]:
                q.set_num(qs["size"])
            q.set_addr(qs["flags"], qs["desc"], qs["used"], qs["avail"], qs["log"])
            for kind in ("kick", "call", "err"):
                setattr(q, kind + "_fd", fds.pop((kind, q.index), None))
            q.enabled = qs["enabled"]
            q.event_idx = qs["event_idx"]
            self.started[q.index] = snap["started"][q.index]
            if self.started[q.index]:
                try:
                    heads = q.recover(self.memory)
                except (GuestMemoryError, RequestError) as e:
                    log.error("queue %d: cannot resume after the restart: %s", q.index, e)
                    self.started[q.index] = False
                    continue
                if heads:
                    log.info("queue %d: %d chain(s) in flight at the restart are redone",
                             q.index, len(heads))
                q.broken = qs["broken"]
                if q.call_fd is not None:  # an interrupt lost in the restart is sent now
                    try:
                        os.write(q.call_fd, (1).to_bytes(8, "little"))
                    except OSError:
                        pass
                if q.enabled:
                    self.device.queue_started(q)

    def watched_fds(self):
        """fds the event loop should read: kick fds and the backend channel."""
        out = [(q.kick_fd, ("kick", q)) for q in self.queues if q.kick_fd is not None]
        if self.backend_channel is not None:
            out.append((self.backend_channel.fileno(), ("backend", None)))
        return out
