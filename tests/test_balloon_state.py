"""The balloon device through the socketpair frontend, where state matters:
huge-page regions, memory tables that change under a running queue, a
discard that fails, and resets.  Release is measured (memfd allocated
blocks) and neighbours are checked with canaries; nothing here reaches into
the discard engine, so these tests hold across its internals changing.

Each test kills a named mutation of scripts/mutate.py (see
docs/reliability.md): discard-round-outward(-py), stale-region-table,
discard-raise, reset-noop.
"""

import fcntl
import mmap
import os
import struct

import pytest

from balloon_device import features as F
from balloon_device.device import BalloonDevice
from test_balloon import CANARY, QSIZE, Rig, blocks
from vhostuser import messages as m
from vhostuser.messages import Request as R
from vhostuser.testing import sealed_memfd
from vhostuser.testing.driver import DriverQueue
from vhostuser.testing.frontend import Frontend

MiB = 1 << 20
HUGE = 2 * MiB
LO = 0x1_0000_0000
TWO = [(LO, 48 * MiB), (LO + 64 * MiB, 48 * MiB)]   # a gap between the regions
F_ADD_SEALS = 1033
F_SEAL_FUTURE_WRITE = 0x0010


def huge_rig():
    """A Rig whose region says it is backed by 2 MiB pages (as on hugetlbfs;
    trimming follows region.page_size)."""
    r = Rig()
    for region in r.fe.server.backend.memory.regions:
        region.page_size = HUGE     # before any report: nothing cached the 4 KiB view
    return r


def test_huge_pages_report_frees_only_whole_pages_inside(impl):
    """A report that does not cover whole 2 MiB pages frees nothing outside
    it: never round the system call outward."""
    r = huge_rig()
    try:
        d = r.data                      # 2 MiB aligned (gpa and file offset), canary-filled
        before = blocks(r.mem.fd)
        # straddles two huge pages, covers neither
        r.post("reporting", [], [(d[2] + MiB, HUGE)])
        # one 4 KiB page inside a huge page
        r.post("reporting", [], [(d[6] + 4096, 4096)])
        assert len(r.used("reporting")) == 2
        assert blocks(r.mem.fd) == before, "memory outside the reported ranges was freed"
        # a whole huge page plus 4 KiB on each side: exactly that page goes
        r.post("reporting", [], [(d[9] - 4096, HUGE + 8192)])
        assert len(r.used("reporting")) == 1
        assert before - blocks(r.mem.fd) == HUGE
        c = r.dev.counters
        assert c["bytes_discarded"] == HUGE
        assert c["skipped_unaligned"] == HUGE + 4096 + 8192
        # contents: measured above before reading (a read of a hole allocates)
        for k in (2, 3, 5, 6, 7, 8, 10):
            assert r.mem.read(d[k], HUGE) == bytes([CANARY]) * HUGE, f"data[{k}] touched"
        assert r.mem.read(d[9], HUGE) == bytes(HUGE)
    finally:
        r.close()


def _report_and_measure(r, gpa, fd):
    before = blocks(fd)
    head = r.post("reporting", [], [(gpa, 2 * MiB)])
    assert [u.id for u in r.used("reporting")] == [head]
    return before - blocks(fd)


def test_report_into_memory_added_later(impl):
    """ADD_MEM_REG after reporting ran: reports into the new region free it
    (a region table cached from the old memory table would skip them)."""
    r = Rig(regions=TWO, table=[0])
    try:
        g2, s2, u2, o2 = r.mem.layout[1]
        assert _report_and_measure(r, r.data[0], r.mem.fd) == 2 * MiB   # the table is in use
        r.mem.fill(g2, s2, CANARY)
        reg = m.MEM_REG_SINGLE.pack(0) + m.MEM_REGION.pack(g2, s2, u2, o2)
        assert r.fe.ack(R.ADD_MEM_REG, reg, [r.mem.fd]) == 0
        assert _report_and_measure(r, g2 + 4 * MiB, r.mem.fd) == 2 * MiB
        assert r.dev.counters["skipped_out_of_range"] == 0
        assert r.mem.read(g2 + 4 * MiB, 2 * MiB) == bytes(2 * MiB)
        assert r.mem.read(g2 + 6 * MiB, MiB) == bytes([CANARY]) * MiB
        # and after REM_MEM_REG + ADD_MEM_REG of the same range, again
        assert r.fe.ack(R.REM_MEM_REG, reg, [r.mem.fd]) == 0
        assert r.fe.ack(R.ADD_MEM_REG, reg, [r.mem.fd]) == 0
        assert _report_and_measure(r, g2 + 8 * MiB, r.mem.fd) == 2 * MiB
    finally:
        r.close()


def test_report_after_a_second_set_mem_table(impl):
    """A second SET_MEM_TABLE puts another file behind the same guest range:
    reports go to the new file at its own offsets, the old one is left alone."""
    r = Rig(regions=TWO)
    g2, s2, u2, _ = r.mem.layout[1]
    other = sealed_memfd("other-ram", s2)
    try:
        r.mem.fill(g2, s2, CANARY)
        assert _report_and_measure(r, g2, r.mem.fd) == 2 * MiB   # the old table is in use
        view = mmap.mmap(other, s2)
        view[:] = bytes([CANARY]) * s2
        g1, s1, u1, o1 = r.mem.layout[0]
        assert r.fe.set_mem_table([(g1, s1, u1, o1, r.mem.fd), (g2, s2, u2, 0, other)]) == 0
        old_before = blocks(r.mem.fd)
        assert _report_and_measure(r, g2 + 4 * MiB, other) == 2 * MiB
        assert blocks(r.mem.fd) == old_before, "the old file was punched"
        assert view[4 * MiB:6 * MiB] == bytes(2 * MiB)
        assert view[6 * MiB:7 * MiB] == bytes([CANARY]) * MiB
        assert r.mem.read(g2 + 4 * MiB, 2 * MiB) == bytes([CANARY]) * (2 * MiB)
        assert r.dev.counters["skipped_error"] == 0
        view.close()
    finally:
        os.close(other)
        r.close()


def test_failed_discard_completes_the_chain_and_goes_on(impl, caplog):
    """A discard the kernel refuses (EPERM: the file is sealed against writes
    after it was mapped) is counted in skipped_error and logged; the chain is
    still completed and the next chain in the same kick is served."""
    r = Rig(regions=TWO, table=[0])
    g2, s2, u2, _ = r.mem.layout[1]
    sealed = sealed_memfd("sealed-ram", s2)
    try:
        view = mmap.mmap(sealed, s2)
        view[:] = bytes([CANARY]) * s2
        reg = m.MEM_REG_SINGLE.pack(0) + m.MEM_REGION.pack(g2, s2, u2, 0)
        assert r.fe.ack(R.ADD_MEM_REG, reg, [sealed]) == 0
        fcntl.fcntl(sealed, F_ADD_SEALS, F_SEAL_FUTURE_WRITE)   # punch-hole now EPERM
        dq = r.q["reporting"]
        bad = dq.add([], [(g2 + 2 * MiB, 2 * MiB)])
        good = dq.add([], [(r.data[3], 2 * MiB)])
        before = blocks(r.mem.fd)
        r.fe.kick(r.kicks["reporting"])          # one kick, two chains
        assert [u.id for u in r.used("reporting")] == [bad, good]
        assert before - blocks(r.mem.fd) == 2 * MiB
        c = r.dev.counters
        assert c["skipped_error"] == 2 * MiB and c["bytes_discarded"] == 2 * MiB
        assert c["malformed_chains"] == 0, "a failed discard is no malformed chain"
        assert r.fe.server.backend.counters["ring_errors"] == 0
        assert any("discard failed" in rec.getMessage() and "EPERM" in rec.getMessage()
                   for rec in caplog.records)
        assert view[2 * MiB:4 * MiB] == bytes([CANARY]) * (2 * MiB)
        assert r.fe.alive
        view.close()
    finally:
        os.close(sealed)
        r.close()


# ---- resets -----------------------------------------------------------------

def _dirty(r):
    """Give the device session state: a poison value, actual, and half of a
    2 MiB host page inflated. Returns (host page gpa, its first PFN)."""
    r.fe.server.backend.memory.regions[0].page_size = HUGE
    page = r.data[12]
    base = page >> 12
    before = blocks(r.mem.fd)
    r.post("inflate", [struct.pack("<256I", *range(base, base + 256))], [])
    assert len(r.used("inflate")) == 1 and blocks(r.mem.fd) == before
    cfg = struct.pack("<IIII", 0, 1000, 0, 0xAA)
    assert r.fe.ack(R.SET_CONFIG, m.encode_config(0, 0, cfg)) == 0
    assert struct.unpack("<IIII", r.fe.get_config())[1:] == (1000, 0, 0xAA)
    return page, base


def _check_clean(r, page, base):
    """After a reset: config reads zero actual and poison, reporting frees
    memory again, and the other half of the huge page does not complete the
    half inflated before the reset."""
    assert struct.unpack("<IIII", r.fe.get_config())[1:] == (0, 0, 0)
    st = r.dev.status()
    assert st.poison_val == 0 and st.actual_pages == 0
    r.fe.server.backend.memory.regions[0].page_size = HUGE
    before = blocks(r.mem.fd)
    r.post("inflate", [struct.pack("<256I", *range(base + 256, base + 512))], [])
    assert len(r.used("inflate")) == 1
    assert blocks(r.mem.fd) == before, "a huge page half-inflated before the reset was freed"
    assert _report_and_measure(r, r.data[13], r.mem.fd) == 2 * MiB, "poison survived the reset"
    assert r.mem.read(page, HUGE) == bytes([CANARY]) * HUGE


def _restart(r):
    """What QEMU does after a reset: features, table and queues again."""
    assert r.fe.ack(R.SET_FEATURES, m.U64.pack(r.features | (1 << 30))) == 0
    assert r.fe.set_mem_table([(g, s, u, o, r.mem.fd) for g, s, u, o in r.mem.layout]) == 0
    for index, role in enumerate(F.queue_roles(r.features)):
        dq = DriverQueue(r.mem, QSIZE, event_idx=bool(r.features & (1 << 29)))
        r.kicks[role] = r.fe.start_queue(index, QSIZE, dq.desc_uva, dq.avail_uva, dq.used_uva)[0]
        r.q[role] = dq


@pytest.mark.parametrize("req", [R.RESET_DEVICE, R.RESET_OWNER])
def test_reset_forgets_poison_actual_and_partial_page(impl, req):
    r = Rig()
    try:
        page, base = _dirty(r)
        assert r.fe.ack(req) == 0
        _restart(r)
        _check_clean(r, page, base)
    finally:
        r.close()


def test_disconnect_forgets_poison_actual_and_partial_page(impl):
    """The same device object serves the next frontend after a disconnect."""
    dev = BalloonDevice()
    r = Rig(device=dev)
    try:
        page, base = _dirty(r)
        r.fe.sock.close()
        r.fe.pump()
        assert not r.fe.alive
        old = r.fe
        r.fe = Frontend(dev)
        old.close()
        r.fe.handshake()
        _restart(r)
        _check_clean(r, page, base)
    finally:
        r.close()



# ---- --deflate-on-oom -----------------------------------------------------------

def test_deflate_on_oom_is_offered_only_when_asked():
    """`--deflate-on-oom` reaches the device the daemon builds and the
    feature the frontend sees; without it the bit is not offered.  (What the
    guest does with it: tests/e2e/test_daemon.py, deflate_on_oom tests.)"""
    from balloon_device.host import cli, multi
    for argv, want in (([], False), (["--deflate-on-oom"], True)):
        ns = cli._daemon_parser().parse_args(["--socket-path", "/tmp/x.sock", *argv])
        dev = multi.make_device(cli.config_from_args(ns))
        fe = Frontend(dev)
        try:
            offered = fe.handshake()
            assert bool(offered & F.DEFLATE_ON_OOM) is want, argv
            assert ("DEFLATE_ON_OOM" in dev.status().features_offered) is want
            # the queue layout does not depend on it
            assert F.queue_roles(offered) == ["inflate", "deflate", "stats", "reporting"]
            assert fe.ack(R.SET_FEATURES, m.U64.pack(offered)) == 0
            assert ("DEFLATE_ON_OOM" in dev.status().features_acked) is want
        finally:
            fe.close()


# ---- small contracts the mutation run found unpinned ----------------------------

def test_set_target_bounds_and_result():
    dev = BalloonDevice()
    for bad in (-1, 1 << 32):
        with pytest.raises(ValueError, match="0 to 2\\^32-1 pages"):
            dev.set_target(bad)
    assert dev.set_target(0) is False            # no driver yet: nothing sent
    assert dev.set_target((1 << 32) - 1) is False
    assert dev.status().target_pages == (1 << 32) - 1
    r = Rig(device=dev)
    try:
        assert dev.set_target(256) is True
        assert dev.status().counters["config_changes_sent"] == 1
    finally:
        r.close()


def test_deflate_counts_pages_and_malformed_chains(impl):
    r = Rig()
    try:
        before = blocks(r.mem.fd)
        r.post("deflate", [struct.pack("<3I", 1, 2, 3) + b"\0\0"], [])   # 14 bytes: 3 PFNs
        assert [u.len for u in r.used("deflate")] == [0]
        assert r.dev.counters["deflate_pages"] == 3
        dq = r.q["deflate"]
        used = dq.used_idx
        dq.write_desc(0, r.data[0], 8, flags=1, next=0)          # a loop: malformed
        dq.put_avail(0, publish=True)
        r.fe.kick(r.kicks["deflate"])
        assert dq.used_idx == used + 1                 # completed all the same
        c = r.dev.counters
        assert c["malformed_chains"] == 1 and c["deflate_pages"] == 3
        assert blocks(r.mem.fd) == before              # deflate never frees memory
    finally:
        r.close()


def test_inflate_pfn_array_cap_and_trailing_bytes(impl):
    from balloon_device.device import MAX_PFNS_PER_CHAIN
    r = Rig()
    try:
        base = r.data[4] >> 12
        # 2 PFNs and 2 stray bytes: the stray bytes are no third PFN
        before = blocks(r.mem.fd)
        r.post("inflate", [struct.pack("<2I", base, base + 1) + b"\xff\xff"], [])
        assert [u.len for u in r.used("inflate")] == [0]    # nothing written
        assert r.dev.counters["inflate_pages"] == 2
        assert before - blocks(r.mem.fd) == 2 * 4096         # two adjacent pages, merged
        # exactly the cap is read; one more PFN is refused as malformed
        pfns = struct.pack("<I", 0xFFFFFFFF) * MAX_PFNS_PER_CHAIN
        r.post("inflate", [pfns], [])
        assert len(r.used("inflate")) == 1
        c = r.dev.counters
        assert c["inflate_pages"] == 2 + MAX_PFNS_PER_CHAIN and c["malformed_chains"] == 0
        r.post("inflate", [pfns, struct.pack("<I", 0xFFFFFFFF)], [])
        assert len(r.used("inflate")) == 1
        assert c["malformed_chains"] == 1 and c["inflate_pages"] == 2 + MAX_PFNS_PER_CHAIN
    finally:
        r.close()


def test_config_writes_keep_only_whole_writable_fields():
    """SET_CONFIG of part of the config: `actual` (bytes 4-7) and `poison_val`
    (12-15) change only when the write covers the whole field; the rest of
    the config is the device's own."""
    r = Rig()
    try:
        def write(offset, data):
            assert r.fe.ack(R.SET_CONFIG, m.encode_config(offset, 0, data)) == 0
            return struct.unpack("<IIII", r.fe.get_config())

        r.dev.set_target(7)
        assert write(4, struct.pack("<I", 99)) == (7, 99, 0, 0)
        assert write(5, b"\1\1\1") == (7, 99, 0, 0)            # part of actual
        assert write(0, struct.pack("<II", 1, 100)) == (7, 100, 0, 0)   # num_pages is ours
        assert write(12, struct.pack("<I", 0xAB)) == (7, 100, 0, 0xAB)
        assert write(13, b"\2\2\2") == (7, 100, 0, 0xAB)       # part of poison_val
        assert write(8, struct.pack("<I", 5)) == (7, 100, 0, 0xAB)      # hint cmd id: ours
        assert write(0, struct.pack("<IIII", 3, 100, 9, 0)) == (7, 100, 0, 0)
        # writes past the 16 bytes are refused
        assert r.fe.ack(R.SET_CONFIG, m.encode_config(12, 0, b"\0" * 8)) == 1
    finally:
        r.close()


def test_reporting_counters_add_up_over_chains(impl):
    r = Rig()
    try:
        r.post("reporting", [], [(r.data[0], 2 * MiB), (r.data[1], MiB)])
        r.post("reporting", [], [(r.data[2], 2 * MiB)])
        assert [u.len for u in r.used("reporting")] == [0, 0]
        c = r.dev.counters
        assert (c["report_chains"], c["report_ranges"]) == (2, 3)
        assert c["bytes_reported"] == c["bytes_discarded"] == 5 * MiB
        r.dev.inhibited = True
        r.post("reporting", [], [(r.data[3], MiB)])
        r.post("reporting", [], [(r.data[4], MiB)])
        assert c["skipped_inhibited"] == 2 * MiB and c["bytes_reported"] == 7 * MiB
        assert r.dev.status().last_report_age is not None
    finally:
        r.close()
