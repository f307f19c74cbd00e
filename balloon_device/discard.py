"""Give guest memory back to the host.

The guest reports free ranges (guest-physical); `MemoryTable.split` cuts them
at region ends into ``(region, gpa, length)`` pieces; `DiscardEngine.discard`
trims each piece inward to whole backing pages, then releases them with ONE
call into the C engine (``balloon_device._discard_c``, built from
``c_ext/discard.c``) per discard mode present in the batch (normally one).

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

    @property
    def use_c(self):
        return self.backend.name == "c"

    def check(self, memory_table):
        """Refuse (DiscardPolicyError) a table some region of which this
        engine's mode cannot free.  Call at start-up and on every new table."""
        check_policy(self.mode, memory_table)

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
