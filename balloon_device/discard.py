"""Give guest memory back to the host.

The guest reports free ranges (guest-physical); `MemoryTable.split` cuts them
at region ends into ``(region, gpa, length)`` pieces; `DiscardEngine.discard`
trims each piece inward to whole backing pages, then releases them with ONE
call into the C engine (``balloon_device._discard_c``, built from
``c_ext/discard.c``) per discard mode present in the batch (normally one).

Reporting chains take a shorter road: `DiscardEngine.discard_chain` hands
the chain's raw segments (struct vu_seg records, as the C ring pop wrote
them) and a per-memory-table-generation region table to vub_discard_segs,
which splits, trims and discards the whole chain in one call; it returns
to Python only at an out-of-range segment or a failed range, so that the
numbers and per-range error messages are exactly those of split + discard.
Tables it cannot take (a policy problem, mixed modes under auto) make it
return None and the caller uses the per-piece path.

Modes
    punch-hole  fallocate(fd, PUNCH_HOLE|KEEP_SIZE, file offset, len)
    remove      madvise(hva, len, MADV_REMOVE)  (punches the file hole too)
    dontneed    madvise(hva, len, MADV_DONTNEED)
    free        madvise(hva, len, MADV_FREE)
    auto        punch-hole on file-backed regions (memfd, shmem, hugetlbfs,
                regular files), dontneed on private anonymous regions.

The daemon maps every region MAP_SHARED, where only punch-hole and remove
free anything: MADV_DONTNEED drops this process's page-table entries and
MADV_FREE is refused with EINVAL.  `check_policy` refuses such combinations
up front with a DiscardPolicyError.  dontneed/free are real options only for
private anonymous memory (`AnonymousRegion`), used by tests and benchmarks.

Trimming rule: a piece is shrunk inward to whole pages of its region
(``region.page_size``: 4 KiB, or 2 MiB / 1 GiB on hugetlbfs), never rounded
outward.  Alignment is computed on the file offset for punch-hole and on the
host virtual address for the madvise modes.  The bytes cut away are counted
in ``DiscardResult.skipped_unaligned``.

Errors: `discard` never raises for a failed system call or a bad piece.
Each problem becomes one message in ``DiscardResult.errors`` (its bytes are
counted in ``failed``), and the remaining ranges are still attempted.
Callers that want an exception call ``result.raise_for_errors()``, which
raises DiscardError.  Only an unknown mode raises (ConfigError), at
construction time.
"""

import ctypes
import errno as _errno
import mmap
import os
import struct
from dataclasses import dataclass, field

from .errors import ConfigError, DiscardError, DiscardPolicyError

MODES = ("auto", "punch-hole", "remove", "dontneed", "free")

# Codes of the C API (enum in c_ext/discard.h).
PUNCH_HOLE, REMOVE, DONTNEED, FREE = 0, 1, 2, 3
MODE_CODES = {"punch-hole": PUNCH_HOLE, "remove": REMOVE,
              "dontneed": DONTNEED, "free": FREE}

FILE_BACKINGS = ("memfd", "shmem", "hugetlbfs", "file")
ANONYMOUS = "anonymous"
SMALL_PAGE = 4096

try:
    from . import _discard_c
except ImportError:  # not built: only the pure-Python twin is available
    _discard_c = None

# struct vub_range { int32 fd; uint32 pad; uint64 offset, hva, len; }
_RANGE = struct.Struct("=iIQQQ")
assert _RANGE.size == 32


def c_available():
    """True if the C engine (balloon_device._discard_c) is importable."""
    return _discard_c is not None


# --------------------------------------------------------------------------
# libc through ctypes: the pure-Python twin and AnonymousRegion use these.

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int,
                            ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                       ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MAP_FAILED = ctypes.c_void_p(-1).value

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)
MADV_FREE = getattr(mmap, "MADV_FREE", 8)
MADV_REMOVE = getattr(mmap, "MADV_REMOVE", 9)
_ADVICE = {REMOVE: MADV_REMOVE, DONTNEED: MADV_DONTNEED, FREE: MADV_FREE}
_U64 = (1 << 64) - 1
_I64 = (1 << 63) - 1
_UPTR = (1 << (8 * ctypes.sizeof(ctypes.c_void_p))) - 1


# --------------------------------------------------------------------------
# Policy

def resolve_mode(mode, region):
    """Concrete mode ("punch-hole", "remove", "dontneed", "free") for region."""
    if mode not in MODES:
        raise ConfigError(
            f"unknown discard mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    if region.backing == ANONYMOUS:
        return "dontneed"
    return "punch-hole"


def policy_problem(mode, region):
    """Why `mode` cannot free `region`'s memory, or None if it can."""
    concrete = resolve_mode(mode, region)
    anonymous = region.backing == ANONYMOUS
    if not anonymous and region.backing not in FILE_BACKINGS:
        return (f"{region!r} has unknown backing {region.backing!r}; "
                "the balloon does not know how to free it")
    if concrete == "dontneed" and not anonymous:
        return (f"--discard dontneed cannot free {region!r}: MADV_DONTNEED on "
                "a shared mapping only drops this process's page tables; the "
                "guest's memory stays allocated; use --discard auto "
                "(punch-hole) or remove")
    if concrete == "free" and not anonymous:
        return (f"--discard free cannot free {region!r}: MADV_FREE is refused "
                "(EINVAL) on a shared mapping and frees nothing; use "
                "--discard auto (punch-hole) or remove")
    if concrete == "punch-hole" and anonymous:
        return (f"--discard punch-hole cannot free {region!r}: private "
                "anonymous memory has no file to punch a hole in; use "
                "--discard auto (dontneed) or free")
    if concrete == "remove" and anonymous:
        return (f"--discard remove cannot free {region!r}: MADV_REMOVE needs "
                "a shared file mapping (EINVAL on private anonymous memory); "
                "use --discard auto (dontneed) or free")
    page = region.page_size
    if page <= 0 or page & (page - 1):
        return f"{region!r} has a page size {page} that is not a power of two"
    return None


def check_policy(mode, memory_table):
    """Raise DiscardPolicyError if `mode` cannot free some region.

    memory_table is a MemoryTable or any iterable of regions.
    """
    regions = getattr(memory_table, "regions", memory_table)
    problems = [p for p in (policy_problem(mode, r) for r in regions) if p]
    if problems:
        raise DiscardPolicyError("; ".join(problems))


# --------------------------------------------------------------------------
# Trimming

def trim(start, length, page):
    """Pure-Python twin of vub_trim: (status, out_start, out_len).

    status 0: at least one whole page remains; 1: nothing remains;
    -EINVAL: page is not a power of two or start+length overflows 64 bits.
    """
    if page <= 0 or page & (page - 1):
        return -_errno.EINVAL, start, 0
    if length > _U64 - start:
        return -_errno.EINVAL, start, 0
    mask = page - 1
    if start > _U64 - mask:
        return 1, start, 0
    lo = (start + mask) & ~mask
    hi = (start + length) & ~mask
    if hi <= lo:
        return 1, start, 0
    return 0, lo, hi - lo


# --------------------------------------------------------------------------
# Back ends: run a batch of trimmed ranges with one mode.
#
# run(code, ranges) -> list of (index, errno) of the ranges that failed.
# ranges is a list of (fd, offset, hva, len).  Both back ends stop at the
# first failure inside the engine and resume after it, so every range is
# attempted.

class _CBackend:
    name = "c"

    def __init__(self):
        if _discard_c is None:
            raise ImportError(
                "balloon_device._discard_c is not built; run "
                "`python c_ext/build_discard.py` or `pip install -e .`")
        self.ffi = _discard_c.ffi
        self.lib = _discard_c.lib
        self._done = self.ffi.new("uint32_t *")
        self._s = self.ffi.new("uint64_t *")
        self._l = self.ffi.new("uint64_t *")

    def trim(self, start, length, page):
        if not (0 <= start <= _U64 and 0 <= length <= _U64
                and 0 <= page <= _U64):
            return -_errno.EINVAL, start, 0
        rc = self.lib.vub_trim(start, length, page, self._s, self._l)
        return rc, self._s[0], self._l[0]

    def run(self, code, ranges):
        n = len(ranges)
        flat = []
        for fd, off, hva, ln in ranges:
            flat += (fd, 0, off, hva, ln)
        buf = struct.pack("=" + "iIQQQ" * n, *flat)
        arr = self.ffi.from_buffer("struct vub_range[]", buf)
        failures = []
        i = 0
        while i < n:
            rc = self.lib.vub_discard(arr + i, n - i, code, self._done)
            if rc == 0:
                break
            bad = i + self._done[0]
            failures.append((bad, -rc))
            i = bad + 1
        return failures


def _py_one(code, fd, off, hva, ln):
    """One range through ctypes; 0 or errno. Mirrors discard.c."""
    if ln == 0:
        return 0
    while True:
        if code == PUNCH_HOLE:
            if off > _I64 or ln > _I64 - off:
                return _errno.EINVAL
            rc = _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                 off, ln)
        else:
            if hva > _UPTR or ln > _UPTR - hva:
                return _errno.EINVAL
            rc = _libc.madvise(hva, ln, _ADVICE[code])
        if rc == 0:
            return 0
        err = ctypes.get_errno()
        if err != _errno.EINTR:
            return err


class _PyBackend:
    """Pure-Python twin of the C engine (ctypes fallocate / madvise)."""
    name = "python"

    def trim(self, start, length, page):
        return trim(start, length, page)

    def run(self, code, ranges):
        if code not in (PUNCH_HOLE, REMOVE, DONTNEED, FREE):
            return [(0, _errno.EINVAL)] if ranges else []
        failures = []
        for i, (fd, off, hva, ln) in enumerate(ranges):
            err = _py_one(code, fd, off, hva, ln)
            if err:
                failures.append((i, err))
        return failures


# --------------------------------------------------------------------------
# Engine

@dataclass
class DiscardResult:
    discarded: int = 0           # bytes released (syscall succeeded)
    skipped_unaligned: int = 0   # bytes trimmed away (partial pages)
    failed: int = 0              # bytes of ranges that failed or were refused
    errors: list = field(default_factory=list)   # one message per failure
    ranges: int = 0              # ranges handed to the system calls

    def raise_for_errors(self):
        if self.errors:
            raise DiscardError("; ".join(self.errors))

    def __iadd__(self, other):
        self.discarded += other.discarded
        self.skipped_unaligned += other.skipped_unaligned
        self.failed += other.failed
        self.errors.extend(other.errors)
        self.ranges += other.ranges
        return self


def _errname(err):
    return _errno.errorcode.get(err, str(err))


class DiscardEngine:
    """Release batches of guest memory pieces.

    mode: one of MODES.  use_c: use the C engine (True) or the pure-Python
    twin (False); both give identical results.
    """

    def __init__(self, mode="auto", use_c=True):
        if mode not in MODES:
            raise ConfigError(
                f"unknown discard mode {mode!r}; choose one of {', '.join(MODES)}")
        self.mode = mode
        self.backend = _CBackend() if use_c else _PyBackend()
        self._table = None      # _RegionTable of the last memory table seen
        if use_c:
            self._totals = self.backend.ffi.new("struct vub_totals *")
            self._zero = bytes(self.backend.ffi.sizeof("struct vub_totals"))

    @property
    def use_c(self):
        return self.backend.name == "c"

    def check(self, memory_table):
        """Refuse (DiscardPolicyError) a table some region of which this
        engine's mode cannot free.  Call at start-up and on every new table."""
        check_policy(self.mode, memory_table)

    def _region_table(self, memory):
        """The cached flat table of `memory`, or None if some region needs
        the general per-piece path (policy problem, mixed modes, odd sizes)."""
        tab = self._table
        if tab is not None and tab.memory is memory and tab.generation == memory.generation:
            return tab
        self._table = None
        regions = list(memory.regions)
        modes = set()
        tuples = []
        for r in regions:
            if policy_problem(self.mode, r) is not None:
                return None
            modes.add(resolve_mode(self.mode, r))
            off = r.file_offset(r.gpa) if r.backing != ANONYMOUS else 0
            t = (r.gpa, r.size, r.hva, off, r.fd, r.page_size)
            if (r.size <= 0 or r.gpa < 0 or r.gpa + r.size > (1 << 64)
                    or not 0 <= r.hva <= _U64 - r.size
                    or not 0 <= off <= _U64 - r.size
                    or not -(1 << 31) <= r.fd < (1 << 31)
                    or r.page_size >= (1 << 32)):
                return None
            tuples.append(t)
        if len(modes) > 1:
            return None
        mode = modes.pop() if modes else "punch-hole"
        c_regs = None
        if self.use_c and tuples:
            c_regs = self.backend.ffi.new("struct vub_region[]", len(tuples))
            for i, t in enumerate(tuples):
                (c_regs[i].gpa, c_regs[i].size, c_regs[i].hva,
                 c_regs[i].file_offset, c_regs[i].fd, c_regs[i].page_size) = t
        tab = _RegionTable(memory, regions, MODE_CODES[mode], mode, tuples, c_regs)
        if hasattr(memory, "generation"):
            self._table = tab
        return tab

    def discard_chain(self, memory, raw):
        """Discard a whole chain in one engine call.

        raw: the chain's segments as packed struct vu_seg (SEG) records, as
        the C ring pop produces them; only device-writable ones count.
        Same effect and numbers as splitting every writable segment with
        memory.split (a segment with any byte outside guest memory is
        skipped whole and listed in out_of_range) and calling discard() on
        the pieces.  Returns a ChainResult, or None if this memory table
        needs the general path (then nothing was done).
        """
        if not hasattr(memory, "generation"):
            return None
        tab = self._region_table(memory)
        if tab is None:
            return None
        res = ChainResult()
        nsegs = len(raw) // 16
        if self.use_c:
            ffi, lib = self.backend.ffi, self.backend.lib
            t = self._totals
            ffi.memmove(t, self._zero, len(self._zero))
            segs = ffi.from_buffer("struct vub_seg[]", raw)
            regs = tab.c_regs if tab.c_regs is not None else ffi.NULL
            call = lib.vub_discard_segs
            args = (regs, tab.nregs, segs, nsegs, tab.code, t)
            segs_t = None
        else:
            t = SegTotals()
            segs_t = list(SEG.iter_unpack(raw[:nsegs * 16]))
            call = discard_segs_py
            args = (tab.tuples, segs_t, tab.code, t)
        while True:
            rc = call(*args)
            if rc == SEGS_DONE:
                break
            if rc == SEGS_OUT_OF_RANGE:
                seg = segs[t.ev_seg] if segs_t is None else segs_t[t.ev_seg]
                if segs_t is None:
                    res.out_of_range.append((seg.addr, seg.len))
                else:
                    res.out_of_range.append((seg[0], seg[1]))
            elif rc == SEGS_FAILED:
                region, err = tab.regions[t.ev_region], t.ev_errno
                res.errors.append(
                    f"{tab.mode} {region!r} gpa={t.ev_gpa:#x} len={t.ev_len:#x} "
                    f"(file offset {t.ev_offset:#x}): {os.strerror(err)} "
                    f"({_errname(err)})")
            else:
                raise AssertionError(f"discard_segs refused its arguments ({rc})")
        res.reported = t.reported
        res.nsegs = t.nsegs
        res.discarded = t.discarded
        res.skipped_unaligned = t.skipped_unaligned
        res.skipped_out_of_range = t.skipped_out_of_range
        res.failed = t.failed
        res.ranges = t.ranges
        return res

    def discard(self, pieces):
        """Discard [(region, gpa, length), ...]; returns a DiscardResult."""
        res = DiscardResult()
        batches = {}    # code -> ([(fd, off, hva, len)], [(region, gpa, mode)])
        trim_ = self.backend.trim
        seen = {}       # id(region) -> (mode, problem): pieces share regions
        for region, gpa, length in pieces:
            if length == 0:
                continue
            if length < 0 or gpa < region.gpa or gpa + length > region.gpa + region.size:
                res.failed += max(length, 0)
                res.errors.append(
                    f"piece gpa={gpa:#x} len={length:#x} is not inside {region!r}")
                continue
            key = id(region)
            if key not in seen:
                seen[key] = (resolve_mode(self.mode, region),
                             policy_problem(self.mode, region))
            mode, problem = seen[key]
            if problem:
                res.failed += length
                res.errors.append(problem)
                continue
            rel = gpa - region.gpa
            off = region.file_offset(gpa) if region.backing != ANONYMOUS else rel
            hva = region.hva + rel
            base = off if mode == "punch-hole" else hva
            rc, start, n = trim_(base, length, region.page_size)
            if rc < 0:
                res.failed += length
                res.errors.append(
                    f"{mode} {region!r} gpa={gpa:#x} len={length:#x}: cannot "
                    f"align to page {region.page_size:#x}: {os.strerror(-rc)}")
                continue
            res.skipped_unaligned += length - n
            if n == 0:
                continue
            delta = start - base
            code = MODE_CODES[mode]
            rngs, meta = batches.setdefault(code, ([], []))
            rngs.append((region.fd, off + delta, hva + delta, n))
            meta.append((region, gpa + delta, mode))
        for code, (rngs, meta) in batches.items():
            res.ranges += len(rngs)
            res.discarded += sum(r[3] for r in rngs)
            for i, err in self.backend.run(code, rngs):
                _, off, _, n = rngs[i]
                region, gpa, mode = meta[i]
                res.discarded -= n
                res.failed += n
                res.errors.append(
                    f"{mode} {region!r} gpa={gpa:#x} len={n:#x} "
                    f"(file offset {off:#x}): {os.strerror(err)} "
                    f"({_errname(err)})")
        return res


# --------------------------------------------------------------------------
# Whole reporting chains: split + trim + discard in one call
#
# discard_segs_py is the pure-Python twin of vub_discard_segs (c_ext/discard.c)
# with the same return codes and the same totals/cursor semantics; the
# differential test tests/test_discard_segs.py keeps them in step.

SEGS_DONE, SEGS_OUT_OF_RANGE, SEGS_FAILED, SEGS_EARG = 0, 1, 2, -1
SEG_WRITE = 1
# struct vub_seg / vu_seg { uint64 addr; uint32 len; uint32 flags; }
SEG = struct.Struct("=QII")
assert SEG.size == 16
# struct vub_region { uint64 gpa, size, hva, file_offset; int32 fd; uint32 page; }
REGION = struct.Struct("=QQQQiI")
assert REGION.size == 40
_TOTAL_FIELDS = ("reported", "discarded", "skipped_unaligned",
                 "skipped_out_of_range", "failed", "nsegs", "ranges", "seg",
                 "first_errno", "seg_done", "first_err_seg", "ev_seg",
                 "ev_region", "ev_errno", "ev_gpa", "ev_len", "ev_offset")


class SegTotals:
    """Python twin of struct vub_totals (all fields start at 0)."""
    __slots__ = _TOTAL_FIELDS

    def __init__(self):
        for name in _TOTAL_FIELDS:
            setattr(self, name, 0)


def _find_region(regs, gpa):
    for k, (rg, size, _h, _o, _fd, _p) in enumerate(regs):
        if size and rg <= gpa < rg + size:
            return k
    return len(regs)


def _covered(regs, addr, length):
    if addr + length > (1 << 64):
        return False
    g, rem = addr, length
    while rem > 0:
        k = _find_region(regs, g)
        if k == len(regs):
            return False
        rg, size = regs[k][0], regs[k][1]
        room = size - (g - rg)
        if room >= rem:
            return True
        g += room
        rem -= room
    return True


def discard_segs_py(regs, segs, code, t):
    """Twin of vub_discard_segs.  regs: [(gpa, size, hva, file_offset, fd,
    page_size)], segs: [(addr, len, flags)], code: PUNCH_HOLE..FREE,
    t: SegTotals (cursor in, totals accumulate)."""
    nsegs = len(segs)
    if code not in (PUNCH_HOLE, REMOVE, DONTNEED, FREE) or t.seg > nsegs:
        return SEGS_EARG
    for rg, size, hva, off, _fd, page in regs:
        if page == 0 or page & (page - 1):
            return SEGS_EARG
        if size == 0:
            continue
        if rg + size > (1 << 64) or hva + size > _U64 or off + size > _U64:
            return SEGS_EARG
    if t.seg < nsegs and t.seg_done > segs[t.seg][1]:
        return SEGS_EARG
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
            if not _covered(regs, addr, length):
                t.skipped_out_of_range += length
                t.ev_seg = t.seg
                t.seg += 1
                t.seg_done = 0
                return SEGS_OUT_OF_RANGE
        g = addr + t.seg_done
        rem = length - t.seg_done
        while rem > 0:
            k = _find_region(regs, g)
            if k == len(regs):
                return SEGS_EARG
            rg, size, rhva, roff, fd, page = regs[k]
            rel = g - rg
            n = min(size - rel, rem)
            off = roff + rel
            hva = rhva + rel
            base = off if code == PUNCH_HOLE else hva
            mask = page - 1
            m, lo = 0, base
            if base <= _U64 - mask:
                lo = (base + mask) & ~mask
                hi = (base + n) & ~mask
                if hi > lo:
                    m = hi - lo
            t.skipped_unaligned += n - m
            g += n
            rem -= n
            t.seg_done += n
            if m == 0:
                continue
            delta = lo - base
            t.ranges += 1
            err = _py_one(code, fd, off + delta, hva + delta, m)
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


@dataclass
class ChainResult(DiscardResult):
    """DiscardResult of a whole chain, plus what the split used to count."""
    reported: int = 0            # bytes of the device-writable segments
    nsegs: int = 0               # device-writable segments
    skipped_out_of_range: int = 0
    out_of_range: list = field(default_factory=list)  # [(addr, len)] skipped whole


class _RegionTable:
    """One memory-table generation, flattened for discard_segs."""
    __slots__ = ("memory", "generation", "regions", "code", "mode",
                 "tuples", "c_regs", "nregs")

    def __init__(self, memory, regions, code, mode, tuples, c_regs):
        self.memory = memory
        self.generation = memory.generation
        self.regions = regions
        self.code = code
        self.mode = mode
        self.tuples = tuples
        self.c_regs = c_regs
        self.nregs = len(tuples)


# --------------------------------------------------------------------------
# Private anonymous memory, for tests and benchmarks

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
        base = _libc.mmap(None, total, 0,  # PROT_NONE
                          mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        if base in (None, _MAP_FAILED):
            err = ctypes.get_errno()
            raise OSError(err, f"mmap anonymous {size:#x}: {os.strerror(err)}")
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


# --------------------------------------------------------------------------
# Measurement helpers (tests, benchmarks, diagnostics)

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
