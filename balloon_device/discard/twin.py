"""Pure-Python twin of vub_discard_segs (c_ext/discard.c).

Same arguments (as Python values), return codes, totals and cursor; the
system calls go through ctypes.  tests/test_discard_segs.py keeps the two
in step.  regs: [(gpa, size, hva, file_offset, fd, page_size, mode)]
sorted by gpa (struct vu_region); segs: [(addr, len, flags)] (struct
vu_seg); t: SegTotals.
"""

import bisect
import ctypes
import errno as _errno
import mmap

from .modes import DONTNEED, FREE, PUNCH_HOLE, REMOVE

SEGS_DONE, SEGS_OUT_OF_RANGE, SEGS_FAILED, SEGS_EARG = 0, 1, 2, -1
SEG_WRITE = 1
TOTAL_FIELDS = ("reported", "discarded", "skipped_unaligned",
                "skipped_out_of_range", "failed", "nsegs", "ranges", "seg",
                "first_errno", "seg_done", "first_err_seg", "ev_seg",
                "ev_region", "ev_errno", "ev_gpa", "ev_len", "ev_offset")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int,
                            ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_ADVICE = {REMOVE: getattr(mmap, "MADV_REMOVE", 9),
           DONTNEED: getattr(mmap, "MADV_DONTNEED", 4),
           FREE: getattr(mmap, "MADV_FREE", 8)}
_U64 = (1 << 64) - 1
_I64 = (1 << 63) - 1
_UPTR = (1 << (8 * ctypes.sizeof(ctypes.c_void_p))) - 1


class SegTotals:
    """Python twin of struct vub_totals (all fields start at 0)."""
    __slots__ = TOTAL_FIELDS

    def __init__(self):
        for name in TOTAL_FIELDS:
            setattr(self, name, 0)


def trim(start, length, page):
    """[start, start+length) trimmed inward to whole pages: (status, lo, n).

    status 0: n > 0 bytes of whole pages from lo; 1: no whole page;
    -EINVAL: page is not a power of two or start+length overflows 64 bits.
    """
    if page <= 0 or page & (page - 1) or length > _U64 - start:
        return -_errno.EINVAL, start, 0
    mask = page - 1
    if start > _U64 - mask:
        return 1, start, 0
    lo = (start + mask) & ~mask
    hi = (start + length) & ~mask
    if hi <= lo:
        return 1, start, 0
    return 0, lo, hi - lo


def discard_one(mode, fd, off, hva, ln):
    """One range through ctypes: 0 or errno.  Mirrors discard.c."""
    while True:
        if mode == PUNCH_HOLE:
            if off > _I64 or ln > _I64 - off:
                return _errno.EINVAL
            rc = _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                 off, ln)
        else:
            if hva > _UPTR or ln > _UPTR - hva:
                return _errno.EINVAL
            rc = _libc.madvise(hva, ln, _ADVICE[mode])
        if rc == 0:
            return 0
        err = ctypes.get_errno()
        if err != _errno.EINTR:
            return err


def _find(starts, regs, gpa):
    """Index of the region holding gpa, or -1 (vu_region_find)."""
    k = bisect.bisect_right(starts, gpa) - 1
    if k < 0 or gpa - regs[k][0] >= regs[k][1]:
        return -1
    return k


def _outside(starts, regs, addr, length):
    """None if every byte of [addr, addr+length) is in some region, else the
    first byte that is not (addr if the range runs past 2^64)."""
    if addr + length > (1 << 64):
        return addr
    g, rem = addr, length
    while rem > 0:
        k = _find(starts, regs, g)
        if k < 0:
            return g
        room = regs[k][1] - (g - regs[k][0])
        if room >= rem:
            return None
        g += room
        rem -= room
    return None


def _regions_ok(regs):
    for i, (rg, size, hva, off, _fd, page, mode) in enumerate(regs):
        if page == 0 or page & (page - 1) or mode not in (PUNCH_HOLE, REMOVE, DONTNEED, FREE):
            return False
        if i and (rg < regs[i - 1][0] or rg - regs[i - 1][0] < regs[i - 1][1]):
            return False
        if size and (rg + size > (1 << 64) or hva + size > _U64 or off + size > _U64):
            return False
    return True


def discard_segs(regs, segs, t):
    """Twin of vub_discard_segs: handle segs from the cursor in t until done
    or the next event; returns SEGS_DONE, SEGS_OUT_OF_RANGE, SEGS_FAILED or
    SEGS_EARG."""
    nsegs = len(segs)
    if t.seg > nsegs or not _regions_ok(regs):
        return SEGS_EARG
    if t.seg < nsegs and t.seg_done > segs[t.seg][1]:
        return SEGS_EARG
    starts = [r[0] for r in regs]
    while t.seg < nsegs:
        addr, length, flags = segs[t.seg]
        if not flags & SEG_WRITE:
            t.seg += 1
            t.seg_done = 0
            continue
        if t.seg_done == 0:
            t.nsegs += 1
            t.reported += length
            if length == 0:
                t.seg += 1
                continue
            outside = _outside(starts, regs, addr, length)
            if outside is not None:
                t.skipped_out_of_range += length
                t.ev_seg, t.ev_gpa = t.seg, outside
                t.seg += 1
                t.seg_done = 0
                return SEGS_OUT_OF_RANGE
        g = addr + t.seg_done
        rem = length - t.seg_done
        while rem > 0:
            k = _find(starts, regs, g)
            if k < 0:
                return SEGS_EARG
            rg, size, rhva, roff, fd, page, mode = regs[k]
            rel = g - rg
            n = min(size - rel, rem)
            off = roff + rel
            hva = rhva + rel
            base = off if mode == PUNCH_HOLE else hva
            _status, lo, m = trim(base, n, page)   # regions checked: no -EINVAL here
            t.skipped_unaligned += n - m
            g += n
            rem -= n
            t.seg_done += n
            if m == 0:
                continue
            delta = lo - base
            t.ranges += 1
            err = discard_one(mode, fd, off + delta, hva + delta, m)
            if err == 0:
                t.discarded += m
                continue
            t.failed += m
            if t.first_errno == 0:
                t.first_errno = err
                t.first_err_seg = t.seg
            t.ev_seg, t.ev_region, t.ev_errno = t.seg, k, err
            t.ev_gpa, t.ev_len, t.ev_offset = g - n + delta, m, off + delta
            if rem == 0:
                t.seg += 1
                t.seg_done = 0
            return SEGS_FAILED
        t.seg += 1
        t.seg_done = 0
    return SEGS_DONE
