"""Test and benchmark helpers for the discard engine (not used by the daemon).

AnonymousRegion: private anonymous memory shaped like a vhostuser Region,
where the dontneed/free modes do free memory; allocated_bytes and
mapping_usage measure what a discard released.
"""

import ctypes
import mmap
import os

from .discard.modes import ANONYMOUS

SMALL_PAGE = 4096

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                       ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MAP_FAILED = ctypes.c_void_p(-1).value


def libc_mmap(length, prot, flags, fd, offset=0):
    """mmap through libc (an address, not a Python mmap object); OSError on failure."""
    addr = _libc.mmap(None, length, prot, flags, fd, offset)
    if addr in (None, MAP_FAILED):
        err = ctypes.get_errno()
        raise OSError(err, f"mmap {length:#x}: {os.strerror(err)}")
    return addr


def libc_munmap(addr, length):
    _libc.munmap(addr, length)


class AnonymousRegion:
    """A Region-like object over private anonymous memory (MAP_PRIVATE).

    The daemon never maps guest memory like this; it exists so that the
    dontneed/free modes can be exercised and measured where they do free.
    """

    backing = ANONYMOUS

    def __init__(self, gpa, size, page_size=SMALL_PAGE):
        # Reserve guard pages on both sides (PROT_NONE) so the kernel never
        # merges this mapping with a neighbour: its smaps entry is its own.
        guard = max(page_size, SMALL_PAGE)
        total = size + 2 * guard
        base = libc_mmap(total, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1)
        addr = base + guard
        if _libc.mprotect(addr, size, mmap.PROT_READ | mmap.PROT_WRITE) != 0:
            err = ctypes.get_errno()
            _libc.munmap(base, total)
            raise OSError(err, f"mprotect anonymous {size:#x}: {os.strerror(err)}")
        self._base, self._total = base, total
        self.gpa = gpa
        self.size = size
        self.uaddr = addr
        self.hva = addr
        self.mmap_offset = 0
        self.fd = -1
        self.page_size = page_size

    @property
    def end(self):
        return self.gpa + self.size

    def file_offset(self, gpa):
        """No file: the offset inside the mapping (not used by any syscall)."""
        return gpa - self.gpa

    def close(self):
        if self.hva:
            _libc.munmap(self._base, self._total)
            self.hva = 0

    def __repr__(self):
        return (f"AnonymousRegion(gpa={self.gpa:#x}, size={self.size:#x}, "
                f"hva={self.hva:#x}, page={self.page_size})")


def allocated_bytes(fd):
    """Bytes of backing store allocated to the file behind fd (st_blocks)."""
    return os.fstat(fd).st_blocks * 512


def mapping_usage(addr, pid="self"):
    """smaps fields (in bytes) of the mapping that contains addr.

    Returns e.g. {"Size": ..., "Rss": ..., "LazyFree": ..., ...}; raises
    LookupError if no mapping contains addr.
    """
    found = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                if found is not None:
                    break
                lo, hi = (int(x, 16) for x in head.split("-"))
                if lo <= addr < hi:
                    found = {}
                continue
            if found is not None:
                parts = line.split()
                if len(parts) == 3 and parts[2] == "kB":
                    found[parts[0].rstrip(":")] = int(parts[1]) * 1024
    if found is None:
        raise LookupError(f"no mapping contains {addr:#x}")
    return found


def c_trim(start, length, page):
    """How vub_discard_segs trims [start, start+length) to `page`, as
    (status, lo, n) like balloon_device.discard.twin.trim: one punch-hole
    region at file offset `start` whose fd is -1, so that the trimmed
    range comes back as the failure event (ev_offset, ev_len).  A bad
    page or a range past 2^64 is refused (VUB_SEGS_EARG): -EINVAL."""
    import errno

    from vhostuser.vring import SEG

    from .discard import twin
    from .discard.engine import c_module
    ffi, lib = c_module().ffi, c_module().lib
    regs = ffi.new("struct vu_region[1]")
    # (a zero-length segment is never trimmed: then only the page is checked)
    regs[0].size, regs[0].file_offset = max(length, 1), start if length else 0
    regs[0].fd, regs[0].page_size = -1, page
    raw = SEG.pack(0, length, twin.SEG_WRITE)
    t = ffi.new("struct vub_totals *")
    rc = lib.vub_discard_segs(regs, 1, ffi.from_buffer("struct vu_seg[]", raw), 1, t)
    if rc == twin.SEGS_EARG:
        return -errno.EINVAL, start, 0
    if rc == twin.SEGS_FAILED:
        return 0, t.ev_offset, t.ev_len
    assert rc == twin.SEGS_DONE and t.skipped_unaligned == length, (rc, t.skipped_unaligned)
    return 1, start, 0
