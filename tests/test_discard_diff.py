"""Differential tests: the C engine and its pure-Python twin must agree.

Each Hypothesis example builds two identical small memfd-backed memory
tables (two regions over one memfd, contiguous in guest-physical space,
with a gap in the file, the second region's gpa misaligned relative to
its file offset), throws the same random segment list at both engines
(vhostuser.implementation selects C or the twin), and
compares the DiscardResult, the memfd contents and the allocated blocks.
An example costs well under a millisecond, so the lead's "ci" profile
(2000 examples) stays fast; no max_examples override here.
"""

import ctypes
import os
import types

from hypothesis import HealthCheck, given, settings, strategies as st

from balloon_device.discard import DiscardEngine, twin
from balloon_device.testing import AnonymousRegion, allocated_bytes, c_trim, mapping_usage
from vhostuser import implementation
from vhostuser.memory import MemoryTable, Region
from vhostuser.vring import SEG

PAGE = 4096
# (gpa, size, mmap_offset): region B's gpa is 0x800 off its file alignment
LAYOUT = [(0x0, 8 * PAGE, 0), (8 * PAGE, 8 * PAGE + 0x800, 10 * PAGE)]
FILE_SIZE = 20 * PAGE
GPA_END = LAYOUT[-1][0] + LAYOUT[-1][1]
ZERO_PAGE = bytes(PAGE)
CANARY = bytes((i * 7 + i // PAGE) % 255 + 1 for i in range(FILE_SIZE))

_settings = settings(deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])


def engine(mode, use_c):
    with implementation.selected(use_c):
        return DiscardEngine(mode)


def pack(segs):
    return b"".join(SEG.pack(g, n, 1) for g, n in segs)


def run_on_fresh_memfd(spec, mode, use_c):
    fd = os.memfd_create("vub-diff")
    table = MemoryTable()
    try:
        os.ftruncate(fd, FILE_SIZE)
        os.pwrite(fd, CANARY, 0)
        uaddr = 0x7000_0000_0000
        for gpa, size, off in LAYOUT:
            table.add(Region(gpa, size, uaddr, off, os.dup(fd)))
            uaddr += 1 << 30
        res = engine(mode, use_c).discard(table, pack(spec))
        return res, os.pread(fd, FILE_SIZE, 0), allocated_bytes(fd)
    finally:
        table.clear()
        os.close(fd)


@st.composite
def piece_specs(draw):
    n = draw(st.integers(0, 8))
    out = []
    for _ in range(n):
        gpa = draw(st.one_of(
            st.integers(0, GPA_END - 1),
            st.integers(0, GPA_END // PAGE - 1).map(lambda p: p * PAGE)))
        length = draw(st.one_of(
            st.just(0),
            st.integers(1, GPA_END - gpa),
            st.integers(1, max(1, (GPA_END - gpa) // PAGE)).map(lambda p: p * PAGE)))
        out.append((gpa, min(length, GPA_END - gpa)))
    return out


@_settings
@given(piece_specs(), st.sampled_from(["auto", "punch-hole", "remove"]))
def test_c_and_python_agree_on_memfd(spec, mode):
    c_res, c_mem, c_blocks = run_on_fresh_memfd(spec, mode, True)
    p_res, p_mem, p_blocks = run_on_fresh_memfd(spec, mode, False)
    assert c_res == p_res
    assert c_mem == p_mem
    assert c_blocks == p_blocks
    # and both are consistent with what they report
    assert c_res.errors == []
    total = sum(n for _, n in spec)
    assert c_res.discarded + c_res.skipped_unaligned == total
    # every page is either intact or a hole (zeroes), and the holes are
    # exactly what is no longer allocated
    holes = 0
    for off in range(0, FILE_SIZE, PAGE):
        page = c_mem[off:off + PAGE]
        if page != CANARY[off:off + PAGE]:
            assert page == ZERO_PAGE, f"page {off:#x} partly changed"
            holes += PAGE
    assert holes == FILE_SIZE - c_blocks


@_settings
@given(st.lists(st.tuples(st.integers(0, 32 * PAGE - 1), st.integers(0, 12 * PAGE)),
                max_size=6),
       st.sampled_from(["auto", "dontneed"]))
def test_c_and_python_agree_on_anonymous(spec, mode):
    results = []
    for use_c in (True, False):
        anon = AnonymousRegion(0x10000, 32 * PAGE)
        try:
            ctypes.memset(anon.hva, 0x3c, anon.size)
            segs = [(0x10000 + g, min(n, anon.size - g)) for g, n in spec]
            res = engine(mode, use_c).discard(types.SimpleNamespace(regions=[anon]), pack(segs))
            rss = mapping_usage(anon.hva)["Rss"]
            mem = ctypes.string_at(anon.hva, anon.size)
        finally:
            anon.close()
        results.append((res, mem, rss))
    assert results[0] == results[1]


@_settings
@given(st.one_of(st.integers(0, (1 << 64) - 1), st.integers((1 << 64) - (1 << 33), (1 << 64) - 1)),
       st.integers(0, (1 << 32) - 1),
       st.sampled_from([1 << k for k in range(0, 32)] + [0, 3, 0x3000, 0x200001]))
def test_trim_c_and_python_agree(start, length, page):
    # C: vub_discard_segs's trim seen through a failing punch (a vu_seg
    # length and a vu_region page size are 32 bits)
    assert c_trim(start, length, page) == twin.trim(start, length, page)
    rc, lo, n = twin.trim(start, length, page)
    if rc == 0:
        assert start <= lo and lo + n <= start + length
        assert lo % page == 0 and n % page == 0 and n > 0
        # inward and maximal: no whole page was left out
        assert lo - start < page and (start + length) - (lo + n) < page
