"""Whole-chain discard (vub_discard_segs): C vs its Python twin, and the
new path vs the old per-piece path (MemoryTable.split + discard).

1. C vs twin, at the raw level: random multi-region tables over one memfd
   (gaps in gpa and in the file, misaligned gpa/offset/hva, 4 KiB and
   8 KiB pages, a region with a bad fd so that discards fail) and random
   segment lists (device-readable ones mixed in, zero-length,
   out-of-range, region-straddling, addresses near 2^64).  Every event
   (return code + totals/cursor) of the resumed calls, the memfd
   contents and its allocated blocks must be identical.
2. Old vs new, at the engine level on a real MemoryTable: the ChainResult
   must carry the same numbers and error messages as split + discard,
   and leave the same file contents.

An example costs about a millisecond; no max_examples override.
"""

import mmap
import os

from hypothesis import given, strategies as st

from balloon_device import discard as d
from balloon_device.discard import DiscardEngine
from vhostuser.errors import GuestMemoryError
from vhostuser.memory import MemoryTable, Region

PAGE = 4096
FILE_SIZE = 32 * PAGE
CANARY = bytes((i * 7 + i // PAGE) % 255 + 1 for i in range(FILE_SIZE))
U64 = (1 << 64) - 1
TOTALS = d._TOTAL_FIELDS
BAD_FD = 1 << 20


@st.composite
def tables(draw):
    """[(gpa, size, file_offset, hva_shift, page, bad_fd)] within FILE_SIZE."""
    n = draw(st.sampled_from([0, 1, 2, 2, 3, 3]))
    out = []
    gpa = draw(st.sampled_from([0, 0, PAGE, 0x800, 3 * PAGE + 0x123]))
    for _ in range(n):
        size = draw(st.one_of(st.integers(4, 8).map(lambda p: p * PAGE),
                              st.integers(1, 8 * PAGE)))
        off = draw(st.one_of(st.integers(0, (FILE_SIZE - size) // PAGE - 1).map(lambda p: p * PAGE),
                             st.integers(0, FILE_SIZE - size - PAGE)))
        shift = draw(st.sampled_from([0, 0x800, PAGE]))
        page = draw(st.sampled_from([PAGE, PAGE, 2 * PAGE]))
        bad = draw(st.integers(0, 3)) == 0
        out.append((gpa, size, off, shift, page, bad))
        gpa += size + draw(st.sampled_from([0, 0, 0, 0x800, 2 * PAGE]))
    return out


@st.composite
def seg_lists(draw, end=14 * PAGE):
    n = draw(st.integers(0, 10))
    out = []
    for _ in range(n):
        kind = draw(st.integers(0, 9))
        if kind == 0:       # near the top of the address space
            addr = draw(st.integers(U64 - 3 * PAGE, U64))
        elif kind < 5:
            addr = draw(st.integers(0, end // PAGE)) * PAGE
        else:
            addr = draw(st.integers(0, end))
        kind = draw(st.integers(0, 9))
        if kind == 0:
            length = 0
        elif kind == 1:     # anything a descriptor can say
            length = draw(st.integers(0, 0xFFFFFFFF))
        elif kind < 5:
            length = draw(st.integers(1, 3)) * PAGE
        else:
            length = draw(st.integers(1, 2 * PAGE))
        flags = draw(st.sampled_from([1, 1, 1, 1, 0, 3]))
        out.append((addr, length, flags))
    return out


def run_raw(layout, segs, mode, use_c):
    """All events of one chain through C or the twin on a fresh memfd."""
    fd = os.memfd_create("vub-segs")
    base = None
    try:
        os.ftruncate(fd, FILE_SIZE)
        os.pwrite(fd, CANARY, 0)
        base = d._libc.mmap(None, FILE_SIZE, mmap.PROT_READ | mmap.PROT_WRITE,
                            mmap.MAP_SHARED, fd, 0)
        assert base not in (None, d._MAP_FAILED)
        regs = [(g, s, base + o + sh, o, BAD_FD if bad else fd, p)
                for g, s, o, sh, p, bad in layout]
        raw = b"".join(d.SEG.pack(*s) for s in segs)
        events = []
        if use_c:
            ffi, lib = d._discard_c.ffi, d._discard_c.lib
            c_regs = ffi.new("struct vub_region[]", max(1, len(regs)))
            for i, r in enumerate(regs):
                (c_regs[i].gpa, c_regs[i].size, c_regs[i].hva,
                 c_regs[i].file_offset, c_regs[i].fd, c_regs[i].page_size) = r
            t = ffi.new("struct vub_totals *")
            c_segs = ffi.from_buffer("struct vub_seg[]", raw) if raw else ffi.NULL
            for _ in range(100):
                rc = lib.vub_discard_segs(c_regs, len(regs), c_segs, len(segs), mode, t)
                events.append((rc, tuple(getattr(t, f) for f in TOTALS)))
                if rc in (d.SEGS_DONE, d.SEGS_EARG):
                    break
        else:
            t = d.SegTotals()
            for _ in range(100):
                rc = d.discard_segs_py(regs, segs, mode, t)
                events.append((rc, tuple(getattr(t, f) for f in TOTALS)))
                if rc in (d.SEGS_DONE, d.SEGS_EARG):
                    break
        return events, os.pread(fd, FILE_SIZE, 0), d.allocated_bytes(fd)
    finally:
        if base not in (None, d._MAP_FAILED):
            d._libc.munmap(base, FILE_SIZE)
        os.close(fd)


@given(tables(), seg_lists(), st.sampled_from([d.PUNCH_HOLE, d.REMOVE]))
def test_c_and_twin_agree(layout, segs, mode):
    c = run_raw(layout, segs, mode, True)
    p = run_raw(layout, segs, mode, False)
    assert c == p
    events, mem, blocks = c
    rc, last = events[-1]
    assert rc == d.SEGS_DONE
    tot = dict(zip(TOTALS, last))
    writable = [s for s in segs if s[2] & 1]
    assert tot["nsegs"] == len(writable)
    assert tot["reported"] == sum(s[1] for s in writable)
    # every reported byte is accounted for exactly once
    assert (tot["discarded"] + tot["failed"] + tot["skipped_unaligned"]
            + tot["skipped_out_of_range"]) == tot["reported"]
    # pages are intact or holes, never partly changed
    for off in range(0, FILE_SIZE, PAGE):
        page = mem[off:off + PAGE]
        assert page == CANARY[off:off + PAGE] or page == bytes(PAGE)


def test_bad_arguments_do_nothing():
    t = d.SegTotals()
    assert d.discard_segs_py([(0, PAGE, 0, 0, -1, 3)], [(0, PAGE, 1)], 0, t) == d.SEGS_EARG
    assert d.discard_segs_py([], [], 7, t) == d.SEGS_EARG
    ffi, lib = d._discard_c.ffi, d._discard_c.lib
    regs = ffi.new("struct vub_region[]", 1)
    regs[0].size, regs[0].page_size = PAGE, 3
    ct = ffi.new("struct vub_totals *")
    segs = ffi.new("struct vub_seg[]", 1)
    assert lib.vub_discard_segs(regs, 1, segs, 1, 0, ct) == d.SEGS_EARG
    regs[0].page_size = PAGE
    assert lib.vub_discard_segs(regs, 1, segs, 1, 9, ct) == d.SEGS_EARG
    ct.seg = 2
    assert lib.vub_discard_segs(regs, 1, segs, 1, 0, ct) == d.SEGS_EARG
    assert ct.reported == 0 and ct.nsegs == 0


# ---- old per-piece path vs discard_chain on a real MemoryTable --------------

def old_path(engine, table, segs):
    """What BalloonDevice did before discard_chain: split, then discard."""
    pieces, oor, skipped = [], [], 0
    writable = [(a, n) for a, n, f in segs if f & 1]
    for a, n in writable:
        try:
            pieces += table.split(a, n)
        except GuestMemoryError:
            skipped += n
            oor.append((a, n))
    res = engine.discard(pieces)
    return dict(reported=sum(n for _, n in writable), nsegs=len(writable),
                discarded=res.discarded, skipped_unaligned=res.skipped_unaligned,
                failed=res.failed, errors=res.errors, ranges=res.ranges,
                skipped_out_of_range=skipped, out_of_range=oor)


def run_table(layout, segs, mode, use_c, new):
    fd = os.memfd_create("vub-segs-table")
    table = MemoryTable()
    fds = []
    try:
        os.ftruncate(fd, FILE_SIZE)
        os.pwrite(fd, CANARY, 0)
        uaddr = 0x7000_0000_0000
        for gpa, size, off, _sh, _p, bad in layout:
            r = Region(gpa, size, uaddr, off, os.dup(fd))
            if bad:     # discards on this region fail with EBADF
                fds.append((r, r.fd))
                r.fd = BAD_FD
            table.add(r)
            uaddr += 1 << 30
        engine = DiscardEngine(mode, use_c=use_c)
        if new:
            res = engine.discard_chain(table, b"".join(d.SEG.pack(*s) for s in segs))
            assert res is not None
            out = dict(reported=res.reported, nsegs=res.nsegs, discarded=res.discarded,
                       skipped_unaligned=res.skipped_unaligned, failed=res.failed,
                       errors=res.errors, ranges=res.ranges,
                       skipped_out_of_range=res.skipped_out_of_range,
                       out_of_range=res.out_of_range)
        else:
            out = old_path(engine, table, segs)
        return out, os.pread(fd, FILE_SIZE, 0), d.allocated_bytes(fd)
    finally:
        for r, real in fds:
            r.fd = real
        table.clear()
        os.close(fd)


@given(tables(), seg_lists(), st.sampled_from(["auto", "punch-hole", "remove"]),
       st.booleans())
def test_discard_chain_matches_split_and_discard(layout, segs, mode, use_c):
    # Region checks its file is large enough; keep the layout within it.
    layout = [(g, s, o, sh, p, bad) for g, s, o, sh, p, bad in layout]
    old = run_table(layout, segs, mode, use_c, new=False)
    new = run_table(layout, segs, mode, use_c, new=True)
    # errors name the region by repr, which includes its uaddr: same in both runs
    assert new == old
