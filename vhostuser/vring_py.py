"""Pure-Python twin of c_ext/vring.c (split virtqueue, device side).

Every function here has the same semantics and return codes as its C
counterpart; the differential tests (tests/test_vring_diff.py) hold them
to it.  Guest memory is read and written with ctypes at host addresses,
exactly where the C code would touch it.  Python cannot issue memory
fences, so this twin is for tests and for explaining the C code, not for
serving a guest: vhostuser.vring uses the C module unless told otherwise.

Conventions (C out-parameters become return values):

- regions: a sequence of (gpa, size, hva), sorted by gpa, not overlapping
  (MemoryTable.c_table()).
- vu_translate(regions, gpa, length) -> hva or None
- vu_range_ok(regions, gpa, length) -> 1 or 0
- vu_pop(regions, desc_hva, avail_hva, qsize, last_avail, max_out)
      -> (rc, last_avail, head, segs); segs is a list of (addr, len, flags)
      (empty unless rc == VU_OK); head is None where C leaves it unset.
- vu_push(used_hva, qsize, used_idx, id, length) -> (rc, used_idx)
- vu_push_n(used_hva, qsize, used_idx, elems) -> (rc, used_idx)
- vu_need_signal(avail_hva, used_hva, qsize, event_idx, old, new) -> int
- vu_set_avail_event(used_hva, qsize, val) -> rc
- vu_arm(avail_hva, used_hva, qsize, last_avail) -> int
- vu_avail_idx(avail_hva) -> int
"""

import ctypes
import struct

U64_MAX = (1 << 64) - 1

VU_SEG_WRITE = 1
VU_DESC_F_NEXT = 1
VU_DESC_F_WRITE = 2
VU_DESC_F_INDIRECT = 4
VU_AVAIL_F_NO_INTERRUPT = 1
VU_MAX_QSIZE = 32768
VU_MAX_INDIRECT = 32768

VU_OK = 0
VU_EMPTY = 1
# ring errors: the queue is broken, last_avail is not advanced
VU_E_ARG = -1
VU_E_AVAIL_IDX = -2
VU_E_HEAD = -3
# chain errors: the head is consumed and must be completed with length 0
VU_E_LOOP = -10
VU_E_NEXT = -11
VU_E_NESTED = -12
VU_E_INDIRECT_NEXT = -13
VU_E_INDIRECT_LEN = -14
VU_E_INDIRECT_ADDR = -15
VU_E_BUF_ADDR = -16
VU_E_BUF_EMPTY = -17
VU_E_ORDER = -18
VU_E_FULL = -19

RING_ERRORS = frozenset({VU_E_ARG, VU_E_AVAIL_IDX, VU_E_HEAD})

MESSAGES = {
    VU_E_ARG: "queue size is not a power of two in 1..32768",
    VU_E_AVAIL_IDX: "avail idx is more than the queue size ahead of the device",
    VU_E_HEAD: "avail ring holds a head index >= the queue size",
    VU_E_LOOP: "descriptor chain loops (longer than its table)",
    VU_E_NEXT: "descriptor next index is outside its table",
    VU_E_NESTED: "indirect descriptor inside an indirect table",
    VU_E_INDIRECT_NEXT: "indirect descriptor has F_NEXT set",
    VU_E_INDIRECT_LEN: "indirect table length is 0, not a multiple of 16, or too large",
    VU_E_INDIRECT_ADDR: "indirect table is not inside one guest memory region",
    VU_E_BUF_ADDR: "buffer is not inside guest memory",
    VU_E_BUF_EMPTY: "buffer of length 0",
    VU_E_ORDER: "device-readable buffer after a device-writable one",
    VU_E_FULL: "chain has more buffers than the device accepts",
}

_DESC = struct.Struct("<QIHH")
_U16 = ctypes.c_uint16
_U32 = ctypes.c_uint32


def _qsize_ok(qsize):
    return 1 <= qsize <= VU_MAX_QSIZE and qsize & (qsize - 1) == 0


def _ld16(hva):
    return _U16.from_address(hva).value


def _st16(hva, v):
    _U16.from_address(hva).value = v & 0xFFFF


def _st32(hva, v):
    _U32.from_address(hva).value = v & 0xFFFFFFFF


def _find(regions, gpa):
    """Index of the region holding gpa, or -1 (last region starting <= gpa)."""
    lo, hi = 0, len(regions)
    while lo < hi:
        mid = (lo + hi) // 2
        if regions[mid][0] <= gpa:
            lo = mid + 1
        else:
            hi = mid
    if lo == 0:
        return -1
    g, size, _ = regions[lo - 1]
    if gpa - g >= size:
        return -1
    return lo - 1


def vu_translate(regions, gpa, length):
    i = _find(regions, gpa)
    if i < 0:
        return None
    g, size, hva = regions[i]
    off = gpa - g
    if length > size - off:
        return None
    return hva + off


def vu_range_ok(regions, gpa, length):
    if length > U64_MAX - gpa:
        return 0
    while True:
        i = _find(regions, gpa)
        if i < 0:
            return 0
        g, size, _ = regions[i]
        room = size - (gpa - g)
        if length <= room:
            return 1
        length -= room
        gpa += room


class _Walk:
    __slots__ = ("regions", "max_out", "segs", "seen_write")

    def __init__(self, regions, max_out):
        self.regions = regions
        self.max_out = max_out
        self.segs = []
        self.seen_write = False

    def add(self, addr, length, flags):
        if length == 0:
            return VU_E_BUF_EMPTY
        if not vu_range_ok(self.regions, addr, length):
            return VU_E_BUF_ADDR
        if flags & VU_DESC_F_WRITE:
            self.seen_write = True
        elif self.seen_write:
            return VU_E_ORDER
        if len(self.segs) >= self.max_out:
            return VU_E_FULL
        self.segs.append((addr, length,
                          VU_SEG_WRITE if flags & VU_DESC_F_WRITE else 0))
        return VU_OK


def _walk_indirect(w, addr, length):
    if length == 0 or length % 16 or length // 16 > VU_MAX_INDIRECT:
        return VU_E_INDIRECT_LEN
    tbl = vu_translate(w.regions, addr, length)
    if tbl is None:
        return VU_E_INDIRECT_ADDR
    cnt = length // 16
    i = count = 0
    while True:
        count += 1
        if count > cnt:
            return VU_E_LOOP
        baddr, blen, flags, nxt = _DESC.unpack(ctypes.string_at(tbl + 16 * i, 16))
        if flags & VU_DESC_F_INDIRECT:
            return VU_E_NESTED
        rc = w.add(baddr, blen, flags)
        if rc != VU_OK:
            return rc
        if not flags & VU_DESC_F_NEXT:
            return VU_OK
        if nxt >= cnt:
            return VU_E_NEXT
        i = nxt


def _walk_chain(w, desc_hva, qsize, head):
    i = head
    count = 0
    while True:
        count += 1
        if count > qsize:
            return VU_E_LOOP
        addr, length, flags, nxt = _DESC.unpack(ctypes.string_at(desc_hva + 16 * i, 16))
        if flags & VU_DESC_F_INDIRECT:
            if flags & VU_DESC_F_NEXT:
                return VU_E_INDIRECT_NEXT
            return _walk_indirect(w, addr, length)
        rc = w.add(addr, length, flags)
        if rc != VU_OK:
            return rc
        if not flags & VU_DESC_F_NEXT:
            return VU_OK
        if nxt >= qsize:
            return VU_E_NEXT
        i = nxt


def vu_pop(regions, desc_hva, avail_hva, qsize, last_avail, max_out):
    if not _qsize_ok(qsize):
        return VU_E_ARG, last_avail, None, []
    aidx = _ld16(avail_hva + 2)
    pending = (aidx - last_avail) & 0xFFFF
    if pending == 0:
        return VU_EMPTY, last_avail, None, []
    if pending > qsize:
        return VU_E_AVAIL_IDX, last_avail, None, []
    head = _ld16(avail_hva + 4 + 2 * (last_avail & (qsize - 1)))
    if head >= qsize:
        return VU_E_HEAD, last_avail, head, []
    last_avail = (last_avail + 1) & 0xFFFF
    w = _Walk(regions, max_out)
    rc = _walk_chain(w, desc_hva, qsize, head)
    return rc, last_avail, head, (w.segs if rc == VU_OK else [])


def vu_push(used_hva, qsize, used_idx, id, length):
    if not _qsize_ok(qsize):
        return VU_E_ARG, used_idx
    if id >= qsize:
        return VU_E_HEAD, used_idx
    e = used_hva + 4 + 8 * (used_idx & (qsize - 1))
    _st32(e, id)
    _st32(e + 4, length)
    used_idx = (used_idx + 1) & 0xFFFF
    _st16(used_hva + 2, used_idx)
    return VU_OK, used_idx


def vu_push_n(used_hva, qsize, used_idx, elems):
    if not _qsize_ok(qsize):
        return VU_E_ARG, used_idx
    elems = list(elems)
    for id, _ in elems:
        if id >= qsize:
            return VU_E_HEAD, used_idx
    if not elems:
        return VU_OK, used_idx
    for k, (id, length) in enumerate(elems):
        e = used_hva + 4 + 8 * (((used_idx + k) & 0xFFFF) & (qsize - 1))
        _st32(e, id)
        _st32(e + 4, length)
    used_idx = (used_idx + len(elems)) & 0xFFFF
    _st16(used_hva + 2, used_idx)
    return VU_OK, used_idx


def vring_need_event(event, new, old):
    """The virtio rule: does moving the index from old to new cross event?"""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


def vu_need_signal(avail_hva, used_hva, qsize, event_idx, old_used, new_used):
    if not _qsize_ok(qsize):
        return VU_E_ARG
    if old_used == new_used:
        return 0
    if event_idx:
        ev = _ld16(avail_hva + 4 + 2 * qsize)
        return int(vring_need_event(ev, new_used, old_used))
    return 0 if _ld16(avail_hva) & VU_AVAIL_F_NO_INTERRUPT else 1


def vu_set_avail_event(used_hva, qsize, val):
    if not _qsize_ok(qsize):
        return VU_E_ARG
    _st16(used_hva + 4 + 8 * qsize, val)
    return VU_OK


def vu_arm(avail_hva, used_hva, qsize, last_avail):
    if not _qsize_ok(qsize):
        return VU_E_ARG
    _st16(used_hva + 4 + 8 * qsize, last_avail)
    return int(_ld16(avail_hva + 2) != last_avail)


def vu_avail_idx(avail_hva):
    return _ld16(avail_hva + 2)


def message(rc):
    return MESSAGES.get(rc, f"vring error {rc}")


__all__ = [n for n in dir() if n.startswith(("vu_", "VU_"))] + [
    "MESSAGES", "RING_ERRORS", "message", "vring_need_event"]
