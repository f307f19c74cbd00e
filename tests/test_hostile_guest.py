"""A malicious guest driver against the balloon device (all four queues).

Property tests and a Hypothesis fuzzer over descriptor chains, indirect
tables and PFN arrays written by a hostile driver (tests/fuzz/guest_gen.py):
loops, out-of-range addresses, ranges straddling regions or the hole between
them, giant lengths, used-ring flooding, avail idx jumps, reporting ranges
covering the rings or the descriptor table.  Oracle after every
handle_queue call: every page the device discards was designated by the
guest at that moment (a device-writable reporting buffer, or a PFN in an
inflate chain's PFN array); no byte outside the used ring and those pages
changed (canary-filled memory compared with a snapshot); no more memory
released than discarded (memfd blocks measured before reading); only
VringError escapes, each call returns within a CPU bound.  Guest memory is
mapped with PROT_NONE guard pages: any access outside it kills the run.

Decision (docs/threat-model.md): a reporting range that covers the guest's
own rings is discarded like any other range -- the device does not try to
guess which guest memory is "special"; zeroing its own rings harms only the
guest, and the device then sees a corrupt ring (VringError, queue stopped
until the driver resets it) and never anything outside guest memory.

max_examples: each fuzz example builds a 4 MiB guarded guest and runs up to
12 steps with 4 MiB snapshots at each step and discard (~10-100 ms per
example), so the fuzz tests run 120 and 60 examples instead of the "ci" profile's 2000.  The long
run is scripts/fuzz_guest.py.
"""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzz.guest_gen import GPA0, INDIRECT, NEXT, PAGE, WRITE, HostileGuest, MiB, fuzz_steps
from fuzz.source import HypothesisSource, RandomSource
from vhostuser import implementation

INFLATE, DEFLATE, STATS, REPORTING = range(4)


@pytest.fixture
def guest(impl):
    g = HostileGuest()
    yield g
    g.close()


def data_page(g, k):
    """gpa of the k-th canary page after the scratch area."""
    return g.scratch + 64 * 1024 + k * PAGE


def post(g, q, descs, heads=None):
    """Write raw descriptors [(i, addr, len, flags, next)], make heads available, publish."""
    dq = g.dq[q]
    for i, addr, ln, fl, nxt in descs:
        dq.write_desc(i, addr, ln, fl, nxt)
    for h in (heads if heads is not None else [descs[0][0]]):
        dq.put_avail(h)
    dq.publish()
    return g.step(q)


def used(g, q):
    """(id, len) of the used elements the device published on queue q."""
    dq = g.dq[q]
    idx = g.mem.read_u16(dq.used_gpa + 2)
    return [struct.unpack("<II", g.mem.read(dq.used_gpa + 4 + 8 * (i % g.qsize), 8))
            for i in range(idx)]


# ---- targeted properties -------------------------------------------------------

def test_valid_report_discards_exactly_its_pages(guest):
    gpa = data_page(guest, 3)
    assert post(guest, REPORTING, [(0, gpa, 4 * PAGE, WRITE, 0)]) == "ok"
    assert guest.released == 4 * PAGE
    assert guest.mem.read(gpa, 4 * PAGE) == bytes(4 * PAGE)
    assert used(guest, REPORTING) == [(0, 0)]


def test_report_covering_its_own_rings_is_discarded(guest):
    """The chosen behaviour: discarded (harms only the guest), then the ring is seen corrupt."""
    dq = guest.dq[REPORTING]
    span = dq.used_gpa + 6 + 8 * guest.qsize - dq.desc_gpa
    span += -span % PAGE
    other = [guest.mem.read(d.desc_gpa, 16 * guest.qsize) for d in guest.dq[:REPORTING]]
    post(guest, REPORTING, [(0, dq.desc_gpa, span, WRITE, 0)])
    # the descriptor table was zeroed (discarded), other queues' rings are intact
    assert guest.mem.read(dq.desc_gpa, 16) == bytes(16)
    assert [guest.mem.read(d.desc_gpa, 16 * guest.qsize) for d in guest.dq[:REPORTING]] == other
    assert guest.dev.counters["bytes_discarded"] == span
    # the other queues keep working
    gpa = data_page(guest, 1)
    assert post(guest, STATS, [(0, gpa, 20, 0, 0)]) == "ok"
    assert guest.dev.counters["stats_updates"] == 1
    guest.mem.write(guest.scratch, struct.pack("<I", data_page(guest, 9) >> 12))
    assert post(guest, INFLATE, [(0, guest.scratch, 4, 0, 0)]) == "ok"
    assert guest.mem.read(data_page(guest, 9), PAGE) == bytes(PAGE)


def test_report_covering_the_descriptor_table_of_another_queue(guest):
    target = guest.dq[INFLATE]
    post(guest, REPORTING, [(0, target.desc_gpa, 16 * guest.qsize, WRITE, 0)])
    # designated by the guest: allowed, and it only breaks the guest's own inflate queue
    assert guest.mem.read(target.desc_gpa, 16 * guest.qsize) == bytes(16 * guest.qsize)


def test_descriptor_loop_is_a_malformed_chain(guest):
    gpa = data_page(guest, 0)
    descs = [(0, gpa, PAGE, WRITE | NEXT, 1), (1, gpa + PAGE, PAGE, WRITE | NEXT, 0)]
    assert post(guest, REPORTING, descs) == "ok"
    assert guest.released == 0  # nothing discarded from a malformed chain
    assert guest.dev.counters["malformed_chains"] == 1
    assert used(guest, REPORTING) == [(0, 0)]


def test_self_loop_and_indirect_loop(guest):
    gpa = data_page(guest, 0)
    table = guest.scratch + 16 * PAGE
    guest.mem.write(table, struct.pack("<QIHHQIHH", gpa, PAGE, WRITE | NEXT, 1,
                                       gpa + PAGE, PAGE, WRITE | NEXT, 0))
    post(guest, REPORTING, [(0, gpa, PAGE, WRITE | NEXT, 0), (1, table, 32, INDIRECT, 0)],
         heads=[0, 1])
    assert guest.dev.counters["malformed_chains"] == 2
    assert guest.dev.counters["bytes_discarded"] == 0


@pytest.mark.parametrize("length", [0xFFFF_FFFF, 0x8000_0000, 5 * MiB])
def test_giant_lengths_are_refused(guest, length):
    post(guest, REPORTING, [(0, guest.mem.start, length, WRITE, 0)])
    assert guest.released == 0 and guest.dev.counters["bytes_discarded"] == 0


@pytest.mark.parametrize("addr", [0, 1 << 63, (1 << 64) - PAGE, GPA0 - PAGE, GPA0 + 4 * MiB])
def test_out_of_range_addresses(guest, addr):
    post(guest, REPORTING, [(0, addr, 2 * PAGE, WRITE, 0)])
    post(guest, INFLATE, [(0, addr, 16, 0, 0)])
    post(guest, STATS, [(0, addr, 20, 0, 0)])
    assert guest.dev.counters["bytes_discarded"] == 0


def test_range_straddling_the_hole_between_regions():
    g = HostileGuest(two_regions=True)
    try:
        end0 = g.mem.layout[0][0] + g.mem.layout[0][1]
        post(g, REPORTING, [(0, end0 - PAGE, 2 * PAGE, WRITE, 0)])  # runs into the hole
        assert g.released == 0
        assert g.dev.counters["malformed_chains"] == 1
    finally:
        g.close()


def test_avail_idx_jump_breaks_only_that_queue(guest):
    dq = guest.dq[REPORTING]
    dq.publish(guest.qsize + 5)  # more pending than the ring holds
    assert guest.step(REPORTING) == "ring_error"
    # recovered by the "driver reset" in step(); the queue works again
    gpa = data_page(guest, 2)
    assert post(guest, REPORTING, [(0, gpa, PAGE, WRITE, 0)]) == "ok"
    assert guest.dev.counters["bytes_discarded"] == PAGE


def test_head_out_of_range(guest):
    guest.dq[DEFLATE].put_avail(0xFFFF)
    guest.dq[DEFLATE].publish()
    assert guest.step(DEFLATE) == "ring_error"


def test_used_ring_flood_is_bounded(guest):
    """A full ring of the same head: completed qsize times, nothing else written."""
    gpa = data_page(guest, 5)
    post(guest, REPORTING, [(0, gpa, PAGE, WRITE, 0)], heads=[0] * guest.qsize)
    assert guest.dev.counters["report_chains"] == guest.qsize
    assert guest.mem.read_u16(guest.dq[REPORTING].used_gpa + 2) == guest.qsize


def test_inflate_pfns_pointing_at_rings_and_outside(guest):
    dq = guest.dq[STATS]
    pfns = [dq.desc_gpa >> 12, 0, 0xFFFF_FFFF, (guest.end >> 12), data_page(guest, 7) >> 12]
    guest.mem.write(guest.scratch, struct.pack("<5I", *pfns))
    post(guest, INFLATE, [(0, guest.scratch, 20, 0, 0)])
    assert guest.mem.read(data_page(guest, 7), PAGE) == bytes(PAGE)
    assert guest.dev.counters["skipped_out_of_range"] == 3 * PAGE


def test_inflate_pfn_array_too_large(guest):
    post(guest, INFLATE, [(0, guest.mem.start, 1 * MiB, 0, 0)])  # 256 Ki PFNs of canaries
    assert guest.released == 0
    assert guest.dev.counters["malformed_chains"] == 1


def test_stats_buffer_hostile(guest):
    post(guest, STATS, [(0, guest.mem.start, 0xFFFF_FFFF, 0, 0)])
    post(guest, STATS, [(1, data_page(guest, 0), 3, 0, 0)], heads=[1, 1, 1])
    assert guest.dev.latest_stats == {}


# ---- the fuzzer ---------------------------------------------------------------------

@settings(max_examples=120)  # ~10-100 ms per example: see the module docstring
@given(st.data(), st.booleans(), st.booleans())
def test_fuzz_hostile_driver(data, use_c, two_regions):
    with implementation.selected(use_c):
        g = HostileGuest(two_regions=two_regions)
    try:
        src = HypothesisSource(data)
        fuzz_steps(src, g, src.int(1, 12))
        assert g.corrupted == 0
    finally:
        g.close()


@settings(max_examples=60)  # as above, with EVENT_IDX and larger rings
@given(st.data())
def test_fuzz_hostile_driver_event_idx(data):
    g = HostileGuest(event_idx=True, qsize=64)
    try:
        src = HypothesisSource(data)
        fuzz_steps(src, g, src.int(1, 12))
    finally:
        g.close()


def test_fuzz_hostile_driver_long_sequences():
    """Fixed seeds, 150 steps on one guest: state carried across many chains."""
    for seed in range(3):
        with implementation.selected(seed != 1):
            g = HostileGuest(two_regions=seed == 2)
        try:
            fuzz_steps(RandomSource(seed), g, 150)
            assert g.steps == 150 and g.corrupted == 0
        finally:
            g.close()
