"""The discard engine: one entry point for reporting chains and inflate.

`DiscardEngine.discard(memory, raw)` takes segments packed as struct vu_seg
records (vhostuser.vring.SEG: what the C ring pop writes as Chain.raw;
inflate packs its page runs the same way) and hands them, with a region
table built once per memory-table generation, to vub_discard_segs (C,
balloon_device._discard_c) or its pure-Python twin (twin.discard_segs),
chosen once by vhostuser.implementation.  The engine splits every
device-writable segment at region ends, trims each piece inward to whole
pages of its region (region.page_size; on the file offset for punch-hole,
on the host address for the madvise modes) and discards it with the
region's mode.  A segment with any byte outside guest memory is skipped
whole and listed in DiscardResult.out_of_range.

Errors: discard() never raises for a failed system call or a bad segment.
Each failed range becomes one message in DiscardResult.errors (its bytes
counted in `failed`), and the remaining ranges are still attempted.  A
table some region of which the mode cannot free (see modes.check_table,
which the device runs on every new table) is refused whole: nothing is
discarded, the problem is the error.
"""

import errno as _errno
import os
from dataclasses import dataclass, field

from vhostuser import implementation
from vhostuser.vring import SEG

from . import twin
from .modes import ANONYMOUS, MODE_CODES, check_mode, check_table, mode_problem, resolve_mode

# c_module(): the compiled engine (ffi, lib), or ImportError telling how to build it
c_module = implementation.Compiled("balloon_device._discard_c", "build_discard.py")


@dataclass
class DiscardResult:
    reported: int = 0            # bytes of the device-writable segments
    nsegs: int = 0               # device-writable segments
    discarded: int = 0           # bytes released (system call succeeded)
    skipped_unaligned: int = 0   # bytes trimmed away (partial pages)
    skipped_out_of_range: int = 0  # bytes of segments not inside guest memory
    failed: int = 0              # bytes of ranges that failed or were refused
    ranges: int = 0              # ranges handed to the system calls
    errors: list = field(default_factory=list)        # one message per failure
    out_of_range: list = field(default_factory=list)  # [(addr, len, first byte outside)]


class _RegionTable:
    """One memory-table generation, flattened for the engine."""

    def __init__(self, memory, mode, c):
        self.memory = memory
        self.generation = getattr(memory, "generation", None)
        self.regions = list(memory.regions)
        self.problems = [p for p in (mode_problem(mode, r) for r in self.regions) if p]
        self.modes = [resolve_mode(mode, r) for r in self.regions]
        self.tuples = [
            (r.gpa, r.size, r.hva, r.file_offset(r.gpa) if r.backing != ANONYMOUS else 0,
             r.fd, r.page_size, MODE_CODES[m])
            for r, m in zip(self.regions, self.modes)]
        self.c_regs = None
        if c is not None and not self.problems:
            self.c_regs = c.ffi.new("struct vu_region[]", self.tuples or 0)

    def current(self, memory):
        return memory is self.memory and self.generation is not None \
            and memory.generation == self.generation


def _errname(err):
    return _errno.errorcode.get(err, str(err))


class DiscardEngine:
    """Release guest memory named by segments; see the module doc.

    mode: one of modes.MODES.  The C engine or the twin is chosen when the
    engine is built (vhostuser.implementation); both give identical results.
    """

    def __init__(self, mode="auto"):
        check_mode(mode)
        self.mode = mode
        self.use_c = implementation.use_c()
        self._c = c_module() if self.use_c else None
        self._table = None
        if self.use_c:
            self._totals = self._c.ffi.new("struct vub_totals *")
            self._zero = bytes(self._c.ffi.sizeof("struct vub_totals"))

    def check(self, memory_table):
        """Refuse (DiscardModeError) a table some region of which this
        engine's mode cannot free.  Call at start-up and on every new table."""
        check_table(self.mode, memory_table)

    def _region_table(self, memory):
        tab = self._table
        if tab is None or not tab.current(memory):
            tab = _RegionTable(memory, self.mode, self._c)
            self._table = tab if tab.generation is not None else None
        return tab

    def discard(self, memory, raw):
        """Discard the device-writable segments in `raw` (packed vu_seg
        records) of guest memory `memory` (a MemoryTable, or any object with
        .regions sorted by gpa).  Returns a DiscardResult."""
        tab = self._region_table(memory)
        nsegs = len(raw) // SEG.size
        res = DiscardResult()
        if tab.problems:
            for addr, length, flags in SEG.iter_unpack(raw[:nsegs * SEG.size]):
                if flags & twin.SEG_WRITE:
                    res.nsegs += 1
                    res.reported += length
            res.failed = res.reported
            res.errors = list(tab.problems)
            return res
        if self.use_c:
            ffi, lib = self._c.ffi, self._c.lib
            t = self._totals
            ffi.memmove(t, self._zero, len(self._zero))
            segs = ffi.from_buffer("struct vu_seg[]", raw)
            call = lib.vub_discard_segs
            args = (tab.c_regs, len(tab.tuples), segs, nsegs, t)
        else:
            t = twin.SegTotals()
            segs = list(SEG.iter_unpack(raw[:nsegs * SEG.size]))
            call = twin.discard_segs
            args = (tab.tuples, segs, t)
        while True:
            rc = call(*args)
            if rc == twin.SEGS_DONE:
                break
            if rc == twin.SEGS_OUT_OF_RANGE:
                seg = segs[t.ev_seg]
                addr, length = (seg.addr, seg.len) if self.use_c else seg[:2]
                res.out_of_range.append((addr, length, t.ev_gpa))
            elif rc == twin.SEGS_FAILED:
                region, err = tab.regions[t.ev_region], t.ev_errno
                res.errors.append(
                    f"{tab.modes[t.ev_region]} {region!r} gpa={t.ev_gpa:#x} "
                    f"len={t.ev_len:#x} (file offset {t.ev_offset:#x}): "
                    f"{os.strerror(err)} ({_errname(err)})")
            else:
                raise AssertionError(f"discard_segs refused its arguments ({rc}) "
                                     f"for {tab.regions!r}")
        res.reported = t.reported
        res.nsegs = t.nsegs
        res.discarded = t.discarded
        res.skipped_unaligned = t.skipped_unaligned
        res.skipped_out_of_range = t.skipped_out_of_range
        res.failed = t.failed
        res.ranges = t.ranges
        return res
