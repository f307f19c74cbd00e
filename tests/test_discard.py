"""Discard engine: correctness over real memfds, policy, error reporting.

No kernel mocks: every test maps a real memfd MAP_SHARED through
vhostuser.memory.Region (as the daemon does), punches real holes and
measures the result (file contents, mapping contents, st_blocks).  Each
engine test runs with the C engine and with its Python twin (the impl
fixture).
"""

import ctypes
import errno
import os
import types

import pytest

from balloon_device.discard import (
    MODES, DiscardEngine, DiscardResult, check_table, resolve_mode, twin)
from balloon_device.discard.engine import c_module
from balloon_device.errors import BalloonError, ConfigError, DiscardModeError
from balloon_device.testing import AnonymousRegion, allocated_bytes, c_trim, mapping_usage
from vhostuser.memory import MemoryTable, Region
from vhostuser.vring import SEG

PAGE = 4096


def pack(segs):
    """[(gpa, len)] as device-writable vu_seg records."""
    return b"".join(SEG.pack(g, n, 1) for g, n in segs)


def discard(mode, table, segs):
    """One engine call on `table` (a MemoryTable or anything with .regions)."""
    return DiscardEngine(mode).discard(table, pack(segs))


def canary(size, seed=0):
    """Non-zero bytes, different on every page."""
    out = bytearray(size)
    for p in range(0, size, PAGE):
        v = ((p // PAGE) * 37 + seed) % 251 + 1
        out[p:p + PAGE] = bytes([v]) * min(PAGE, size - p)
    # vary inside the page too, still never zero
    for i in range(0, size, 97):
        out[i] = (out[i] % 250) + 2
    return bytes(out)


class MemfdTable:
    """A memfd of `file_size` bytes and regions mapped from it.

    layout: list of (gpa, size, mmap_offset).  The regions get dup'ed fds,
    the table owns them; self.fd stays open for measurements.
    """

    def __init__(self, file_size, layout, name="vub-test"):
        self.fd = os.memfd_create(name)
        os.ftruncate(self.fd, file_size)
        self.size = file_size
        self.data = canary(file_size)
        os.pwrite(self.fd, self.data, 0)
        self.table = MemoryTable()
        uaddr = 0x7000_0000_0000
        for gpa, size, off in layout:
            self.table.add(Region(gpa, size, uaddr, off, os.dup(self.fd)))
            uaddr += size + (1 << 30)

    def contents(self):
        return os.pread(self.fd, self.size, 0)

    def allocated(self):
        return allocated_bytes(self.fd)

    def close(self):
        self.table.clear()
        os.close(self.fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def expected_after(data, zero_ranges):
    out = bytearray(data)
    for off, n in zero_ranges:
        out[off:off + n] = bytes(n)
    return bytes(out)


def inward(off, n, page=PAGE):
    lo = -(-off // page) * page
    hi = (off + n) // page * page
    return (lo, hi - lo) if hi > lo else (lo, 0)


def diff_summary(a, b):
    bad = [i for i in range(len(a)) if a[i] != b[i]]
    return f"{len(bad)} bytes differ, first at {bad[0]:#x}" if bad else "equal"


# ---------------------------------------------------------------- trimming

@pytest.mark.parametrize("start,length,page,expect", [
    (0, 0x1000, 0x1000, (0, 0, 0x1000)),
    (0x1234, 0x5000, 0x1000, (0, 0x2000, 0x4000)),
    (0x1001, 0xffe, 0x1000, (1, 0x1001, 0)),
    (0x1000, 0xfff, 0x1000, (1, 0x1000, 0)),
    (0x1fffff, 0x400002, 0x200000, (0, 0x200000, 0x400000)),
    (0x1fffff, 0x400000, 0x200000, (0, 0x200000, 0x200000)),
    (0x200000, 0x3fffff, 0x200000, (0, 0x200000, 0x200000)),
    (0x10, 0x200000, 0x200000, (1, 0x10, 0)),
    (0, 0, 0x1000, (1, 0, 0)),
    (0, 0x1000, 0x3000, (-errno.EINVAL, 0, 0)),
    (0, 0x1000, 0, (-errno.EINVAL, 0, 0)),
    # the end (start + len) must fit in 64 bits
    ((1 << 64) - 0x2000, 0x1fff, 0x1000, (0, (1 << 64) - 0x2000, 0x1000)),
    ((1 << 64) - 0x1000, 0x1000, 0x1000, (-errno.EINVAL, (1 << 64) - 0x1000, 0)),
    ((1 << 64) - 0x800, 0x10, 0x1000, (1, (1 << 64) - 0x800, 0)),
    ((1 << 64) - 0x1000, 0x1001, 0x1000, (-errno.EINVAL, (1 << 64) - 0x1000, 0)),
])
def test_trim(impl, start, length, page, expect):
    # C: vub_discard_segs's trim seen through a failing punch (c_trim)
    assert (c_trim if impl else twin.trim)(start, length, page) == expect


# ------------------------------------------------------------- correctness

def run_and_check(mt, segs, mode, zero_file_ranges):
    """Discard segments [(gpa, len)]; assert contents, blocks and the result's accounting."""
    before = mt.allocated()
    assert before == mt.size
    res = discard(mode, mt.table, segs)
    want = sum(n for _, n in zero_file_ranges)
    assert res.errors == []
    assert res.discarded == want
    assert res.skipped_unaligned == sum(n for _, n in segs) - want
    got = mt.contents()
    exp = expected_after(mt.data, zero_file_ranges)
    assert got == exp, diff_summary(got, exp)
    assert before - mt.allocated() == want
    # through the shared mappings too (what the guest sees)
    for r in mt.table.regions:
        seen = ctypes.string_at(r.hva, r.size)
        assert seen == exp[r.mmap_offset:r.mmap_offset + r.size]
    return res


@pytest.mark.parametrize("mode", ["auto", "punch-hole", "remove"])
def test_aligned_pieces_are_freed_exactly(impl, mode):
    with MemfdTable(64 * PAGE, [(0, 64 * PAGE, 0)]) as mt:
        segs = [(4 * PAGE, 8 * PAGE), (20 * PAGE, PAGE), (63 * PAGE, PAGE)]
        res = run_and_check(mt, segs, mode,
                            [(4 * PAGE, 8 * PAGE), (20 * PAGE, PAGE),
                             (63 * PAGE, PAGE)])
        assert res.skipped_unaligned == 0 and res.ranges == 3


@pytest.mark.parametrize("mode", ["punch-hole", "remove"])
def test_misaligned_ends_are_trimmed_inward(impl, mode):
    with MemfdTable(64 * PAGE, [(0, 64 * PAGE, 0)]) as mt:
        raw = [(0x1234, 0x5000),          # both ends partial
               (0x10000, 0x2fff),         # end partial
               (0x20001, 0x1fff),         # start partial
               (0x30100, 0xe00),          # inside one page: nothing
               (0x32000, 0),              # empty
               (0x34800, 0x1000)]         # straddles two pages: nothing
        zeroes = [inward(g, n) for g, n in raw]
        assert zeroes[:3] == [(0x2000, 0x4000), (0x10000, 0x2000),
                              (0x21000, 0x1000)]
        res = run_and_check(mt, raw, mode, [z for z in zeroes if z[1]])
        assert res.skipped_unaligned == 0x1000 + 0xfff + 0xfff + 0xe00 + 0x1000
        assert res.ranges == 3
        # partial pages kept every byte: the byte just outside each hole
        data = mt.contents()
        assert data[0x1fff] != 0 and data[0x6000] != 0 and data[0x12000] != 0
        assert data[0x20fff] != 0


@pytest.mark.parametrize("mode", ["auto", "remove"])
def test_pieces_crossing_region_boundaries(impl, mode):
    # Two regions over one memfd, contiguous in guest-physical space but
    # with a 16-page gap between them in the file that must stay untouched.
    a_size, gap = 32 * PAGE, 16 * PAGE
    layout = [(0, a_size, 0), (a_size, 32 * PAGE, a_size + gap)]
    with MemfdTable(80 * PAGE, layout) as mt:
        segs = [(a_size - 3 * PAGE - 0x10, 6 * PAGE), (PAGE, 2 * PAGE)]
        # the engine cuts at region ends where MemoryTable.split does
        pieces = [p for g, n in segs for p in mt.table.split(g, n)]
        assert [(p[0].gpa, p[1], p[2]) for p in pieces] == [
            (0, a_size - 3 * PAGE - 0x10, 3 * PAGE + 0x10),
            (a_size, a_size, 3 * PAGE - 0x10),
            (0, PAGE, 2 * PAGE)]
        zero = [(a_size - 3 * PAGE, 3 * PAGE),        # region A's tail
                (a_size + gap, 2 * PAGE),              # region B's head
                (PAGE, 2 * PAGE)]
        res = run_and_check(mt, segs, mode, zero)
        assert res.skipped_unaligned == 0x10 + PAGE - 0x10 and res.ranges == 3
        data = mt.contents()
        assert data[a_size:a_size + gap] == mt.data[a_size:a_size + gap]


def test_alignment_follows_file_offset_not_gpa(impl):
    # A region whose gpa is not page-aligned relative to its file offset:
    # the hole must be aligned on the file (and the mapping), not on gpa.
    layout = [(0x100800, 16 * PAGE, 4 * PAGE)]
    with MemfdTable(32 * PAGE, layout) as mt:
        segs = [(0x100800, 2 * PAGE), (0x100800 + 4 * PAGE + 0x800, 2 * PAGE)]
        zero = [(4 * PAGE, 2 * PAGE), (9 * PAGE, PAGE)]
        res = run_and_check(mt, segs, "punch-hole", zero)
        assert res.skipped_unaligned == PAGE


def test_nothing_to_do(impl):
    assert DiscardEngine().discard(MemoryTable(), b"") == DiscardResult()
    with MemfdTable(8 * PAGE, [(0, 8 * PAGE, 0)]) as mt:
        res = discard("auto", mt.table, [(0, 0), (0x10, 0x100)])
        assert res == DiscardResult(reported=0x100, nsegs=2, skipped_unaligned=0x100)
        # device-readable segments are not reported ranges: ignored
        res = DiscardEngine().discard(mt.table, SEG.pack(0, 8 * PAGE, 0))
        assert res == DiscardResult()
        assert mt.contents() == mt.data


# ------------------------------------------------------------------ errors

def test_failing_range_is_reported_and_the_rest_still_done(impl):
    with MemfdTable(16 * PAGE, [(0, 16 * PAGE, 0)]) as mt:
        good = mt.table.regions[0]
        rd, wr = os.pipe()
        try:
            bad = types.SimpleNamespace(
                gpa=0x100000, size=4 * PAGE, hva=good.hva, fd=wr, page_size=PAGE,
                backing="memfd", mmap_offset=0, file_offset=lambda g: g - 0x100000)
            table = types.SimpleNamespace(regions=[good, bad])
            segs = [(0, PAGE), (0x100000, 2 * PAGE), (4 * PAGE, PAGE),
                    (0x101000, PAGE), (8 * PAGE, PAGE)]
            res = discard("auto", table, segs)
        finally:
            os.close(rd)
            os.close(wr)
        assert res.discarded == 3 * PAGE
        assert res.failed == 3 * PAGE
        assert res.ranges == 5
        assert len(res.errors) == 2
        assert all("ESPIPE" in e and "gpa=0x10" in e for e in res.errors)
        assert mt.contents() == expected_after(
            mt.data, [(0, PAGE), (4 * PAGE, PAGE), (8 * PAGE, PAGE)])


def test_segment_outside_guest_memory_is_refused(impl):
    with MemfdTable(8 * PAGE, [(0, 8 * PAGE, 0)]) as mt:
        res = discard("auto", mt.table, [(6 * PAGE, 4 * PAGE)])
        assert res.discarded == 0 and res.skipped_out_of_range == 4 * PAGE
        assert res.out_of_range == [(6 * PAGE, 4 * PAGE, 8 * PAGE)]  # (addr, len, first outside)
        assert res.errors == [] and res.ranges == 0
        assert mt.contents() == mt.data


def test_c_engine_unknown_mode_is_refused():
    lib, ffi = c_module().lib, c_module().ffi
    t = ffi.new("struct vub_totals *")
    regs = ffi.new("struct vu_region[1]")
    regs[0].size, regs[0].page_size, regs[0].mode = PAGE, PAGE, 4
    segs = ffi.from_buffer("struct vu_seg[]", pack([(0, PAGE)]))
    assert lib.vub_discard_segs(regs, 1, segs, 1, t) == twin.SEGS_EARG
    regs[0].mode = 0xFFFFFFFF
    assert lib.vub_discard_segs(regs, 1, segs, 1, t) == twin.SEGS_EARG
    assert t.reported == 0 and t.ranges == 0
    assert lib.vub_discard_segs(ffi.NULL, 0, ffi.NULL, 0, t) == twin.SEGS_DONE


def test_c_punch_loop():
    lib, ffi = c_module().lib, c_module().ffi
    with MemfdTable(64 * PAGE, [(0, 64 * PAGE, 0)]) as mt:
        done = ffi.new("uint64_t *")
        assert lib.vub_punch_loop(mt.fd, 8 * PAGE, 4 * PAGE, 8, done) == 0
        assert done[0] == 8
        assert mt.allocated() == 32 * PAGE
        assert mt.contents() == expected_after(mt.data, [(8 * PAGE, 32 * PAGE)])
        assert lib.vub_punch_loop(-1, 0, PAGE, 3, done) == -errno.EBADF
        assert done[0] == 0


# ------------------------------------------------------------------ policy

def test_modes_and_resolution():
    assert MODES == ("auto", "punch-hole", "remove", "dontneed", "free")
    with MemfdTable(4 * PAGE, [(0, 4 * PAGE, 0)]) as mt:
        r = mt.table.regions[0]
        assert r.backing == "memfd"
        assert resolve_mode("auto", r) == "punch-hole"
        for m in MODES[1:]:
            assert resolve_mode(m, r) == m
        with pytest.raises(ConfigError, match="unknown discard mode 'trim'"):
            resolve_mode("trim", r)
    anon = AnonymousRegion(0, 4 * PAGE)
    try:
        assert resolve_mode("auto", anon) == "dontneed"
    finally:
        anon.close()
    with pytest.raises(ConfigError):
        DiscardEngine("madvise")
    assert issubclass(DiscardModeError, BalloonError)
    assert issubclass(ConfigError, BalloonError)


@pytest.mark.parametrize("mode", ["auto", "punch-hole", "remove"])
def test_policy_accepts_freeing_modes_on_shared(mode):
    with MemfdTable(8 * PAGE, [(0, 4 * PAGE, 0), (0x10000, 4 * PAGE, 4 * PAGE)]) as mt:
        check_table(mode, mt.table)
        DiscardEngine(mode).check(mt.table)


def test_policy_refuses_dontneed_on_shared():
    with MemfdTable(8 * PAGE, [(0, 4 * PAGE, 0), (0x10000, 4 * PAGE, 4 * PAGE)]) as mt:
        with pytest.raises(DiscardModeError) as ei:
            DiscardEngine("dontneed").check(mt.table)
        msg = str(ei.value)
        assert repr(mt.table.regions[0]) in msg
        assert repr(mt.table.regions[1]) in msg
        assert ("MADV_DONTNEED on a shared mapping only drops this process's "
                "page tables; the guest's memory stays allocated; use "
                "--discard auto (punch-hole) or remove") in msg
        # and discard() itself refuses without touching memory
        res = discard("dontneed", mt.table, [(0, 4 * PAGE)])
        assert res.discarded == 0 and res.failed == 4 * PAGE and res.ranges == 0
        assert mt.contents() == mt.data and mt.allocated() == 8 * PAGE


def test_policy_refuses_free_on_shared():
    with MemfdTable(4 * PAGE, [(0, 4 * PAGE, 0)]) as mt:
        with pytest.raises(DiscardModeError) as ei:
            check_table("free", mt.table)
        msg = str(ei.value)
        assert "MADV_FREE is refused (EINVAL) on a shared mapping" in msg
        assert "use --discard auto (punch-hole) or remove" in msg
        assert "memfd" in msg


def test_policy_on_anonymous():
    anon = AnonymousRegion(0, 4 * PAGE)
    try:
        for mode in ("auto", "dontneed", "free"):
            check_table(mode, [anon])
        with pytest.raises(DiscardModeError, match="no file to punch a hole in"):
            check_table("punch-hole", [anon])
        with pytest.raises(DiscardModeError, match="MADV_REMOVE needs a shared file"):
            check_table("remove", [anon])
    finally:
        anon.close()


def test_dontneed_frees_anonymous(impl):
    size = 64 * PAGE
    anon = AnonymousRegion(0x40000000, size)
    try:
        ctypes.memset(anon.hva, 0x5a, size)
        assert mapping_usage(anon.hva)["Rss"] == size
        res = discard("auto", types.SimpleNamespace(regions=[anon]),
                      [(0x40000000 + 0x800, 16 * PAGE)])
        assert res.discarded == 15 * PAGE and res.skipped_unaligned == PAGE
        assert mapping_usage(anon.hva)["Rss"] == size - 15 * PAGE
        mem = ctypes.string_at(anon.hva, size)
        assert mem[:PAGE] == b"\x5a" * PAGE
        assert mem[PAGE:16 * PAGE] == bytes(15 * PAGE)
        assert mem[16 * PAGE:] == b"\x5a" * (48 * PAGE)
    finally:
        anon.close()


def test_mixed_modes_in_one_call(impl):
    """auto on a table with a memfd region and a private anonymous one:
    punch-hole on the first, dontneed on the second, in one engine call
    (each region carries its own mode); a mode one region cannot take is
    refused for the whole table, nothing touched."""
    with MemfdTable(16 * PAGE, [(0, 16 * PAGE, 0)]) as mt:
        anon = AnonymousRegion(0x100000, 16 * PAGE)
        try:
            ctypes.memset(anon.hva, 0x5a, anon.size)
            table = types.SimpleNamespace(regions=[mt.table.regions[0], anon])
            segs = [(2 * PAGE, 4 * PAGE), (0x100000 + 8 * PAGE, 4 * PAGE)]
            refused = discard("punch-hole", table, segs)
            assert refused.discarded == 0 and refused.ranges == 0
            assert refused.failed == refused.reported == 8 * PAGE
            assert refused.errors and "no file to punch a hole in" in refused.errors[0]
            assert mt.allocated() == 16 * PAGE
            assert mapping_usage(anon.hva)["Rss"] == 16 * PAGE
            res = discard("auto", table, segs)
            assert res.errors == [] and res.ranges == 2 and res.discarded == 8 * PAGE
            assert mt.allocated() == 12 * PAGE
            assert mt.contents() == expected_after(mt.data, [(2 * PAGE, 4 * PAGE)])
            assert mapping_usage(anon.hva)["Rss"] == 12 * PAGE
            mem = ctypes.string_at(anon.hva, anon.size)
            assert mem == b"\x5a" * (8 * PAGE) + bytes(4 * PAGE) + b"\x5a" * (4 * PAGE)
        finally:
            anon.close()


def test_backed_bytes_counts_each_file_once():
    """Two regions from one memfd (QEMU splits RAM below/above 4 GiB like this):
    the host memory behind them is the file's allocation, counted once."""
    MiB = 1 << 20
    with MemfdTable(8 * MiB, [(0, 4 * MiB, 0), (1 << 32, 4 * MiB, 4 * MiB)]) as mt:
        assert mt.table.backed_bytes() == mt.allocated() == 8 * MiB
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
        assert libc.fallocate(mt.fd, 0x02 | 0x01, 0, 3 * MiB) == 0   # PUNCH_HOLE | KEEP_SIZE
        assert mt.table.backed_bytes() == mt.allocated() == 5 * MiB
    assert MemoryTable().backed_bytes() is None
