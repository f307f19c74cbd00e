"""The balloon device end to end over a socketpair frontend: chains laid out
as the Linux driver lays them out, over a real memfd; release is measured
(memfd allocated blocks), neighbours are checked with canaries."""

import os
import struct
import types

import pytest

from balloon_device import features as F
from balloon_device.device import BalloonDevice
from vhostuser.testing.driver import DriverQueue, GuestMemory
from vhostuser.testing.frontend import Frontend
from vhostuser import messages as m
from vhostuser.messages import Request as R

MiB = 1 << 20
GUEST = 96 * MiB
CANARY = 0xA5
QSIZE = 64


def blocks(fd):
    return os.fstat(fd).st_blocks * 512


class Rig:
    """A guest (memfd + 4 driver queues) attached to a BalloonDevice."""

    def __init__(self, device=None, use_c=True, features=None, regions=None, early_config=None,
                 table=None):
        """table: indices of the layout's regions the first SET_MEM_TABLE
        holds (default all); the queues and data live in the first one."""
        self.mem = GuestMemory(GUEST, regions=regions)
        self.dev = device or BalloonDevice(use_c=use_c)
        self.fe = Frontend(self.dev, use_c=use_c)
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


@pytest.fixture(params=[True, False], ids=["C", "python"])
def rig(request):
    r = Rig(use_c=request.param)
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

    # reporting chains go through discard_chain (whole chain in one call),
    # or discard (per piece) when the memory table needs the general path
    engine.discard = spy(engine.discard)
    engine.discard_chain = spy(engine.discard_chain)
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


@pytest.mark.parametrize("use_c", [True, False], ids=["C", "python"])
def test_poison_written_before_set_features_blocks_discard(use_c):
    """QEMU's real order: SET_CONFIG(poison) during probe, SET_FEATURES at
    DRIVER_OK.  The value must survive and stop every discard."""
    poison = 0xAAAAAAAA  # Linux's PAGE_POISON byte, page_poison=1
    r = Rig(use_c=use_c, early_config=struct.pack("<IIII", 0, 0, 0, poison))
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


@pytest.mark.parametrize("use_c", [True, False], ids=["C", "python"])
def test_zero_poison_before_set_features_allows_discard(use_c):
    """init_on_free=1: Linux writes poison_val 0 early; discards go on."""
    r = Rig(use_c=use_c, early_config=struct.pack("<IIII", 0, 0, 0, 0))
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


@pytest.mark.parametrize("use_c", [True, False], ids=["C", "python"])
def test_whole_chain_discard_counts_like_the_per_piece_path(use_c, caplog):
    """discard_chain (one engine call per chain) and the per-piece path
    (split + discard) give the same counters, logs and memory."""
    lo = 0x1_0000_0000
    layout = [(lo, 48 * MiB), (lo + 48 * MiB, 48 * MiB)]
    bufs = [(lo + 47 * MiB + 123, 2 * MiB),          # straddles the regions, unaligned
            (lo + 10 * MiB, 4096), (lo + 11 * MiB + 1, 4095),   # whole page, nothing
            (lo + 96 * MiB - 4096 - 17, 4096 + 17),   # last page, unaligned start
            (lo + 20 * MiB, 64 * 1024)]
    # (out-of-range buffers never get this far: the ring refuses the chain;
    # tests/test_discard_segs.py covers them at the engine level)
    outcome = []
    for fast in (True, False):
        r = Rig(regions=layout, use_c=use_c)
        try:
            if not fast:
                r.dev.engine.discard_chain = lambda memory, raw: None
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
