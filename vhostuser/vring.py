"""Split virtqueue, device side.

The hot path (walking descriptor chains, writing the used ring, deciding
whether to interrupt) is C (c_ext/vring.c, built by cffi as
vhostuser._vring_c).  vhostuser.vring_py is its pure-Python twin, used in
differential tests and selected by vhostuser.implementation (VUB_PURE_PYTHON=1);
it is never a silent fallback.

Life of a queue, as driven by the protocol handler::

    q = VirtQueue(index, max_size)
    q.set_num(n); q.set_addr(flags, desc, used, avail, log); q.set_base(i)
    q.kick_fd, q.call_fd = ...            # handler owns (close_fds())
    q.event_idx = bool(features & EVENT_IDX)
    q.map(memory); q.enabled = True       # ring started
    ... on kick: while (c := q.pop(memory)) is not None:
                     q.push(c.head, written_bytes)
                 q.signal()
    base = q.stop()                       # GET_VRING_BASE

pop() returns None unless the queue is enabled and ready (size set and
rings mapped).  A malformed chain whose head is valid comes back as a
Chain with `error` set and no segments: complete it with push(head, 0).
Ring-level corruption raises VringError and marks the queue broken; a
broken queue pops nothing until set_base() or reset().
"""

import logging
import os
import struct
from typing import NamedTuple

from . import implementation
from . import vring_py as _py
from .errors import GuestMemoryError, RequestError, VringError
from .vring_py import (  # noqa: F401  (re-exported constants)
    MESSAGES, RING_ERRORS, VU_DESC_F_INDIRECT, VU_DESC_F_NEXT,
    VU_DESC_F_WRITE, VU_E_ARG, VU_E_AVAIL_IDX, VU_E_BUF_ADDR, VU_E_BUF_EMPTY,
    VU_E_FULL, VU_E_HEAD, VU_E_INDIRECT_ADDR, VU_E_INDIRECT_LEN,
    VU_E_INDIRECT_NEXT, VU_E_LOOP, VU_E_NESTED, VU_E_NEXT, VU_E_ORDER,
    VU_EMPTY, VU_MAX_QSIZE, VU_OK)

DEFAULT_MAX_SEGMENTS = 1024
VHOST_VRING_F_LOG = 1

log = logging.getLogger(__name__)

# struct vu_seg (c_ext/vu_types.h): addr, len, flags (VU_SEG_WRITE = 1)
SEG = struct.Struct("<QII")
_SEG_ITER = SEG.iter_unpack
_ONE = (1).to_bytes(8, "little")


# c_module(): the compiled hot path (ffi, lib), or ImportError telling how to build it
c_module = implementation.Compiled("vhostuser._vring_c", "build_vring.py")


class Segment(NamedTuple):
    """One buffer of a chain, in guest-physical addresses."""
    addr: int
    length: int
    writable: bool


class Chain:
    """A popped descriptor chain.

    head: the id to give back to push().  segments: device-readable ones
    first, then device-writable ones (the ring enforces that order).
    error: None, or why the chain was malformed; then segments == [] and
    the caller must complete it with push(head, 0).
    """
    __slots__ = ("head", "_segments", "error", "_split", "raw")

    def __init__(self, head, segments, error=None, raw=None):
        """segments: a list of Segment; or None with raw (decoded on first use)."""
        self.head = head
        self._segments = segments
        self.error = error
        self._split = None
        # The segments as packed struct vu_seg records (<QII: addr, len,
        # flags), when the C pop produced them; None otherwise.
        self.raw = raw

    @property
    def segments(self):
        segs = self._segments
        if segs is None:
            new = tuple.__new__
            segs = self._segments = [new(Segment, (a, ln, f == 1))
                                     for a, ln, f in _SEG_ITER(self.raw)]
        return segs

    @segments.setter
    def segments(self, value):
        self._segments = value

    def _split_at(self):
        if self._split is None:
            segs = self.segments
            k = 0
            while k < len(segs) and not segs[k].writable:
                k += 1
            self._split = k
        return self._split

    def readable(self):
        """The device-readable segments (a new list)."""
        return self.segments[:self._split_at()]

    def writable(self):
        """The device-writable segments (a new list)."""
        return self.segments[self._split_at():]

    @property
    def readable_len(self):
        return sum(s.length for s in self.segments[:self._split_at()])

    @property
    def writable_len(self):
        return sum(s.length for s in self.segments[self._split_at():])

    def __repr__(self):
        if self.error:
            return f"Chain(head={self.head}, error={self.error!r})"
        return f"Chain(head={self.head}, segments={self.segments!r})"


def pack_segments(segments):
    """Segments as packed struct vu_seg records (the layout of Chain.raw)."""
    return b"".join([SEG.pack(a, ln, 1 if w else 0) for a, ln, w in segments])


def _always_present(memory, hva):
    """True unless hva is in a hugetlbfs region (see VirtQueue.map)."""
    for r in getattr(memory, "regions", ()):
        if r.hva <= hva < r.hva + r.size:
            return not r.huge
    return True


def _pow2(n):
    return n > 0 and n & (n - 1) == 0


class VirtQueue:
    """One split virtqueue of a vhost-user device (device side)."""

    def __init__(self, index, max_size, max_segments=DEFAULT_MAX_SEGMENTS):
        if not (_pow2(max_size) and max_size <= VU_MAX_QSIZE):
            raise ValueError(f"max_size {max_size} is not a power of two <= 32768")
        self.index = index
        self.max_size = max_size
        self.use_c = implementation.use_c()   # C or the Python twin, fixed at birth
        self.max_segments = max_segments
        self.kick_fd = None
        self.inflight = None  # InflightQueue (GET/SET_INFLIGHT_FD), set by the handler
        self.resubmit = []    # heads popped by a previous process, to pop again first
        self.call_fd = None
        self.err_fd = None
        # Fairness: while budget is not None, pop() returns at most that many chains and
        # then None with budget_spent set (the caller comes back later). Set by Backend.
        self.budget = None
        self.budget_spent = False
        self.signal_errors = 0
        if self.use_c:
            mod = c_module()
            self._ffi, self._lib = mod.ffi, mod.lib
            ffi = self._ffi
            self._c_la = ffi.new("uint16_t[1]")
            self._c_head = ffi.new("uint16_t[1]")
            self._c_used = ffi.new("uint16_t[1]")
            self._c_nout = ffi.new("uint32_t[1]")
            self._c_segs = ffi.new("struct vu_seg[]", max_segments)
            self._c_segbuf = ffi.buffer(self._c_segs)
            self._c_regs = ffi.new("struct vu_region[]", 0)
        self.reset()

    # --- configuration (vhost-user messages) ---------------------------

    def reset(self):
        """Back to the fresh state.  kick/call/err fds are left as they are
        (neither closed nor forgotten): see close_fds()."""
        self.size = 0
        self.enabled = False
        self.last_avail_idx = 0
        self.used_idx = 0
        self.event_idx = False
        self.broken = None
        self.desc_uva = self.avail_uva = self.used_uva = 0
        self.log_addr = 0
        self.addr_flags = 0
        self._in_flight = 0
        self._signalled_used = 0
        self.resubmit = []
        self._unmap()

    def _unmap(self):
        self._huge_rings = []
        self._mapped = False
        self._memory = None
        self._mem_gen = None
        self._desc_hva = self._avail_hva = self._used_hva = 0
        self._armed = None          # last avail_event written (EVENT_IDX)
        self._regions = []
        self._nregs = 0

    def set_num(self, n):
        if not (1 <= n <= self.max_size and _pow2(n)):
            raise RequestError(
                f"queue {self.index}: size {n} is not a power of two in "
                f"1..{self.max_size}")
        self.size = n
        self._unmap()

    def set_addr(self, flags, desc_uva, used_uva, avail_uva, log_addr):
        self.addr_flags = flags
        self.desc_uva = desc_uva
        self.used_uva = used_uva
        self.avail_uva = avail_uva
        self.log_addr = log_addr
        self._unmap()

    def set_base(self, idx):
        if not 0 <= idx <= 0xFFFF:
            raise RequestError(f"queue {self.index}: base {idx} is not a 16-bit index")
        self.last_avail_idx = idx
        self.used_idx = idx
        self._signalled_used = idx
        self._in_flight = 0
        self._armed = None
        self.broken = None
        self.resubmit = []

    def map(self, memory):
        """Translate the ring addresses through memory (frontend virtual
        addresses); call when the ring starts and whenever the memory
        table changes.  Raises GuestMemoryError / RequestError."""
        n = self.size
        if n == 0:
            raise RequestError(f"queue {self.index}: size not set")
        if self.desc_uva % 16 or self.avail_uva % 2 or self.used_uva % 4:
            raise RequestError(
                f"queue {self.index}: misaligned ring (desc {self.desc_uva:#x}, "
                f"avail {self.avail_uva:#x}, used {self.used_uva:#x})")
        self._unmap()
        try:
            desc = memory.translate_uva(self.desc_uva, 16 * n)
            avail = memory.translate_uva(self.avail_uva, 6 + 2 * n)
            used = memory.translate_uva(self.used_uva, 6 + 8 * n)
        except GuestMemoryError as exc:
            raise GuestMemoryError(f"queue {self.index}: ring not in guest memory: {exc}")
        self._desc_hva, self._avail_hva, self._used_hva = desc, avail, used
        # Rings on huge pages: a discarded one (the guest reported it) is refilled from the
        # hugetlbfs pool on the next touch, which is SIGBUS if the pool is empty. Those
        # rings are checked (MADV_POPULATE_READ) before every access instead.
        self._huge_rings = [(a, ln) for a, ln in ((desc, 16 * n), (avail, 6 + 2 * n),
                                                  (used, 6 + 8 * n))
                            if not _always_present(memory, a)]
        self._set_regions(memory.c_table())
        self._memory = memory
        self._mem_gen = memory.generation
        self._mapped = True

    def _set_regions(self, table):
        table = sorted(table)
        self._regions = table
        self._nregs = len(table)
        if self.use_c:
            self._c_regs = self._ffi.new("struct vu_region[]", table or 0)

    def _check_mapping(self, memory=None):
        """Re-map if the memory table changed behind our back."""
        if memory is None:
            memory = self._memory
        if memory is self._memory and memory.generation == self._mem_gen:
            return True
        try:
            self.map(memory)
        except RequestError:
            return False
        return True

    @property
    def ready(self):
        return self.size != 0 and self._mapped

    @property
    def in_flight(self):
        return self._in_flight

    # --- data path -----------------------------------------------------

    def _rings_ok(self):
        """False (and the queue broken) if a ring page on huge pages cannot be touched."""
        for addr, length in self._huge_rings:
            if not self._memory.present(addr, length):
                self.broken = (f"queue {self.index}: a ring page has no memory behind it (the "
                               "guest reported its own ring and the hugetlbfs pool is empty)")
                return False
        return True

    def _ring_error(self, rc):
        msg = (f"queue {self.index}: {_py.message(rc)} "
               f"(last_avail_idx {self.last_avail_idx}, size {self.size})")
        self.broken = msg
        raise VringError(msg)

    def _chain_error(self, rc, head):
        return Chain(head, [], f"queue {self.index} head {head}: {_py.message(rc)}")

    def pop(self, memory):
        """Next available chain, or None; marks it in the inflight area if any."""
        if self.budget is not None and self.budget <= 0:
            self.budget_spent = True
            return None
        if self.resubmit and self.enabled and self._mapped and self.broken is None:
            chain = self._pop_resubmitted(memory)
            if self.budget is not None:
                self.budget -= 1
            return chain
        chain = self._pop(memory)
        if chain is not None:
            if self.budget is not None:
                self.budget -= 1
            if self.inflight is not None:
                self.inflight.mark(chain.head)
        return chain

    def unpop(self, head):
        """Give back the chain popped last, not completed: the next pop (also after
        GET_VRING_BASE and a restart from the base it returned) finds it again, as
        QEMU's virtqueue_rewind. False, nothing changed, if head is not the chain at
        last_avail_idx - 1 of the avail ring."""
        if not self._mapped or self._in_flight <= 0 or self.resubmit:
            return False
        prev = (self.last_avail_idx - 1) & 0xFFFF
        if _py._ld16(self._avail_hva + 4 + 2 * (prev % self.size)) != head:
            return False
        self.last_avail_idx = prev
        self._in_flight -= 1
        if self.inflight is not None:
            self.inflight.unmark(head)
        return True

    def _pop_resubmitted(self, memory):
        """A chain a killed process popped but never completed (already marked inflight)."""
        head = self.resubmit.pop(0)
        if memory is not self._memory or memory.generation != self._mem_gen:
            self._check_mapping(memory)
        self._in_flight += 1
        w = _py._Walk(self._regions, self.max_segments)
        rc = _py._walk_chain(w, self._desc_hva, self.size, head)
        if rc != VU_OK:
            return self._chain_error(rc, head)
        return Chain(head, [Segment(a, ln, f == 1) for a, ln, f in w.segs])

    def recover(self, memory):
        """After a restart, for a started queue whose rings are mapped: take the
        used index from the used ring and the chains popped but not completed
        from the inflight area; they are popped again (resubmit) before new ones.
        Returns the resubmitted heads."""
        self.map(memory)
        used = _py._ld16(self._used_hva + 2)
        self.used_idx = self._signalled_used = used
        heads = []
        if self.inflight is not None:
            self.inflight.recover(used)
            heads = [h for h in self.inflight.pending() if h < self.size]
        self.last_avail_idx = (used + len(heads)) & 0xFFFF
        self.resubmit = list(heads)
        self._in_flight = 0
        self._armed = None
        return heads

    def _pop(self, memory):
        """Next available chain, or None (empty, disabled, not ready, broken)."""
        if self.broken is not None or not self.enabled or not self._mapped:
            return None
        if memory is not self._memory or memory.generation != self._mem_gen:
            if not self._check_mapping(memory):
                return None
        if self._huge_rings and not self._rings_ok():
            raise VringError(self.broken)
        if self.use_c:
            chain = self._pop_c()
        else:
            chain = self._pop_py()
        if chain is not None or not self.event_idx:
            return chain
        # Empty: tell the driver where to kick (avail_event), then look again
        # in case it added buffers meanwhile.  Once armed at this index,
        # further empty polls need no write and no fence.
        while True:
            la = self.last_avail_idx
            if self._armed == la:
                return None
            self._armed = la
            if self.use_c:
                again = self._lib.vu_arm(self._avail_hva, self._used_hva, self.size, la)
            else:
                again = _py.vu_arm(self._avail_hva, self._used_hva, self.size, la)
            if again != 1:
                return None
            chain = self._pop_c() if self.use_c else self._pop_py()
            if chain is not None:
                return chain

    def _pop_c(self):
        la = self._c_la
        la[0] = self.last_avail_idx
        rc = self._lib.vu_pop(self._c_regs, self._nregs, self._desc_hva,
                              self._avail_hva, self.size, la, self._c_head,
                              self._c_segs, self.max_segments, self._c_nout)
        if rc == 0:
            self.last_avail_idx = la[0]
            self._in_flight += 1
            # segments are decoded from raw only if someone asks for them
            return Chain(self._c_head[0], None, raw=self._c_segbuf[:16 * self._c_nout[0]])
        if rc == 1:
            return None
        if rc in RING_ERRORS:
            self._ring_error(rc)
        self.last_avail_idx = la[0]
        self._in_flight += 1
        return self._chain_error(rc, self._c_head[0])

    def _pop_py(self):
        rc, la, head, segs = _py.vu_pop(self._regions, self._desc_hva, self._avail_hva,
                                        self.size, self.last_avail_idx, self.max_segments)
        if rc == VU_EMPTY:
            return None
        if rc in RING_ERRORS:
            self._ring_error(rc)
        self.last_avail_idx = la
        self._in_flight += 1
        if rc != VU_OK:
            return self._chain_error(rc, head)
        return Chain(head, [Segment(a, ln, f == 1) for a, ln, f in segs])

    def push(self, head, length):
        """Complete chain `head` with `length` bytes written (0..2^32-1, else
        OverflowError); publishes the used idx.  Returns False (nothing
        written) if the queue is stopped or its rings are no longer mapped."""
        if not self._can_push():
            return False
        if self.inflight is not None:
            self.inflight.pre_put(head)
        if self.use_c:
            u = self._c_used
            u[0] = self.used_idx
            rc = self._lib.vu_push(self._used_hva, self.size, u, head, length)
            if rc == 0:
                self.used_idx = u[0]
        else:
            if not 0 <= length <= 0xFFFFFFFF:
                raise OverflowError(f"used length {length} does not fit in 32 bits")
            rc, used = _py.vu_push(self._used_hva, self.size, self.used_idx, head, length)
            if rc == 0:
                self.used_idx = used
        if rc == 0:
            self._completed((head,))
            return True
        raise VringError(f"queue {self.index}: cannot complete head {head}: "
                         f"{_py.message(rc)}")

    def push_many(self, elems):
        """Complete several chains [(head, length), ...], one used idx update."""
        elems = list(elems)
        if self.inflight is not None:  # one at a time: the inflight area records one put
            done = False
            for head, length in elems:
                done = self.push(head, length) or done
            return done
        if not elems or not self._can_push():
            return False
        if self.use_c:
            u = self._c_used
            u[0] = self.used_idx
            arr = self._ffi.new("struct vu_used_elem[]", elems)
            rc = self._lib.vu_push_n(self._used_hva, self.size, u, arr, len(elems))
            if rc == 0:
                self.used_idx = u[0]
        else:
            rc, self.used_idx = _py.vu_push_n(self._used_hva, self.size,
                                              self.used_idx, elems)
        if rc != 0:
            raise VringError(f"queue {self.index}: cannot complete {elems!r}: "
                             f"{_py.message(rc)}")
        self._completed(head for head, _len in elems)
        return True

    def _can_push(self):
        """False if the queue is stopped or its rings are no longer mapped;
        VringError if a ring page on huge pages cannot be touched."""
        m = self._memory
        if m is None or (m.generation != self._mem_gen and not self._check_mapping()):
            return False
        if self._huge_rings and not self._rings_ok():
            raise VringError(self.broken)
        return True

    def _completed(self, heads):
        """Bookkeeping after used entries were published: in-flight count
        and the inflight area's marks."""
        for head in heads:
            self._in_flight -= 1
            if self.inflight is not None:
                self.inflight.clear(head, self.used_idx)

    def need_signal(self):
        """Does the driver want an interrupt for what was used since the
        last call?  (EVENT_IDX: used_event; else VRING_AVAIL_F_NO_INTERRUPT.)"""
        if not self._mapped or (self._huge_rings and not self._rings_ok()):
            return False
        old, new = self._signalled_used, self.used_idx
        self._signalled_used = new
        if old == new:
            return False
        if self.use_c:
            rc = self._lib.vu_need_signal(self._avail_hva, self._used_hva, self.size,
                                          self.event_idx, old, new)
        else:
            rc = _py.vu_need_signal(self._avail_hva, self._used_hva, self.size,
                                    self.event_idx, old, new)
        return rc == 1

    def signal(self):
        """Interrupt the driver through call_fd if it wants one.  Returns
        whether an interrupt was due."""
        if not self.need_signal():
            return False
        fd = self.call_fd
        if fd is not None:
            try:
                os.write(fd, _ONE)
            except BlockingIOError:
                pass  # the eventfd counter is saturated: already signalled
            except OSError as e:  # the frontend's fd, not ours to fail on: never raise
                self.signal_errors += 1
                if self.signal_errors == 1:
                    log.warning("queue %d: cannot signal the call fd: %s", self.index, e)
        return True

    def diagnostics(self):
        """Ring indices for troubleshooting; reads the driver's fields, so call it
        on the loop's thread only (the ring may be unmapped under another thread)."""
        d = {"index": self.index, "size": self.size, "enabled": self.enabled,
             "last_avail_idx": self.last_avail_idx, "used_idx": self.used_idx,
             "in_flight": self._in_flight, "broken": self.broken}
        if self._mapped and not (self._huge_rings and not self._rings_ok()):
            d["driver_avail_idx"] = self.avail_idx()
            if self.event_idx:  # the driver's used_event: its last used idx seen
                d["driver_used_event"] = _py._ld16(self._avail_hva + 4 + 2 * self.size)
        return d

    def avail_idx(self):
        """The driver's current avail idx (for diagnostics), or None."""
        if not self._mapped:
            return None
        if self.use_c:
            return self._lib.vu_avail_idx(self._avail_hva)
        return _py.vu_avail_idx(self._avail_hva)

    def stop(self):
        """GET_VRING_BASE: send an interrupt still due for completed chains,
        disable, unmap, return the next avail idx to use."""
        if self._mapped and self._check_mapping():
            try:
                self.signal()
            except OSError:
                pass
        self.enabled = False
        self._unmap()
        return self.last_avail_idx

    def close_fds(self):
        for name in ("kick_fd", "call_fd", "err_fd"):
            fd = getattr(self, name)
            if fd is not None:
                setattr(self, name, None)
                try:
                    os.close(fd)
                except OSError:
                    pass

    def __repr__(self):
        state = "broken" if self.broken else ("enabled" if self.enabled else "disabled")
        return (f"VirtQueue({self.index}, size={self.size}, {state}, "
                f"ready={self.ready}, last_avail={self.last_avail_idx}, "
                f"used={self.used_idx}, in_flight={self._in_flight}, "
                f"{'C' if self.use_c else 'Python'})")
