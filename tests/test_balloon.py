"""The balloon device end to end over a socketpair frontend: chains laid out
as the Linux driver lays them out, over a real memfd; release is measured
(memfd allocated blocks), neighbours are checked with canaries."""

import os
import struct
import types

import pytest

from balloon_device import features as F
from balloon_device.device import BalloonDevice
from vhostuser import implementation
from vhostuser.testing.driver import DriverQueue, GuestMemory
from vhostuser.testing.frontend import Frontend
from vhostuser import messages as m
from vhostuser.messages import Request as R
from vhostuser.vring import SEG

MiB = 1 << 20
GUEST = 96 * MiB
CANARY = 0xA5
QSIZE = 64


def blocks(fd):
    return os.fstat(fd).st_blocks * 512


class Rig:
    """A guest (memfd + 4 driver queues) attached to a BalloonDevice."""

    def __init__(self, device=None, features=None, regions=None, early_config=None, table=None):
        """table: indices of the layout's regions the first SET_MEM_TABLE
        holds (default all); the queues and data live in the first one."""
        self.mem = GuestMemory(GUEST, regions=regions)
        self.dev = device or BalloonDevice()
        self.fe = Frontend(self.dev)
        offered = self.fe.handshake()
        self.features = offered & ~(1 << 30) if features is None else features
        if early_config is not None:
            # QEMU's generic device: the driver's config writes during probe
            # arrive before SET_FEATURES, which it sends only at DRIVER_OK.
            assert self.fe.ack(R.SET_CONFIG, m.encode_config(0, 0, early_config)) == 0
        assert self.fe.ack(R.SET_FEATURES, m.U64.pack(self.features | (1 << 30))) == 0
        layout = self.mem.layout if table is None else [self.mem.layout[i] for i in table]
        assert self.fe.set_mem_table([(g, s, u, o, self.mem.fd) for g, s, u, o in layout]) == 0
        self.q = {}
        self.kicks = {}
        for index, role in enumerate(F.queue_roles(self.features)):
            dq = DriverQueue(self.mem, QSIZE, event_idx=bool(self.features & (1 << 29)))
            kick, _call = self.fe.start_queue(index, QSIZE, dq.desc_uva, dq.avail_uva, dq.used_uva)
            self.q[role], self.kicks[role] = dq, kick
        # the rest of guest memory holds "guest data"
        self.data = [self.mem.alloc(2 * MiB, align=2 * MiB, region=0) for _ in range(16)]
        for gpa in self.data:
            self.mem.fill(gpa, 2 * MiB, CANARY)

    def post(self, role, out_bufs, in_bufs):
        head = self.q[role].add(out_bufs, in_bufs)
        self.fe.kick(self.kicks[role])
        return head

    def used(self, role):
        return self.q[role].pop_used()

    def close(self):
        self.fe.close()
        self.mem.close()


@pytest.fixture
def rig(impl):
    r = Rig()
    yield r
    r.close()


def test_queue_layout_is_compact():
    assert F.queue_roles(F.offered()) == ["inflate", "deflate", "stats", "reporting"]
    assert F.queue_roles(F.offered(stats=False)) == ["inflate", "deflate", "reporting"]
    assert F.queue_roles(F.offered(reporting=False)) == ["inflate", "deflate", "stats"]
    assert not F.offered() & F.FREE_PAGE_HINT


def test_reporting_releases_exactly_the_reported_ranges(rig):
    freed = rig.data[2:10:2]  # 4 ranges of 2 MiB, with guest data between them
    before = blocks(rig.mem.fd)
    head = rig.post("reporting", [], [(g, 2 * MiB) for g in freed])
    used = rig.used("reporting")
    assert [(u.id, u.len) for u in used] == [(head, 0)]
    assert before - blocks(rig.mem.fd) == 4 * 2 * MiB  # measured release
    for gpa in rig.data:
        content = rig.mem.read(gpa, 2 * MiB)
        if gpa in freed:
            assert content == bytes(2 * MiB)
        else:
            assert content == bytes([CANARY]) * (2 * MiB), f"data at {gpa:#x} was touched"
    c = rig.dev.counters
    assert c["bytes_reported"] == c["bytes_discarded"] == 8 * MiB and c["report_chains"] == 1


def test_32_ranges_per_chain_like_linux():
    r = Rig()
    try:
        ranges = [r.mem.alloc(2 * MiB, align=2 * MiB) for _ in range(16)]
        for g in ranges:
            r.mem.fill(g, 2 * MiB, 1)
        # 32 in-buffers: two halves of each 2 MiB range, as 1 MiB pieces
        bufs = [(g + k * MiB, MiB) for g in ranges for k in (0, 1)]
        before = blocks(r.mem.fd)
        r.post("reporting", [], bufs)
        assert len(r.used("reporting")) == 1
        assert before - blocks(r.mem.fd) == 32 * MiB
    finally:
        r.close()


def test_completion_only_after_discard(rig):
    dq = rig.q["reporting"]
    seen = []
    engine = rig.dev.engine

    def spy(real):
        def wrapped(*args):
            seen.append(dq.used_idx)  # used idx the guest sees while we discard
            return real(*args)
        return wrapped

    # a reporting chain goes through discard (the whole chain in one call)
    engine.discard = spy(engine.discard)
    start = dq.used_idx
    rig.post("reporting", [], [(rig.data[0], 2 * MiB)])
    assert seen == [start], "the chain was completed before its memory was discarded"
    assert dq.used_idx == (start + 1) & 0xFFFF


def test_misaligned_report_is_trimmed_inward(rig):
    gpa = rig.data[3]
    before = blocks(rig.mem.fd)
    rig.post("reporting", [], [(gpa + 100, 3 * 4096)])  # covers 2 whole pages inside
    assert len(rig.used("reporting")) == 1
    assert before - blocks(rig.mem.fd) == 2 * 4096
    assert rig.mem.read(gpa, 4096) == bytes([CANARY]) * 4096
    assert rig.mem.read(gpa + 4096, 8192) == bytes(8192)
    assert rig.mem.read(gpa + 3 * 4096, 4096) == bytes([CANARY]) * 4096
    assert rig.dev.counters["skipped_unaligned"] == 3 * 4096 - 2 * 4096


def test_out_of_range_report_is_skipped_not_discarded(rig):
    before = blocks(rig.mem.fd)
    end = rig.mem.start + GUEST
    head = rig.post("reporting", [], [(end - MiB, 2 * MiB)])  # runs past the end of memory
    assert [(u.id, u.len) for u in rig.used("reporting")] == [(head, 0)]
    assert blocks(rig.mem.fd) == before
    assert rig.dev.counters["malformed_chains"] == 1
    assert rig.fe.alive
    # the queue keeps working
    rig.post("reporting", [], [(rig.data[0], 2 * MiB)])
    assert rig.dev.counters["bytes_discarded"] == 2 * MiB


def test_poison_written_before_set_features_blocks_discard(impl):
    """QEMU's real order: SET_CONFIG(poison) during probe, SET_FEATURES at
    DRIVER_OK.  The value must survive and stop every discard."""
    poison = 0xAAAAAAAA  # Linux's PAGE_POISON byte, page_poison=1
    r = Rig(early_config=struct.pack("<IIII", 0, 0, 0, poison))
    try:
        assert r.features & F.PAGE_POISON
        assert r.dev.poison_val == poison
        assert not r.dev.discard_allowed
        assert struct.unpack("<IIII", r.fe.get_config())[3] == poison
        before = blocks(r.mem.fd)
        r.post("reporting", [], [(r.data[1], 2 * MiB), (r.data[3], 2 * MiB)])
        assert len(r.used("reporting")) == 1  # completed, nothing freed
        assert blocks(r.mem.fd) == before
        assert r.mem.read(r.data[1], 2 * MiB) == bytes([CANARY]) * (2 * MiB)
        assert r.dev.counters["bytes_discarded"] == 0
        assert r.dev.counters["skipped_poison"] == 4 * MiB
        r.post("inflate", [struct.pack("<4I", *[(r.data[3] >> 12) + i for i in range(4)])], [])
        assert blocks(r.mem.fd) == before
    finally:
        r.close()


def test_zero_poison_before_set_features_allows_discard(impl):
    """init_on_free=1: Linux writes poison_val 0 early; discards go on."""
    r = Rig(early_config=struct.pack("<IIII", 0, 0, 0, 0))
    try:
        assert r.dev.poison_val == 0 and r.dev.discard_allowed
        before = blocks(r.mem.fd)
        r.post("reporting", [], [(r.data[1], 2 * MiB)])
        assert len(r.used("reporting")) == 1
        assert blocks(r.mem.fd) == before - 2 * MiB
        assert r.dev.counters["bytes_discarded"] == 2 * MiB
    finally:
        r.close()


def test_poison_value_blocks_discard(rig):
    data = struct.pack("<IIII", 0, 0, 0, 0xDEADBEEF)
    assert rig.fe.ack(R.SET_CONFIG, m.encode_config(0, 0, data)) == 0
    assert rig.dev.poison_val == 0xDEADBEEF
    before = blocks(rig.mem.fd)
    rig.post("reporting", [], [(rig.data[1], 2 * MiB)])
    assert len(rig.used("reporting")) == 1  # completed anyway
    assert blocks(rig.mem.fd) == before
    assert rig.mem.read(rig.data[1], 2 * MiB) == bytes([CANARY]) * (2 * MiB)
    assert rig.dev.counters["skipped_poison"] == 2 * MiB
    # inflate too
    rig.post("inflate", [struct.pack("<4I", *[(rig.data[1] >> 12) + i for i in range(4)])], [])
    assert blocks(rig.mem.fd) == before


def test_inhibit_blocks_discard(rig):
    rig.dev.inhibited = True
    before = blocks(rig.mem.fd)
    rig.post("reporting", [], [(rig.data[1], 2 * MiB)])
    assert len(rig.used("reporting")) == 1
    assert blocks(rig.mem.fd) == before
    assert rig.dev.counters["skipped_inhibited"] == 2 * MiB
    rig.dev.inhibited = False
    rig.post("reporting", [], [(rig.data[1], 2 * MiB)])
    assert before - blocks(rig.mem.fd) == 2 * MiB


def test_inflate_discards_listed_pages_and_deflate_counts(rig):
    base = rig.data[5] >> 12
    pfns = [base + i for i in range(0, 256, 2)]  # every other page: 128 pages
    before = blocks(rig.mem.fd)
    rig.post("inflate", [struct.pack(f"<{len(pfns)}I", *pfns)], [])
    assert len(rig.used("inflate")) == 1
    assert before - blocks(rig.mem.fd) == 128 * 4096
    for i in range(256):
        page = rig.mem.read((base + i) << 12, 4096)
        assert page == (bytes(4096) if i % 2 == 0 else bytes([CANARY]) * 4096)
    rig.post("deflate", [struct.pack(f"<{len(pfns)}I", *pfns)], [])
    assert len(rig.used("deflate")) == 1
    assert rig.dev.counters["inflate_pages"] == rig.dev.counters["deflate_pages"] == 128


def test_inflate_pages_in_any_order_are_discarded_as_merged_runs(rig):
    """Linux lists the pages of an inflate chain in allocation order, descending as
    often as not: sorted first, 256 neighbours are one run (one fallocate), not 256."""
    base = rig.data[3] >> 12
    pfns = [base + i for i in reversed(range(256))] + [base + 511, base + 300]
    seen = []
    real = rig.dev.engine.discard

    def spy(memory, raw):
        seen.append(len(raw) // SEG.size)
        return real(memory, raw)
    rig.dev.engine.discard = spy
    before = blocks(rig.mem.fd)
    rig.post("inflate", [struct.pack(f"<{len(pfns)}I", *pfns)], [])
    assert len(rig.used("inflate")) == 1
    assert seen == [3]                       # runs: 256 pages, one at +300, one at +511
    assert before - blocks(rig.mem.fd) == 258 * 4096
    assert rig.mem.read(base << 12, 256 * 4096) == bytes(256 * 4096)
    assert rig.mem.read((base + 256) << 12, 4096) == bytes([CANARY]) * 4096


def test_inflate_pfn_outside_memory_is_ignored(rig):
    before = blocks(rig.mem.fd)
    rig.post("inflate", [struct.pack("<2I", 0xFFFFFFFF, 5)], [])
    assert len(rig.used("inflate")) == 1
    assert blocks(rig.mem.fd) == before
    assert rig.dev.counters["skipped_out_of_range"] == 2 * 4096


def test_inflate_on_huge_pages_waits_for_whole_host_page(rig):
    region = rig.fe.server.backend.memory.regions[0]
    region.page_size = 2 * MiB  # pretend: hugetlbfs-backed
    base = rig.data[6] >> 12
    before = blocks(rig.mem.fd)
    rig.post("inflate", [struct.pack("<256I", *range(base, base + 256))], [])
    assert blocks(rig.mem.fd) == before, "half a host page must not be discarded"
    rig.post("inflate", [struct.pack("<256I", *range(base + 256, base + 512))], [])
    assert before - blocks(rig.mem.fd) == 2 * MiB
    assert rig.mem.read(rig.data[7], 2 * MiB) == bytes([CANARY]) * (2 * MiB)


def test_target_and_actual(rig):
    assert rig.dev.set_target(1000) is True
    assert rig.fe.backend_sock.recv(64)[:4] == struct.pack("<I", 2)
    cfg = struct.unpack("<IIII", rig.fe.get_config())
    assert cfg[0] == 1000
    # the guest writes actual; QEMU sends the whole config with a stale num_pages
    stale = struct.pack("<IIII", 0, 1000, 0, 0)
    assert rig.fe.ack(R.SET_CONFIG, m.encode_config(0, 0, stale)) == 0
    assert struct.unpack("<IIII", rig.fe.get_config())[:2] == (1000, 1000)


def test_stats_buffer_kept_parsed_and_returned(rig):
    entries = struct.pack("<HQ", 4, 123 * MiB) + struct.pack("<HQ", 5, 1024 * MiB) \
        + struct.pack("<HQ", 99, 7)
    head = rig.post("stats", [entries], [])
    assert rig.used("stats") == []  # the device keeps the buffer
    assert rig.dev.latest_stats == {"free_memory": 123 * MiB, "total_memory": 1024 * MiB,
                                    "tag_99": 7}
    assert rig.dev.request_stats() is True
    assert [u.id for u in rig.used("stats")] == [head]
    assert rig.dev.request_stats() is False  # nothing held any more


def test_stats_listener_hears_each_fresh_buffer(rig):
    """on_stats (the host policy's hook) runs after a stats buffer was parsed and kept,
    once per buffer; its failure is logged and leaves the queue working."""
    heard = []
    rig.dev.on_stats = lambda: heard.append(dict(rig.dev.latest_stats))
    rig.post("stats", [struct.pack("<HQ", 4, 5 * MiB)], [])
    assert heard == [{"free_memory": 5 * MiB}]
    assert rig.dev.request_stats() is True
    rig.used("stats")

    def broken():
        raise RuntimeError("listener bug")
    rig.dev.on_stats = broken
    rig.post("stats", [struct.pack("<HQ", 4, 6 * MiB)], [])
    assert rig.dev.latest_stats == {"free_memory": 6 * MiB}
    assert rig.dev.request_stats() is True and len(rig.used("stats")) == 1
    rig.dev.on_stats = None
    rig.post("stats", [struct.pack("<HQ", 4, 7 * MiB)], [])   # no listener: fine
    assert rig.dev.latest_stats == {"free_memory": 7 * MiB}


def test_stats_interval_requests_refresh(monkeypatch):
    """The buffer goes back after stats_interval seconds, not before (the
    event loop's clock is a fake one: no real waiting, no timing)."""
    from vhostuser import loop as loop_mod
    now = [1000.0]
    monkeypatch.setattr(loop_mod, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    dev = BalloonDevice(stats_interval=5.0)
    r = Rig(device=dev)
    try:
        r.post("stats", [struct.pack("<HQ", 4, 1)], [])
        assert r.used("stats") == []
        now[0] += 4.9
        r.fe.pump()
        assert r.used("stats") == [], "the buffer went back before the interval"
        now[0] += 0.1
        r.fe.pump()
        assert len(r.used("stats")) == 1
    finally:
        r.close()


def test_stats_interval_changed_at_run_time():
    dev = BalloonDevice(stats_interval=0)
    r = Rig(device=dev)
    try:
        r.post("stats", [struct.pack("<HQ", 4, 1)], [])
        r.fe.server.loop.run_once(timeout=0.2)
        r.fe.pump()
        assert r.used("stats") == []        # polling off: the device keeps the buffer
        dev.set_stats_interval(0.05)
        r.fe.server.loop.run_once(timeout=0.5)
        r.fe.pump()
        assert len(r.used("stats")) == 1    # asked for fresh stats once the interval passed
        dev.set_stats_interval(0)
        assert dev._stats_timer is None
        with pytest.raises(ValueError):
            dev.set_stats_interval(-1)
    finally:
        r.close()


def test_two_regions_report_across_boundary():
    r = Rig(regions=[(0x1_0000_0000, 48 * MiB), (0x1_0000_0000 + 48 * MiB, 48 * MiB)])
    try:
        gpa = 0x1_0000_0000 + 47 * MiB
        r.mem.fill(gpa - MiB, 4 * MiB, CANARY)
        before = blocks(r.mem.fd)
        r.post("reporting", [], [(gpa, 2 * MiB)])
        assert len(r.used("reporting")) == 1
        # measure before reading: a read fault on a shared shmem hole allocates a page
        assert before - blocks(r.mem.fd) == 2 * MiB
        assert r.mem.read(gpa, 2 * MiB) == bytes(2 * MiB)
        assert r.mem.read(gpa - MiB, MiB) == bytes([CANARY]) * MiB
        assert r.mem.read(gpa + 2 * MiB, MiB) == bytes([CANARY]) * MiB
    finally:
        r.close()


def test_reporting_declined_by_guest():
    offered = F.offered()
    r = Rig(features=offered & ~F.REPORTING)
    try:
        assert list(r.q) == ["inflate", "deflate", "stats"]
    finally:
        r.close()


def test_disconnect_releases_memory_and_status():
    r = Rig()
    status = r.dev.status()
    assert status.queues == ("inflate", "deflate", "stats", "reporting")
    assert "REPORTING" in status.features_acked
    backend = r.fe.server.backend
    r.fe.sock.close()
    r.fe.pump()
    try:
        assert not r.fe.alive
        assert len(backend.memory) == 0 and backend.backend_channel is None
        assert not any(backend.started)
        status = r.dev.status()
        assert status.features_acked == () and status.actual_pages == 0
    finally:
        r.close()   # closes the frontend's eventfds too; its socket is closed already


def test_whole_chain_discard_counts_the_same_in_c_and_python(caplog):
    """The C engine and its Python twin (one engine call per chain) give
    the same counters, logs and memory."""
    lo = 0x1_0000_0000
    layout = [(lo, 48 * MiB), (lo + 48 * MiB, 48 * MiB)]
    bufs = [(lo + 47 * MiB + 123, 2 * MiB),          # straddles the regions, unaligned
            (lo + 10 * MiB, 4096), (lo + 11 * MiB + 1, 4095),   # whole page, nothing
            (lo + 96 * MiB - 4096 - 17, 4096 + 17),   # last page, unaligned start
            (lo + 20 * MiB, 64 * 1024)]
    # (out-of-range buffers never get this far: the ring refuses the chain;
    # tests/test_discard_segs.py covers them at the engine level)
    outcome = []
    for use_c in (True, False):
        with implementation.selected(use_c):
            r = Rig(regions=layout)
        try:
            assert r.dev.engine.use_c is use_c
            r.mem.fill(lo, 96 * MiB, CANARY)
            caplog.clear()
            r.post("reporting", [], bufs)
            assert len(r.used("reporting")) == 1
            logs = [(rec.levelname, rec.getMessage()) for rec in caplog.records
                    if rec.name.startswith("balloon_device")]
            outcome.append((dict(r.dev.counters), logs, blocks(r.mem.fd),
                            r.mem.read(lo, 96 * MiB)))
        finally:
            r.close()
    assert outcome[0] == outcome[1]
    counters, logs = outcome[0][:2]
    assert counters["report_ranges"] == len(bufs)
    assert counters["bytes_reported"] == sum(n for _, n in bufs)
    assert counters["bytes_discarded"] == 2 * MiB - 4096 + 4096 + 4096 + 64 * 1024
    assert counters["bytes_discarded"] + counters["skipped_unaligned"] == counters["bytes_reported"]
    assert logs == []


def test_out_of_range_and_failed_ranges_are_logged_per_range(impl, caplog):
    """One engine call per chain, and still one log line per skipped or
    failed range, naming what a person needs to act on."""
    from vhostuser.memory import MemoryTable, Region
    from vhostuser.vring import SEG
    fd = os.memfd_create("vub-log")
    table = MemoryTable()
    try:
        os.ftruncate(fd, 4 * MiB)
        table.add(Region(0, 2 * MiB, 0x7000_0000_0000, 0, os.dup(fd)))
        table.add(Region(2 * MiB, 2 * MiB, 0x7100_0000_0000, 2 * MiB, os.dup(fd)))
        real = table.regions[1].fd
        table.regions[1].fd = 1 << 20       # punching there fails with EBADF
        dev = BalloonDevice()
        raw = b"".join(SEG.pack(a, n, 1) for a, n in [
            (MiB, MiB), (3 * MiB, 2 * MiB), (2 * MiB, 4096), (MiB, 4096)])
        caplog.clear()
        dev._discard(table, raw, "report")
        table.regions[1].fd = real
    finally:
        table.clear()
        os.close(fd)
    logs = [(rec.levelname, rec.getMessage()) for rec in caplog.records
            if rec.name.startswith("balloon_device")]
    assert logs[0] == ("WARNING", "reported range 0x300000+0x200000 skipped: "
                                  "guest address 0x400000 is outside guest memory")
    assert logs[1][0] == "ERROR" and logs[1][1].startswith("discard failed: punch-hole Region(gpa=0x200000")
    assert "gpa=0x200000 len=0x1000 (file offset 0x200000): Bad file descriptor (EBADF)" in logs[1][1]
    assert len(logs) == 2
    c = dev.counters
    assert (c["report_ranges"], c["bytes_reported"]) == (4, 3 * MiB + 2 * 4096)
    assert c["bytes_discarded"] == MiB + 4096 and c["skipped_error"] == 4096
    assert c["skipped_out_of_range"] == 2 * MiB


def _add_region(rig, gpa, size):
    """ADD_MEM_REG of a (sealed) memfd of its own at gpa; returns the ack."""
    from vhostuser.testing import sealed_memfd
    fd = sealed_memfd("extra", 1 * MiB)
    payload = m.MEM_REG_SINGLE.pack(0) + m.MEM_REGION.pack(gpa, size, 0x7E00_0000_0000, 0)
    try:
        return rig.fe.ack(R.ADD_MEM_REG, payload, [fd])
    finally:
        os.close(fd)


def test_inflate_across_an_unaligned_region_end_is_completed(rig):
    """A PFN whose page runs past a region's end (region size not page-aligned) used to
    raise after the pop and leave the chain in flight for ever: every popped chain is
    completed, whatever happens while it is handled."""
    gpa = 0x40_0000_0000
    assert _add_region(rig, gpa, 6 * 1024) == 0          # ends in the middle of a page
    pfns = [gpa >> 12, (gpa >> 12) + 1, rig.data[3] >> 12]
    before = blocks(rig.mem.fd)
    rig.post("inflate", [struct.pack("<3I", *pfns)], [])
    assert len(rig.used("inflate")) == 1, "inflate chain never completed"
    assert rig.q["inflate"].inflight == {}
    rig.post("inflate", [struct.pack("<1I", rig.data[4] >> 12)], [])  # the queue goes on
    assert len(rig.used("inflate")) == 1
    assert before - blocks(rig.mem.fd) >= 4096


@pytest.mark.parametrize("role", ["reporting", "inflate", "stats"])
def test_a_chain_whose_handling_fails_is_still_completed(rig, role, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("simulated bug")
    if role == "reporting":
        monkeypatch.setattr(rig.dev, "_discard", boom)
        rig.post(role, [], [(rig.data[1], 2 * MiB)])
    elif role == "inflate":
        monkeypatch.setattr(rig.dev, "_read_pfns", boom)
        rig.post(role, [struct.pack("<I", rig.data[1] >> 12)], [])
    else:
        import balloon_device.stats as stats_mod
        monkeypatch.setattr(stats_mod, "parse", boom)
        rig.post(role, [bytes(10)], [])
    assert len(rig.used(role)) == 1
    assert rig.q[role].inflight == {}
    assert rig.dev.counters["malformed_chains"] == 1


def test_returning_the_stats_buffer_never_raises_out_of_a_timer(rig, monkeypatch):
    """request_stats runs from the stats timer and the policy, outside any message: a
    queue that cannot take the buffer back is logged, not raised."""
    from vhostuser.errors import VringError
    rig.post("stats", [bytes(10)], [])
    q = rig.dev._stats_queue
    assert q is not None and rig.dev._stats_head is not None

    def broken(head, length):
        raise VringError("queue 2: a ring page has no memory behind it")
    monkeypatch.setattr(q, "push", broken)
    assert rig.dev.request_stats() is False


def test_a_pause_and_resume_keeps_the_stats_coming(rig):
    """QEMU stops every queue when the VM is paused (SET_VRING_ENABLE 0, then
    GET_VRING_BASE) and starts them again on resume. The stats buffer the device holds
    goes back to the avail ring (GET_VRING_BASE's base is before it), so that after the
    restart the device pops it again; held over the stop, it was lost and the guest
    never sent statistics again (found with QMP stop/cont on a real guest)."""
    rig.post("stats", [struct.pack("<HQ", 4, 5 * MiB)], [])
    assert rig.used("stats") == [] and rig.dev.latest_stats == {"free_memory": 5 * MiB}
    assert rig.fe.ack(R.SET_VRING_ENABLE, m.VRING_STATE.pack(2, 0)) == 0
    hdr, payload, _ = rig.fe.call(R.GET_VRING_BASE, m.VRING_STATE.pack(2, 0), need_reply=True)
    index, base = m.VRING_STATE.unpack(payload)
    assert (index, base) == (2, 0)                 # the buffer is offered again
    assert rig.dev.request_stats() is False        # not held any more
    dq = rig.q["stats"]
    rig.dev.latest_stats = None
    rig.fe.start_queue(2, QSIZE, dq.desc_uva, dq.avail_uva, dq.used_uva, base=base)
    rig.fe.pump()
    assert rig.dev.latest_stats == {"free_memory": 5 * MiB}   # popped again at the start
    assert rig.dev.request_stats() is True         # and held: the next request works
    assert len(rig.used("stats")) == 1


def test_a_stats_buffer_that_cannot_go_back_to_the_ring_is_completed_instead(rig):
    """A driver that rewrote the avail slot of the held stats buffer after the device
    popped it: the buffer cannot be offered again (unpop checks the slot), so the
    device completes it with length 0 when QEMU stops the queue; the guest gets its
    buffer back either way and sends stats again."""
    head = rig.post("stats", [struct.pack("<HQ", 4, 5 * MiB)], [])
    assert rig.used("stats") == [] and rig.dev.latest_stats == {"free_memory": 5 * MiB}
    dq = rig.q["stats"]
    rig.mem.write_u16(dq.avail_gpa + 4, head + 1)    # slot 0 names another chain now
    assert rig.fe.ack(R.SET_VRING_ENABLE, m.VRING_STATE.pack(2, 0)) == 0
    assert [(u.id, u.len) for u in rig.used("stats")] == [(head, 0)]
    assert rig.dev.request_stats() is False          # nothing held any more
