"""The one discard path (vub_discard_segs): C vs its Python twin, and the
engine vs an independent model built on MemoryTable.split.

1. C vs twin, at the raw level: random multi-region tables over one memfd
   (gaps in gpa and in the file, misaligned gpa/offset/hva, 4 KiB and
   8 KiB pages, punch-hole and remove regions mixed, a region with a bad
   fd so that discards fail) and random segment lists (device-readable
   ones mixed in, zero-length, out-of-range, region-straddling, addresses
   near 2^64).  Every event (return code + totals/cursor) of the resumed
   calls, the memfd contents and its allocated blocks must be identical.
2. The engine on a real MemoryTable, C and twin, vs a model: split every
   writable segment with MemoryTable.split (out of range if it raises),
   trim each piece inward on its file offset, expect those bytes zeroed
   and the same numbers and per-range error messages.
3. Inflate's page runs on a huge-page region (2 MiB page_size emulated on
   a memfd): C and twin agree, and nothing outside whole host pages is
   ever discarded (st_blocks).

An example of 1 and 2 costs about a millisecond; no max_examples override.
An example of 3 costs ~50 ms (two 8-10 MiB memfds written, up to 4096 PFNs
through the device's page tracking, C and twin): max_examples=200 there.
"""

import errno
import mmap
import os

import pytest
from hypothesis import given, settings, strategies as st

from balloon_device.discard import DiscardEngine, twin
from balloon_device.discard.engine import c_module
from balloon_device.discard.modes import PUNCH_HOLE, REMOVE
from balloon_device.testing import allocated_bytes, libc_mmap, libc_munmap
from vhostuser import implementation
from vhostuser.errors import GuestMemoryError
from vhostuser.memory import MemoryTable, Region
from vhostuser.vring import SEG

PAGE = 4096
FILE_SIZE = 32 * PAGE
CANARY = bytes((i * 7 + i // PAGE) % 255 + 1 for i in range(FILE_SIZE))
U64 = (1 << 64) - 1
TOTALS = twin.TOTAL_FIELDS
BAD_FD = 1 << 20


@st.composite
def tables(draw):
    """[(gpa, size, file_offset, hva_shift, page, bad_fd, mode)] within FILE_SIZE."""
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
        mode = draw(st.sampled_from([PUNCH_HOLE, REMOVE]))
        out.append((gpa, size, off, shift, page, bad, mode))
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


def run_raw(layout, segs, use_c):
    """All events of one chain through C or the twin on a fresh memfd."""
    fd = os.memfd_create("vub-segs")
    base = None
    try:
        os.ftruncate(fd, FILE_SIZE)
        os.pwrite(fd, CANARY, 0)
        base = libc_mmap(FILE_SIZE, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd)
        regs = [(g, s, base + o + sh, o, BAD_FD if bad else fd, p, mode)
                for g, s, o, sh, p, bad, mode in layout]
        raw = b"".join(SEG.pack(*s) for s in segs)
        events = []
        if use_c:
            ffi, lib = c_module().ffi, c_module().lib
            c_regs = ffi.new("struct vu_region[]", regs or 1)
            t = ffi.new("struct vub_totals *")
            c_segs = ffi.from_buffer("struct vu_seg[]", raw) if raw else ffi.NULL
            for _ in range(100):
                rc = lib.vub_discard_segs(c_regs, len(regs), c_segs, len(segs), t)
                events.append((rc, tuple(getattr(t, f) for f in TOTALS)))
                if rc in (twin.SEGS_DONE, twin.SEGS_EARG):
                    break
        else:
            t = twin.SegTotals()
            for _ in range(100):
                rc = twin.discard_segs(regs, segs, t)
                events.append((rc, tuple(getattr(t, f) for f in TOTALS)))
                if rc in (twin.SEGS_DONE, twin.SEGS_EARG):
                    break
        return events, os.pread(fd, FILE_SIZE, 0), allocated_bytes(fd)
    finally:
        if base is not None:
            libc_munmap(base, FILE_SIZE)
        os.close(fd)


@given(tables(), seg_lists())
def test_c_and_twin_agree(layout, segs):
    c = run_raw(layout, segs, True)
    p = run_raw(layout, segs, False)
    assert c == p
    events, mem, blocks = c
    rc, last = events[-1]
    assert rc == twin.SEGS_DONE
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
    ok = (0, PAGE, 0, 0, -1, PAGE, PUNCH_HOLE)
    t = twin.SegTotals()
    bad_tables = [[ok[:5] + (3, PUNCH_HOLE)],                 # page not a power of two
                  [ok[:6] + (7,)],                            # unknown mode
                  [(2 * PAGE,) + ok[1:], ok],                 # not sorted by gpa
                  [ok, (PAGE // 2,) + ok[1:]]]                # overlapping
    for regs in bad_tables:
        assert twin.discard_segs(regs, [(0, PAGE, 1)], t) == twin.SEGS_EARG
    ffi, lib = c_module().ffi, c_module().lib
    ct = ffi.new("struct vub_totals *")
    segs = ffi.new("struct vu_seg[]", 1)
    for regs in bad_tables:
        assert lib.vub_discard_segs(ffi.new("struct vu_region[]", regs), len(regs),
                                    segs, 1, ct) == twin.SEGS_EARG
    regs = ffi.new("struct vu_region[]", [ok])
    ct.seg = 2
    assert lib.vub_discard_segs(regs, 1, segs, 1, ct) == twin.SEGS_EARG
    t.seg = 2
    assert twin.discard_segs([ok], [(0, PAGE, 1)], t) == twin.SEGS_EARG
    assert ct.reported == 0 and ct.nsegs == 0 and t.reported == 0


# ---- the engine on a real MemoryTable vs a model built on MemoryTable.split ----

def model(table, segs, mode_name):
    """What the engine must do: numbers, error messages, file ranges zeroed."""
    out = dict(reported=0, nsegs=0, discarded=0, skipped_unaligned=0, failed=0,
               errors=[], ranges=0, skipped_out_of_range=0, out_of_range=[])
    zeroed = []
    for addr, n, flags in segs:
        if not flags & 1:
            continue
        out["nsegs"] += 1
        out["reported"] += n
        try:
            pieces = table.split(addr, n)
        except GuestMemoryError:
            out["skipped_out_of_range"] += n
            outside = addr
            while addr + n <= 1 << 64 and table.find(outside) is not None:
                outside = table.find(outside).end
            out["out_of_range"].append((addr, n, outside))
            continue
        for r, g, m in pieces:
            off = r.file_offset(g)
            status, lo, k = twin.trim(off, m, r.page_size)
            out["skipped_unaligned"] += m - k
            if not k:
                continue
            out["ranges"] += 1
            if r.fd == BAD_FD and mode_name == "punch-hole":   # madvise needs no fd
                out["failed"] += k
                out["errors"].append(
                    f"{mode_name} {r!r} gpa={g + lo - off:#x} len={k:#x} (file offset {lo:#x}): "
                    f"{os.strerror(errno.EBADF)} (EBADF)")
            else:
                out["discarded"] += k
                zeroed.append((lo, k))
    mem = bytearray(CANARY)
    for lo, k in zeroed:
        mem[lo:lo + k] = bytes(k)
    return out, bytes(mem)


def run_table(layout, segs, mode, use_c):
    fd = os.memfd_create("vub-segs-table")
    table = MemoryTable()
    fds = []
    try:
        os.ftruncate(fd, FILE_SIZE)
        os.pwrite(fd, CANARY, 0)
        uaddr = 0x7000_0000_0000
        for gpa, size, off, _sh, _p, bad, _m in layout:
            r = Region(gpa, size, uaddr, off, os.dup(fd))
            if bad:     # discards on this region fail with EBADF
                fds.append((r, r.fd))
                r.fd = BAD_FD
            table.add(r)
            uaddr += 1 << 30
        want = model(table, segs, "remove" if mode == "remove" else "punch-hole")
        with implementation.selected(use_c):
            engine = DiscardEngine(mode)
        res = engine.discard(table, b"".join(SEG.pack(*s) for s in segs))
        got = dict(reported=res.reported, nsegs=res.nsegs, discarded=res.discarded,
                   skipped_unaligned=res.skipped_unaligned, failed=res.failed,
                   errors=res.errors, ranges=res.ranges,
                   skipped_out_of_range=res.skipped_out_of_range,
                   out_of_range=res.out_of_range)
        return (got, os.pread(fd, FILE_SIZE, 0)), want, allocated_bytes(fd)
    finally:
        for r, real in fds:
            r.fd = real
        table.clear()
        os.close(fd)


@given(tables(), seg_lists(), st.sampled_from(["auto", "punch-hole", "remove"]),
       st.booleans())
def test_engine_matches_split_and_trim(layout, segs, mode, use_c):
    if mode == "remove":    # the model trims on the file offset: keep hva in step
        layout = [(g, s, o, 0, p, bad, m) for g, s, o, _sh, p, bad, m in layout]
    got, want, blocks = run_table(layout, segs, mode, use_c)
    assert got == want
    assert FILE_SIZE - blocks == sum(PAGE for off in range(0, FILE_SIZE, PAGE)
                                     if got[1][off:off + PAGE] == bytes(PAGE))


# ---- inflate on huge pages: page runs through the same path -------------------

MiB = 1 << 20
HUGE = 2 * MiB
# (region gpa, mmap_offset, file size): aligned; gpa off 2 MiB alignment; file
# offset off 2 MiB alignment (then only runs of two host pages free anything)
HUGE_LAYOUTS = [(0, 0, 8 * MiB), (MiB, 0, 8 * MiB), (0, MiB, 10 * MiB)]
HUGE_SIZE = 8 * MiB


def holes(fd, size):
    """Set of 4 KiB file pages that are holes (SEEK_HOLE/SEEK_DATA)."""
    out, off = set(), 0
    while off < size:
        hole = os.lseek(fd, off, os.SEEK_HOLE)
        if hole >= size:
            break
        try:
            data = os.lseek(fd, hole, os.SEEK_DATA)
        except OSError:     # ENXIO: a hole up to the end
            data = size
        out.update(range(hole // PAGE, min(data, size) // PAGE))
        off = data
    return out


def run_inflate(layout, chains, use_c):
    """Inflate chains (lists of PFNs) through BalloonDevice's page runs and the
    engine, on a memfd region that says its page size is 2 MiB."""
    from balloon_device.device import BalloonDevice
    gpa, moff, fsize = layout
    fd = os.memfd_create("vub-huge")
    table = MemoryTable()
    try:
        os.pwrite(fd, b"\x5a" * fsize, 0)     # written: fallocated shmem pages seek as holes
        table.add(Region(gpa, HUGE_SIZE, 0x7000_0000_0000, moff, os.dup(fd)))
        table.regions[0].page_size = HUGE      # as if on hugetlbfs
        with implementation.selected(use_c):
            dev = BalloonDevice()
        results = []
        real = dev.engine.discard

        def spy(memory, raw):
            results.append((raw, real(memory, raw)))
            return results[-1][1]
        dev.engine.discard = spy
        for pfns in chains:     # what _handle_inflate does with a chain's PFNs
            dev._discard(table, dev._inflate_segments(table, pfns), "inflate")
        return results, holes(fd, fsize), allocated_bytes(fd), dev.counters
    finally:
        table.clear()
        os.close(fd)


@st.composite
def inflate_chains(draw):
    layout = draw(st.sampled_from(HUGE_LAYOUTS))
    base = layout[0] // PAGE
    pfns = []
    for _ in range(draw(st.integers(1, 8))):
        k = draw(st.integers(0, HUGE_SIZE // HUGE - 1))
        if draw(st.booleans()):
            lo, n = 0, 512                               # a whole host page, in order
        else:
            lo = draw(st.integers(0, 511))
            n = draw(st.integers(1, 512 - lo))
        pfns += range(base + k * 512 + lo, base + k * 512 + lo + n)
        if draw(st.integers(0, 7)) == 0:
            pfns.append(draw(st.sampled_from([0xFFFFFFFF, base - 1, base + HUGE_SIZE // PAGE])))
    size = draw(st.sampled_from([256, 256, 100, 512]))
    return layout, [pfns[i:i + size] for i in range(0, len(pfns), size)]


@settings(max_examples=200)  # ~50 ms per example: see the module docstring
@given(inflate_chains())
def test_inflate_on_huge_pages_c_and_twin_agree_and_never_round_outward(case):
    layout, chains = case
    c = run_inflate(layout, chains, True)
    p = run_inflate(layout, chains, False)
    assert c == p
    results, freed, blocks, counters = c
    gpa, moff, fsize = layout
    inflated = {pfn - gpa // PAGE for chain in chains for pfn in chain}   # region pages
    freed_region_pages = {f - moff // PAGE for f in freed}
    # never outward: only pages the guest inflated were released ...
    assert freed_region_pages <= inflated
    # ... in whole 2 MiB host pages of the file, and st_blocks agrees
    assert all(f * PAGE % HUGE == 0 and all(f + i in freed for i in range(512))
               for f in freed if f - 1 not in freed)
    assert blocks == fsize - len(freed) * PAGE
    # (a host page inflated twice is discarded, and counted, twice)
    discarded = sum(r.discarded for _, r in results)
    assert discarded >= len(freed) * PAGE and discarded % HUGE == 0
    assert counters["bytes_inflate_discarded"] == discarded
    for raw, res in results:
        assert res.errors == [] and res.out_of_range == []
        # inflate hands over whole host pages (region-relative) only
        assert all((a - gpa) % HUGE == 0 and n % HUGE == 0 for a, n, _f in SEG.iter_unpack(raw))


def test_inflate_on_huge_pages_exact_example(impl):
    """Region whose file offset is 1 MiB off 2 MiB alignment: one whole host
    page maps onto two file half-pages, so alone it frees nothing; two
    adjacent ones inflated in one chain free the 2 MiB file page between."""
    gpa, moff, fsize = HUGE_LAYOUTS[2]
    chains = [list(range(0, 512)),                  # host page 0: whole, nothing freeable
              list(range(1024, 1024 + 1024))]       # host pages 2 and 3: one run
    results, freed, blocks, counters = run_inflate(HUGE_LAYOUTS[2], [c[:] for c in chains], impl)
    raws = [list(SEG.iter_unpack(raw)) for raw, _ in results]
    assert raws == [[(0, HUGE, 1)], [(2 * HUGE, 2 * HUGE, 1)]]
    assert [r.discarded for _, r in results] == [0, HUGE]
    assert [r.skipped_unaligned for _, r in results] == [HUGE, HUGE]
    # file offsets of host pages 2-3: 5..9 MiB; whole 2 MiB inside: 6..8 MiB
    assert freed == set(range(6 * MiB // PAGE, 8 * MiB // PAGE))
    assert blocks == fsize - HUGE
    assert counters["bytes_inflate_discarded"] == HUGE
    assert counters["skipped_unaligned"] == 2 * HUGE
