"""MemoryTable's contract, edge by edge (the mutation run found its bounds
unpinned by the device tests): translate, split, read, write and remove over
two regions with a gap, and a region that ends at 2^64."""

import pytest

from vhostuser.errors import GuestMemoryError
from vhostuser.memory import U64
from vhostuser.testing.driver import GuestMemory

MiB = 1 << 20
LO = 0x1000_0000
LAYOUT = [(LO, MiB), (LO + MiB, MiB), (LO + 3 * MiB, MiB)]   # adjacent, then a 1 MiB gap


@pytest.fixture
def mem():
    with GuestMemory(regions=LAYOUT) as m:
        yield m


def test_translate_inside_one_region(mem):
    t = mem.table
    r0, r1 = t.find(LO), t.find(LO + MiB)
    assert t.translate(LO + 4096, 100) == r0.hva + 4096
    assert t.translate(LO + MiB + 8192, MiB - 8192) == r1.hva + 8192   # up to the end
    assert t.translate(LO, 0) == r0.hva
    for gpa, length in ((LO + MiB - 1, 2),            # across a region end
                        (LO + 2 * MiB, 1),            # in the gap
                        (LO - 1, 1), (0, 1),          # below memory
                        (LO, -1), (-1, 1)):           # nonsense
        with pytest.raises(GuestMemoryError):
            t.translate(gpa, length)


def test_split_cuts_at_region_ends(mem):
    t = mem.table
    pieces = [(r.gpa, g, n) for r, g, n in t.split(LO + MiB - 10, 20)]
    assert pieces == [(LO, LO + MiB - 10, 10), (LO + MiB, LO + MiB, 10)]
    assert [(g, n) for _, g, n in t.split(LO + 5, 1)] == [(LO + 5, 1)]
    assert t.split(LO, 0) == []
    with pytest.raises(GuestMemoryError, match="outside guest memory"):
        t.split(LO + 2 * MiB - 1, 2)                  # runs into the gap
    for gpa, length in ((LO, -1), (-1, 1), (U64 - 1, 2)):
        with pytest.raises(GuestMemoryError, match="bad guest range"):
            t.split(gpa, length)


def test_region_ending_at_2_64():
    with GuestMemory(regions=[(U64 - MiB, MiB)]) as m:
        t = m.table
        assert [(g, n) for _, g, n in t.split(U64 - 4096, 4096)] == [(U64 - 4096, 4096)]
        assert t.translate(U64 - 4096, 4096) == t.find(U64 - MiB).hva + MiB - 4096
        with pytest.raises(GuestMemoryError):
            t.translate(U64 - 4096, 4097)
        with pytest.raises(GuestMemoryError):
            t.split(U64 - 4096, 4097)


def test_read_and_write_across_regions(mem):
    t = mem.table
    data = bytes(range(256)) * 2
    t.write(LO + MiB - 256, data)
    assert t.read(LO + MiB - 256, 512) == data
    assert mem.read(LO + MiB - 256, 512) == data     # the guest's own view agrees
    assert t.read(LO + MiB - 1, 2) == data[255:257]
    assert t.read_u16(LO + MiB - 1) == data[255] | data[256] << 8


def test_remove_needs_an_exact_match_and_counts_one_generation(mem):
    from vhostuser.errors import RequestError
    t = mem.table
    g, s, u, _ = mem.layout[1]
    gen = t.generation
    for args in ((g, s, u + 4096), (g, s + 4096, u), (g + 4096, s, u)):
        with pytest.raises(RequestError, match="no memory region"):
            t.remove(*args)
    assert t.generation == gen and len(t) == 3
    t.remove(g, s, u)
    assert t.generation == gen + 1 and len(t) == 2 and t.find(g) is None
