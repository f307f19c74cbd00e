"""Host memory policy: the pure decision table, the host readers on fake /proc and
cgroup folders, and the loop with fake readers (plus one run on a real daemon)."""

import struct

import pytest

from balloon_device.host.config import DaemonConfig
from balloon_device.host.status import GuestStatus
from balloon_device.errors import ConfigError
from balloon_device.host.policy import (GuestView, HostMemory, HostReader, PolicyConfig, PolicyLoop,
                                   decide, parse_meminfo, parse_psi, view_of)

MiB = 1 << 20
GiB = 1 << 30
PG = 256  # 4 KiB pages per MiB

CFG = PolicyConfig(floor_bytes=2 * GiB, guest_min_bytes=256 * MiB, margin_bytes=128 * MiB,
                   hysteresis_bytes=512 * MiB, psi_threshold=10.0, psi_step_bytes=256 * MiB)


def G(target=0, actual=None, mem=4096, avail=None, busy=False):
    """A guest in MiB: balloon target/actual, RAM, available_memory stat (None: no stats)."""
    return GuestView(target_pages=target * PG, actual_pages=(target if actual is None else actual) * PG,
                     memory_bytes=mem * MiB, available_bytes=None if avail is None else avail * MiB,
                     busy=busy)


def H(avail_mib, psi=None):
    return HostMemory(avail_mib * MiB, psi)


CASES = [
    # name, host, guests, expected targets in MiB
    ("between floor and floor+hysteresis: hold",
     H(2048 + 100), {"a": G(300, avail=1000)}, {"a": 300}),
    ("no guests", H(100), {}, {}),
    ("below the floor: inflate by the deficit",
     H(1536), {"a": G(0, avail=3072)}, {"a": 512}),
    ("deficit shared in proportion to headroom",
     H(2048 - 768), {"a": G(0, avail=1024 + 128), "b": G(0, avail=2048 + 128)},
     {"a": 256, "b": 512}),
    ("headroom counts from the current target",
     H(2048 - 256), {"a": G(512, avail=512 + 128 + 256)}, {"a": 768}),
    ("guest keeps --policy-guest-min of its RAM",
     H(100), {"a": G(0, mem=1024, avail=1024)}, {"a": 1024 - 256}),
    ("guest keeps its available memory minus the margin",
     H(100), {"a": G(0, avail=600)}, {"a": 600 - 128}),
    ("a guest that needs its memory back gets it, even under pressure",
     H(100), {"a": G(512, avail=100)}, {"a": 512 - 28}),
    ("no stats: never inflated further, target kept",
     H(100), {"a": G(256)}, {"a": 256}),
    ("not enough headroom: every guest to its cap",
     H(0), {"a": G(0, avail=228), "b": G(0, avail=328)}, {"a": 100, "b": 200}),
    ("PSI pressure above the floor: one step",
     H(10 * 1024, psi=25.0), {"a": G(0, avail=3072)}, {"a": 256}),
    ("PSI below the threshold is not pressure: surplus returns memory",
     H(10 * 1024, psi=5.0), {"a": G(256, avail=3072)}, {"a": 0}),
    ("pressure passed: a big surplus returns everything",
     H(8192), {"a": G(512, avail=1000), "b": G(256, avail=1000)}, {"a": 0, "b": 0}),
    ("a busy (allocating) guest gets its balloon back and is not inflated; the others are",
     H(100), {"a": G(300, avail=2000, busy=True), "b": G(0, avail=1000)}, {"a": 0, "b": 872}),
    ("a busy guest gets its balloon back even between floor and floor+hysteresis",
     H(2048 + 100), {"a": G(300, avail=1000, busy=True), "b": G(300, avail=1000)},
     {"a": 0, "b": 300}),
    ("a small surplus returns memory in proportion to the balloons",
     H(2048 + 512 + 300), {"a": G(400, avail=1000), "b": G(200, avail=1000)},
     {"a": 200, "b": 100}),
]


@pytest.mark.parametrize("name, host, guests, expected", CASES, ids=[c[0] for c in CASES])
def test_decide(name, host, guests, expected):
    got = decide(host, guests, CFG)
    assert {n: p / PG for n, p in got.items()} == expected


def test_psi_ignored_when_threshold_is_zero():
    cfg = PolicyConfig(psi_threshold=0)
    assert decide(H(10 * 1024, psi=99.0), {"a": G(0, avail=3072)}, cfg) == {"a": 0}


def test_inflation_matches_the_deficit_exactly():
    guests = {n: G(0, avail=a) for n, a in (("a", 777), ("b", 1234), ("c", 3001))}
    got = decide(HostMemory(2 * GiB - 999 * 4096), guests, CFG)
    assert sum(got.values()) == 999


@pytest.mark.parametrize("kw", [dict(interval=0), dict(psi_threshold=101),
                                dict(floor_bytes=-1), dict(cgroup="/nonexistent/cg")])
def test_bad_policy_config(kw):
    with pytest.raises(ConfigError):
        PolicyConfig(**kw)


@pytest.mark.parametrize("args,words", [
    (["--policy-sweep", "-1"], "cannot read size"),
    (["--policy-sweep-quiet", "0"], "--policy-sweep-quiet must be > 0 seconds"),
    (["--policy-sweep-every", "-5"], "--policy-sweep-every must be > 0 seconds"),
    (["--policy-sweep-timeout", "0"], "--policy-sweep-timeout must be > 0 seconds"),
])
def test_bad_sweep_options_name_the_option(args, words):
    from balloon_device.host.cli import _daemon_parser, _policy_from_args
    ns = _daemon_parser().parse_args(["--socket-path", "/tmp/x.sock", "--policy", *args])
    with pytest.raises(ConfigError, match=words):
        _policy_from_args(ns)
    assert PolicyConfig(sweep_bytes=0).sweep_bytes == 0     # 0 = sweeps off, accepted
    with pytest.raises(ConfigError, match="--policy-sweep must be >= 0"):
        PolicyConfig(sweep_bytes=-1)


def test_policy_needs_stats(tmp_path):
    with pytest.raises(ConfigError, match="no-stats"):
        DaemonConfig(socket_path=str(tmp_path / "x.sock"), stats=False, policy=PolicyConfig())


# ---- host readers ------------------------------------------------------------

MEMINFO = "MemTotal:       24000000 kB\nMemFree:         1000 kB\nMemAvailable:    3000000 kB\n"
PSI = "some avg10=12.50 avg60=3.00 avg300=0.50 total=12345\nfull avg10=1.00 avg60=0 avg300=0 total=1\n"


def test_parsers():
    assert parse_meminfo(MEMINFO)["MemAvailable"] == 3000000 * 1024
    assert parse_psi(PSI) == 12.5
    assert parse_psi("full avg10=1.00\n") is None


def fake_proc(tmp_path, psi=True):
    proc = tmp_path / "proc"
    (proc / "pressure").mkdir(parents=True, exist_ok=True)
    (proc / "meminfo").write_text(MEMINFO)
    if psi:
        (proc / "pressure" / "memory").write_text(PSI)
    return proc


def test_host_reader_proc(tmp_path):
    host = HostReader(proc=str(fake_proc(tmp_path))).read()
    assert host == HostMemory(3000000 * 1024, 12.5)
    assert HostReader(proc=str(fake_proc(tmp_path / "x", psi=False))).read().psi_some_avg10 is None


def test_host_reader_cgroup_v1(tmp_path):
    cg = tmp_path / "cg"
    cg.mkdir()
    (cg / "memory.limit_in_bytes").write_text(str(4 * GiB))
    (cg / "memory.usage_in_bytes").write_text(str(3 * GiB))
    host = HostReader(cgroup=str(cg), proc=str(fake_proc(tmp_path))).read()
    assert host.available_bytes == 1 * GiB  # the cgroup is tighter than the host
    (cg / "memory.limit_in_bytes").write_text("9223372036854771712")  # unlimited
    assert HostReader(cgroup=str(cg), proc=str(fake_proc(tmp_path))).read().available_bytes \
        == 3000000 * 1024


def test_host_reader_cgroup_v2(tmp_path):
    cg = tmp_path / "cg"
    cg.mkdir()
    (cg / "memory.max").write_text("max\n")
    (cg / "memory.current").write_text(str(GiB))
    (cg / "memory.pressure").write_text("some avg10=50.00 avg60=0 avg300=0 total=1\n")
    host = HostReader(cgroup=str(cg), proc=str(fake_proc(tmp_path))).read()
    assert host == HostMemory(3000000 * 1024, 50.0)


# ---- the loop ----------------------------------------------------------------

class FakeLoop:
    def __init__(self):
        self.timers = []

    def call_later(self, delay, cb):
        self.timers.append((delay, cb))
        return cb

    def cancel(self, handle):
        pass


class FakeGuest:
    def __init__(self, target=0, avail=None, connected=True, stats_age=1.0):
        self.target = target * PG
        self.avail = avail
        self.connected = connected
        self.stats_age = stats_age
        self.set_calls = []
        self.stats_requests = 0
        self.actual = None          # None: the balloon follows the target at once
        self.features = ["REPORTING"]

    def status(self):
        return GuestStatus.from_dict({"connected": self.connected,
                "features_acked": self.features if self.connected else [],
                "target_pages": self.target,
                "actual_pages": self.target if self.actual is None else self.actual,
                "memory_bytes": 4 * GiB, "stats_age": self.stats_age,
                "stats": {} if self.avail is None else {"available_memory": self.avail * MiB}})

    def set_target(self, pages):
        self.set_calls.append(pages)
        self.target = pages
        return True

    def request_stats(self):
        self.stats_requests += 1


def test_loop_applies_changed_targets_only():
    guests = {"a": FakeGuest(avail=2048), "b": FakeGuest(target=100, avail=128),
              "off": FakeGuest(avail=4000, connected=False)}
    host = [H(1024)]
    loop = FakeLoop()
    pol = PolicyLoop(CFG, guests, loop, host_reader=lambda: host[0])
    pol.start()
    delay, tick = loop.timers.pop()
    assert delay == 0
    tick()
    assert guests["a"].set_calls == [1024 * PG]    # a had 1920 MiB headroom, b none
    assert guests["b"].set_calls == []             # unchanged: not re-sent
    assert guests["off"].set_calls == [] and guests["off"].stats_requests == 0
    assert guests["a"].stats_requests == 1
    assert loop.timers[-1][0] == CFG.interval      # next tick scheduled
    assert pol.last["pressure"] and pol.last["host_available"] == 1024 * MiB
    host[0] = H(8192)                              # pressure passed
    loop.timers.pop()[1]()
    assert guests["a"].set_calls[-1] == 0 and guests["b"].set_calls == [0]
    assert not pol.last["pressure"]


def loop_rig(monkeypatch, guests, host_mib, cfg=CFG):
    """A started PolicyLoop on a fake loop and clock: (pol, [host memory], tick(dt))."""
    import balloon_device.host.policy as policy
    now = [1000.0]
    monkeypatch.setattr(policy.time, "monotonic", lambda: now[0])
    loop = FakeLoop()
    host = [H(host_mib)]
    pol = PolicyLoop(cfg, guests, loop, host_reader=lambda: host[0])
    pol.start()

    def tick(dt=1.0):
        now[0] += dt
        loop.timers.pop()[1]()
        return pol.last
    return pol, host, tick


def test_loop_marks_an_allocating_guest_busy(monkeypatch):
    """available falling by more than the margin plus the balloon's growth between ticks
    = allocating: the guest's balloon goes back to 0 and stays there for busy_hold
    seconds. A fall explained by a growing balloon (the policy's own inflation, seen in
    the stats a tick late) is not."""
    guests = {"new": FakeGuest(avail=2048), "idle": FakeGuest(avail=600)}
    pol, host, tick = loop_rig(monkeypatch, guests, 2048 - 512)
    tick(0)                                      # deficit 512 MiB, shared by headroom
    assert guests["new"].target > 0 and guests["idle"].target > 0
    host[0] = H(2048 + 100)                      # floor reached: hold
    for g in guests.values():                    # the inflation shows in the stats a tick late
        g.avail -= g.target // PG
    tick()
    assert pol.last["busy"] == []
    host[0] = H(2048 - 64)                       # a little more inflation ...
    before = guests["new"].target
    tick()
    host[0] = H(2048 + 100)
    guests["new"].avail -= (guests["new"].target - before) // PG + 300  # ... while it allocates
    tick()
    assert pol.last["busy"] == ["new"]
    assert guests["new"].target == 0 and guests["idle"].target > 0
    guests["new"].avail += 200                   # the balloon it got back shows up
    tick(CFG.busy_hold - 2)                      # within busy_hold: left alone
    assert pol.last["busy"] == ["new"] and guests["new"].target == 0
    host[0] = H(2048 - 512)
    tick(3)                                      # hold over: an idle guest again
    assert pol.last["busy"] == [] and guests["new"].target > 0


# ---- sweeps ------------------------------------------------------------------------

SWEEP_CFG = PolicyConfig(floor_bytes=2 * GiB, guest_min_bytes=256 * MiB, margin_bytes=128 * MiB,
                         hysteresis_bytes=512 * MiB, psi_threshold=0, sweep_bytes=128 * MiB,
                         sweep_quiet=15.0, sweep_timeout=20.0, sweep_every=600.0)


def test_sweep_raises_a_quiet_guests_balloon_and_gives_it_back(monkeypatch):
    g = FakeGuest(target=100, avail=900)
    # the host is short (within floor + hysteresis) but not under the floor
    pol, host, tick = loop_rig(monkeypatch, {"a": g}, 2048 + 100, SWEEP_CFG)
    tick(0)
    for _ in range(14):                                    # quiet for < 15 s: nothing yet
        assert tick()["sweeping"] is None and g.target == 100 * PG
    assert tick()["sweeping"] == "a"                       # 15 s quiet: 100 + 128 MiB
    assert g.set_calls == [228 * PG]
    last = tick()                                          # the balloon got there: back to 100
    assert last["sweeping"] is None and last["sweeps"] == {"a": 1}
    assert g.set_calls == [228 * PG, 100 * PG]
    for _ in range(100):                                   # once per quiet spell
        assert tick()["sweeping"] is None
    assert tick(600)["sweeping"] == "a"                    # ... and again after sweep_every


def test_sweep_waits_for_the_balloon_and_gives_up_after_the_timeout(monkeypatch):
    g = FakeGuest(target=0, avail=900)
    pol, host, tick = loop_rig(monkeypatch, {"a": g}, 2048 + 100, SWEEP_CFG)
    tick(0)
    g.actual = 0                                           # the balloon does not move
    assert tick(15)["sweeping"] == "a" and g.target == 128 * PG
    assert tick(10)["sweeping"] == "a"                     # still waiting
    last = tick(10)                                        # 20 s: given up, memory given back
    assert last["sweeping"] is None and last["sweeps"] == {} and g.target == 0
    assert tick(100)["sweeping"] is None                   # not retried before sweep_every


def test_sweep_stops_when_the_guest_allocates(monkeypatch):
    g = FakeGuest(target=0, avail=900)
    pol, host, tick = loop_rig(monkeypatch, {"a": g}, 2048 + 100, SWEEP_CFG)
    tick(0)
    g.actual = 0
    assert tick(15)["sweeping"] == "a"
    g.avail -= 400                                         # it allocates
    last = tick()
    assert last["busy"] == ["a"] and last["sweeping"] is None and g.target == 0


@pytest.mark.parametrize("host_mib,avail,sweep,feats,why", [
    (2048 + 512 + 100, 900, 128 * MiB, ["REPORTING"], "the host has plenty: no sweeping"),
    (2048 + 100, 128 + 100, 128 * MiB, ["REPORTING"], "no room above the guest's margin"),
    (2048 + 100, 900, 0, ["REPORTING"], "--policy-sweep 0"),
    (2048 + 100, 900, 128 * MiB, ["STATS_VQ"], "no free page reporting: nothing to flush to"),
])
def test_no_sweep(monkeypatch, host_mib, avail, sweep, feats, why):
    from dataclasses import replace
    g = FakeGuest(target=0, avail=avail)
    g.features = feats
    pol, host, tick = loop_rig(monkeypatch, {"a": g}, host_mib,
                               replace(SWEEP_CFG, sweep_bytes=sweep))
    tick(0)
    for _ in range(40):
        assert tick()["sweeping"] is None, why
    assert g.set_calls == [] or g.set_calls[-1] == 0, why


def test_sweep_leaves_decide_its_own_targets(monkeypatch):
    """Under the floor during a sweep, the policy's inflation adds to the base, and the
    sweep ends at the new base, not at the old one."""
    g = FakeGuest(target=0, avail=1500)
    pol, host, tick = loop_rig(monkeypatch, {"a": g}, 2048 + 100, SWEEP_CFG)
    tick(0)
    g.actual = 0
    assert tick(15)["sweeping"] == "a" and g.target == 128 * PG
    host[0] = H(2048 - 64)                                 # 64 MiB short: base 0 -> 64
    assert tick()["targets"]["a"] == 128 * PG              # max(base 64, sweep 128)
    g.actual = None
    host[0] = H(2048 + 100)
    last = tick()
    assert last["sweeping"] is None and g.target == 64 * PG


def test_loop_survives_a_failing_reader():
    loop = FakeLoop()

    def broken():
        raise OSError("no /proc")
    pol = PolicyLoop(CFG, {"a": FakeGuest()}, loop, host_reader=broken)
    pol.start()
    loop.timers.pop()[1]()
    assert loop.timers and loop.timers[-1][0] == CFG.interval


def test_stale_stats_count_as_no_stats():
    st = FakeGuest(target=10, avail=3000, stats_age=100.0).status()
    assert view_of(st, CFG).available_bytes is None
    st = FakeGuest(target=10, avail=3000, stats_age=1.0).status()
    assert view_of(st, CFG).available_bytes == 3000 * MiB


def test_policy_on_a_real_daemon(tmp_path):
    """Stats from a guest's stats queue drive a target that reaches the frontend."""
    from test_multi import GuestRig, make_daemon
    from vhostuser import messages as m
    host = [H(1024)]
    d = make_daemon(tmp_path, names=("a",), policy=PolicyConfig(
        interval=60, guest_min_bytes=16 * MiB, margin_bytes=8 * MiB))
    d.policy.read_host = lambda: host[0]
    rig = GuestRig(d, "a")
    try:
        stats = struct.pack("<HQ", 6, 40 * MiB) + struct.pack("<HQ", 4, 30 * MiB)
        gpa = rig.mem.alloc(len(stats))
        rig.mem.write(gpa, stats)
        rig.q["stats"].add([(gpa, len(stats))], [])
        rig.fe.kick(rig.kicks["stats"])
        targets = d.policy.tick()
        assert targets == {"a": (40 - 8) * PG}  # deficit 1 GiB, capped: available - margin
        assert d.guests["a"].device.target_pages == (40 - 8) * PG
        assert rig.fe.backend_sock.recv(64)[:4] == struct.pack(
            "<I", m.BackendRequest.CONFIG_CHANGE_MSG)
        rig.fe.pump()
        assert len(rig.q["stats"].pop_used()) == 1  # the policy asked for fresh stats
    finally:
        rig.close()
        d.close()


def test_one_guest_failing_does_not_abort_the_tick_for_the_others():
    """A guest whose stats request raises (e.g. its call fd is unwritable) is dropped
    alone; the guests after it still get their targets and stats requests."""
    class Broken(FakeGuest):
        drops = 0

        def request_stats(self):
            raise OSError(9, "Bad file descriptor")

        def failed(self):
            self.drops += 1

    guests = {"a": Broken(avail=2048), "b": FakeGuest(avail=2048)}
    loop = FakeLoop()
    pol = PolicyLoop(CFG, guests, loop, host_reader=lambda: H(1024))
    pol.start()
    loop.timers.pop()[1]()
    assert guests["a"].drops == 1
    assert guests["b"].stats_requests == 1 and guests["b"].set_calls
    assert pol.last is not None    # the tick ran to its end
