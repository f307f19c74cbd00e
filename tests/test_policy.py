"""Host memory policy: the pure decision table, the host readers on fake /proc and
cgroup folders, and the loop with fake readers (plus one run on a real daemon)."""

import os
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
                   hysteresis_bytes=512 * MiB, psi_threshold=10.0, psi_step_bytes=256 * MiB,
                   fast_reclaim=False)


def G(target=0, actual=None, mem=4096, avail=None, busy=False, stall=False):
    """A guest in MiB: balloon target/actual, RAM, available_memory stat (None: no stats)."""
    return GuestView(target_pages=target * PG, actual_pages=(target if actual is None else actual) * PG,
                     memory_bytes=mem * MiB, available_bytes=None if avail is None else avail * MiB,
                     busy=busy, stalling=stall)


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
    ("a stalling guest (taskstats) is squeezed last",
     H(2048 - 512), {"a": G(0, avail=1000, stall=True), "b": G(0, avail=1000)},
     {"a": 0, "b": 512}),
    ("a stalling guest is squeezed when the others have no room left",
     H(2048 - 1024), {"a": G(0, avail=1000, stall=True), "b": G(0, avail=128 + 512)},
     {"a": 512, "b": 512}),
    ("a stalling guest gets its balloon back first",
     H(2048 + 512 + 300), {"a": G(400, avail=1000, stall=True), "b": G(200, avail=1000)},
     {"a": 100, "b": 200}),
    ("a surplus larger than the stalling guest's balloon goes on to the others",
     H(2048 + 512 + 500), {"a": G(400, avail=1000, stall=True), "b": G(200, avail=1000)},
     {"a": 0, "b": 100}),
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
    (["--policy-fast-settle", "-0.5"], "--policy-fast-settle must be >= 0 seconds"),
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
        self.free = None            # free_memory stat in MiB (None: = avail)
        self.pid = None             # its QEMU's pid (SO_PEERCRED)
        self.stats_actual = None    # balloon pages when the stats arrived (MiB; None: unknown)
        self.backed = None          # ram_backed_bytes in MiB (None: unknown)

    def status(self):
        return GuestStatus.from_dict({"connected": self.connected,
                "features_acked": self.features if self.connected else [],
                "target_pages": self.target,
                "actual_pages": self.target if self.actual is None else self.actual,
                "memory_bytes": 4 * GiB, "stats_age": self.stats_age,
                "ram_backed_bytes": None if self.backed is None else self.backed * MiB,
                "frontend_pid": self.pid,
                "stats_actual_pages": None if self.stats_actual is None else self.stats_actual * PG,
                "stats": {} if self.avail is None else {
                    "available_memory": self.avail * MiB,
                    "free_memory": (self.avail if self.free is None else self.free) * MiB}})

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
                         sweep_quiet=15.0, sweep_timeout=20.0, sweep_every=600.0,
                         fast_reclaim=False)


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


# ---- fast reclaim -------------------------------------------------------------------

FAST_CFG = PolicyConfig(
    floor_bytes=2 * GiB, guest_min_bytes=256 * MiB, margin_bytes=128 * MiB,
    hysteresis_bytes=512 * MiB, psi_threshold=10.0, sweep_bytes=0, interval=5.0,
    fast_reclaim=True, fast_interval=1.0, fast_min_bytes=256 * MiB, fast_timeout=15.0,
    fast_cooldown=30.0, fast_settle=0.0)   # settle: its own tests below


def freed_guest(free=900, unreported=None):
    """A 4 GiB guest that just freed memory: `free` MiB free, `unreported` MiB of it
    still backed on the host (default: all of it; reporting has not started)."""
    g = FakeGuest(target=0, avail=free)
    g.backed = 4096 - free + (free if unreported is None else unreported)
    return g


def test_fast_reclaim_takes_the_free_memory_at_once_and_gives_it_back(monkeypatch):
    g = freed_guest()
    pol, host, tick = loop_rig(monkeypatch, {"a": g}, 2048 + 1024, FAST_CFG)
    loop = pol.loop
    last = tick(0)
    assert last["fast"] == {} and loop.timers[-1][0] == 5.0      # no pressure: idle pace
    host[0] = H(2048 - 64)                                       # 64 MiB short
    g.actual = 0                                                 # the balloon takes a moment
    last = tick(5)
    assert last["fast"] == {"a": (900 - 64) * PG}               # all its free memory - margin
    assert g.target == (900 - 64) * PG and last["targets"]["a"] == g.target
    assert loop.timers[-1][0] == 1.0                             # fast pace under pressure
    assert g.stats_requests == 2
    g.actual = 400 * PG                                          # half way: hold
    assert tick(1)["fast"] == {"a": (900 - 64) * PG} and g.target == (900 - 64) * PG
    g.actual = None                                              # the balloon got there
    last = tick(1)
    assert last["fast"] == {} and last["fast_done"] == {"a": 1}
    assert g.target == last["targets"]["a"] < 256 * PG           # back to decide()'s share
    host[0] = H(8192)                                            # pressure over
    tick(1)
    assert g.target == 0 and loop.timers[-1][0] == 5.0           # idle pace again


def test_fast_reclaim_takes_only_what_the_host_still_holds(monkeypatch):
    """Reporting already returned 300 of the 900 MiB free: the balloon takes the 600 the
    host still holds (minus the half margin), not all 900. Pages beyond it would be zeroed
    by the guest (init_on_alloc), faulted in on the host again and discarded: CPU that
    the storm benchmark's allocations needed, and a transient rise, for nothing."""
    g = freed_guest(free=900, unreported=600)
    pol, host, tick = loop_rig(monkeypatch, {"a": g}, 2048 - 64, FAST_CFG)
    g.actual = 0
    assert tick(0)["fast"] == {"a": (600 - 64) * PG}


def test_fast_reclaim_off_takes_only_the_share_of_the_need(monkeypatch):
    from dataclasses import replace
    g = freed_guest()
    pol, host, tick = loop_rig(monkeypatch, {"a": g}, 2048 - 64,
                               replace(FAST_CFG, fast_reclaim=False))
    last = tick(0)
    assert last["fast"] == {} and g.target == 64 * PG
    assert pol.loop.timers[-1][0] == 5.0


def test_fast_reclaim_goes_on_after_the_pressure_until_the_balloon_got_there(monkeypatch):
    """The pressure ending does not cut a fast reclaim short (the reclaim benchmark: cut
    at floor + hysteresis it took half of the free memory, the rest came at reporting's
    pace); it ends when the balloon got there, and the target goes back to decide()'s."""
    g = freed_guest()
    pol, host, tick = loop_rig(monkeypatch, {"a": g}, 2048 - 64, FAST_CFG)
    g.actual = 0
    assert tick(0)["fast"] == {"a": (900 - 64) * PG}
    host[0] = H(8192)                            # above floor + hysteresis
    g.actual = 400 * PG                          # half way
    last = tick(1)
    assert last["fast"] == {"a": (900 - 64) * PG} and g.target == (900 - 64) * PG
    assert pol.loop.timers[-1][0] == 1.0         # still the fast pace
    g.actual = None                              # got there
    last = tick(1)
    assert last["fast"] == {} and last["fast_done"] == {"a": 1}
    assert g.target == 0                         # decide()'s own target (surplus: 0)


def test_fast_pace_asks_for_stats_every_quarter(monkeypatch):
    g = freed_guest()
    g.actual = 0
    pol, host, tick = loop_rig(monkeypatch, {"a": g}, 2048 - 64, FAST_CFG)
    tick(0)
    refresh, nxt = pol.loop.timers[-2:]
    assert nxt[0] == 1.0 and refresh[0] == 0.25
    before = g.stats_requests
    for k in range(3):                           # at 1/4, 2/4 and 3/4 of the interval
        refresh[1]()
        assert g.stats_requests == before + k + 1
        if k < 2:
            refresh = pol.loop.timers[-1]
            assert refresh[0] == 0.25
            pol.loop.timers.pop()
    assert pol.loop.timers[-1] is nxt            # no fourth: the tick asks itself
    host[0] = H(8192)
    g.actual = None                              # and the balloon got there: idle again
    n = len(pol.loop.timers)
    tick(1)                     # pops one timer, adds the next tick and the host watch
    assert len(pol.loop.timers) == n + 1 and pol.loop.timers[-1][0] == 5.0
    assert pol.loop.timers[-2][0] == 1.0 and pol.loop.timers[-2][1] == pol._watch


def test_fast_reclaim_never_squeezes_a_busy_guest(monkeypatch):
    g = freed_guest()
    pol, host, tick = loop_rig(monkeypatch, {"a": g}, 2048 + 100, FAST_CFG)
    tick(0)
    g.avail -= 300                               # it allocates ...
    g.backed += 300
    host[0] = H(2048 - 64)                       # ... while the host falls short
    last = tick(1)
    assert last["busy"] == ["a"] and last["fast"] == {} and g.target == 0


def test_fast_reclaim_gives_the_memory_back_when_the_guest_allocates(monkeypatch):
    g = freed_guest()
    pol, host, tick = loop_rig(monkeypatch, {"a": g}, 2048 - 64, FAST_CFG)
    g.actual = 100 * PG                          # the balloon is on its way
    assert tick(0)["fast"]
    g.avail -= 100 + 400                         # the balloon's 100 MiB and 400 of its own
    last = tick(1)
    assert last["busy"] == ["a"] and last["fast"] == {} and g.target == 0


def test_no_fast_reclaim_when_reporting_caught_up(monkeypatch):
    g = freed_guest(free=900, unreported=100)    # only 100 MiB still backed
    pol, host, tick = loop_rig(monkeypatch, {"a": g}, 2048 - 64, FAST_CFG)
    assert tick(0)["fast"] == {} and g.target == 64 * PG
    g.avail -= 64                                # decide()'s 64 MiB went into the balloon
    g.backed = None                              # unknown: the free memory counts
    assert tick(1)["fast"] == {"a": (900 - 64) * PG}


def test_fast_reclaim_ends_early_when_reporting_catches_up(monkeypatch):
    g = freed_guest()
    pol, host, tick = loop_rig(monkeypatch, {"a": g}, 2048 - 64, FAST_CFG)
    g.actual = 0
    assert tick(0)["fast"]
    g.backed = 4096 - 900 + 50                   # reporting returned nearly all of it
    last = tick(1)
    assert last["fast"] == {} and last["fast_done"] == {"a": 1}


def test_fast_reclaim_times_out_and_cools_down(monkeypatch):
    g = freed_guest()
    pol, host, tick = loop_rig(monkeypatch, {"a": g}, 2048 - 1, FAST_CFG)
    g.actual = 0                                 # the balloon never moves
    assert tick(0)["fast"]
    for _ in range(14):
        assert tick(1)["fast"]
    last = tick(1)                               # 15 s: given up
    assert last["fast"] == {} and last["fast_done"] == {}
    for _ in range(29):                          # not again before the cooldown
        assert tick(1)["fast"] == {}
    assert tick(1)["fast"]


def test_fast_reclaim_restores_the_target_of_a_guest_that_went_away(monkeypatch):
    g = freed_guest()
    pol, host, tick = loop_rig(monkeypatch, {"a": g}, 2048 - 64, FAST_CFG)
    g.actual = 0
    assert tick(0)["fast"]
    g.connected = False
    last = tick(1)
    assert last["fast"] == {} and g.target == 64 * PG     # decide()'s, not the fast one


def test_fast_reclaim_options():
    from balloon_device.host.cli import _daemon_parser, _policy_from_args
    ns = _daemon_parser().parse_args(["--socket-path", "/tmp/x.sock", "--policy"])
    cfg = _policy_from_args(ns)
    assert not cfg.fast_reclaim, "fast reclaim is opt-in (the boot storm shows no gain yet)"
    assert cfg.fast_interval == 1.0 and cfg.fast_min_bytes == 256 * MiB
    assert cfg.fast_settle == 0.5
    ns = _daemon_parser().parse_args(["--socket-path", "/tmp/x.sock", "--policy",
                                      "--policy-fast-reclaim"])
    assert _policy_from_args(ns).fast_reclaim
    ns = _daemon_parser().parse_args(["--socket-path", "/tmp/x.sock", "--policy",
                                      "--no-policy-fast-reclaim", "--policy-fast-interval", "0.5",
                                      "--policy-fast-min", "1GiB"])
    cfg = _policy_from_args(ns)
    assert not cfg.fast_reclaim and cfg.fast_interval == 0.5 and cfg.fast_min_bytes == GiB
    ns = _daemon_parser().parse_args(["--socket-path", "/tmp/x.sock", "--policy",
                                      "--policy-fast-interval", "0"])
    with pytest.raises(ConfigError, match="--policy-fast-interval must be > 0"):
        _policy_from_args(ns)


def test_busy_detection_is_not_hidden_by_fast_ticks(monkeypatch):
    """A guest allocating 60 MiB a second never falls by the margin between two 1 s
    ticks, but does within a --policy-interval."""
    g = FakeGuest(avail=2000)
    pol, host, tick = loop_rig(monkeypatch, {"a": g}, 2048 + 100, FAST_CFG)
    tick(0)
    for _ in range(4):
        g.avail -= 60
        last = tick(1)
    assert last["busy"] == ["a"]


class FakePressure:
    """PressureReader stand-in: stall ms/s per pid."""

    def __init__(self):
        self.stall = {}
        self.asked = []

    def sample(self, pids):
        from balloon_device.host.taskstats import Pressure
        self.asked.append(dict(pids))
        return {n: None if pid not in self.stall else
                Pressure(pid=pid, stall_ms_per_s=self.stall[pid], reclaim_ms_per_s=self.stall[pid])
                for n, pid in pids.items()}

    def close(self):
        pass


def test_loop_uses_taskstats_to_spare_a_stalling_guest(monkeypatch):
    import balloon_device.host.policy as policy
    now = [1000.0]
    monkeypatch.setattr(policy.time, "monotonic", lambda: now[0])
    a, b = freed_guest(), freed_guest()
    a.pid, b.pid = 101, 102
    pres = FakePressure()
    pres.stall = {101: 200.0, 102: 0.0}
    host = [H(2048 - 512)]
    loop = FakeLoop()
    pol = PolicyLoop(FAST_CFG, {"a": a, "b": b}, loop, host_reader=lambda: host[0],
                     pressure_reader=pres)
    pol.start()
    loop.timers.pop()[1]()
    assert pres.asked == [{"a": 101, "b": 102}]
    last = pol.last
    assert last["stalling"] == ["a"] and last["host_pressure"]["a"]["stall_ms_per_s"] == 200.0
    assert a.target == 0                         # not squeezed, not fast-reclaimed
    assert b.target > 0 and last["fast"] == {"b": b.target}
    pres.stall = {101: 0.0, 102: 0.0}           # a calms down: it stays spared for busy_hold
    now[0] += FAST_CFG.busy_hold - 1
    loop.timers.pop()[1]()
    assert pol.last["stalling"] == ["a"]
    now[0] += 2
    loop.timers.pop()[1]()
    assert pol.last["stalling"] == []


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
        interval=60, guest_min_bytes=16 * MiB, margin_bytes=8 * MiB, fast_reclaim=False))
    d.policy.read_host = lambda: host[0]
    rig = GuestRig(d, "a")
    os.posix_fallocate(rig.mem.fd, 0, 64 * MiB)   # the host holds all its RAM: winnable
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


def test_a_busy_guest_that_freed_what_it_took_is_fast_reclaimed(monkeypatch):
    """alloc_touch 800 and exit: busy while it allocates, no longer once it freed it
    (the balloon given back meanwhile does not count as freed)."""
    g = freed_guest(free=900, unreported=0)
    pol, host, tick = loop_rig(monkeypatch, {"a": g}, 2048 + 100, FAST_CFG)
    tick(0)
    g.avail, g.backed = 100, 4096                 # it allocates 800 MiB
    host[0] = H(2048 - 512)
    last = tick(1)
    assert last["busy"] == ["a"] and g.target == 0
    g.avail = 100 + 200                           # 200 MiB back: still busy
    assert tick(1)["busy"] == ["a"]
    g.avail = 900                                 # the allocator exited: freed it all
    last = tick(1)
    assert last["busy"] == [] and last["fast"] == {"a": (900 - 64) * PG}


def test_a_fast_reclaim_cut_short_by_an_allocation_does_not_cool_down(monkeypatch):
    g = freed_guest(free=900, unreported=900)
    pol, host, tick = loop_rig(monkeypatch, {"a": g}, 2048 - 512, FAST_CFG)
    g.actual = 0
    assert tick(0)["fast"]                        # stale stats: it looked idle
    g.avail = 100                                 # it was allocating
    last = tick(1)
    assert last["busy"] == ["a"] and last["fast"] == {}
    g.avail = 900                                 # freed it again: at once, no cooldown
    assert tick(1)["fast"] == {"a": (900 - 64) * PG}


def test_without_fast_reclaim_busy_lasts_busy_hold(monkeypatch):
    from dataclasses import replace
    g = freed_guest(free=900, unreported=0)
    pol, host, tick = loop_rig(monkeypatch, {"a": g}, 2048 + 100,
                               replace(FAST_CFG, fast_reclaim=False))
    tick(0)
    g.avail = 100
    assert tick(1)["busy"] == ["a"]
    g.avail = 900
    assert tick(1)["busy"] == ["a"]


def test_a_slow_allocation_under_a_growing_balloon_is_seen(monkeypatch):
    """The boot storm's failure: a guest allocating 40 MiB a tick while the policy grows
    its balloon by 50 MiB a tick, its stats a tick late. Counting the balloon's growth
    from a tick earlier (to cover that lag) hides the allocation; the balloon's size
    when each stats arrived does not."""
    from dataclasses import replace
    cfg = replace(CFG, interval=1.0, margin_bytes=32 * MiB, busy_hold=30.0)

    def run(with_stats_actual):
        g = FakeGuest(target=0, avail=900)
        g.actual = 0
        pol, host, tick = loop_rig(monkeypatch, {"a": g}, 2048 + 100, cfg)
        busy = []
        for k in range(6):
            g.actual = 50 * k * PG                       # the balloon now
            g.avail = 900 - 90 * max(0, k - 1)           # stats of a tick ago: 50 + 40 a tick
            if with_stats_actual:
                g.stats_actual = 50 * max(0, k - 1)      # the balloon when they arrived
            busy.append(tick(0 if k == 0 else 1)["busy"])
        return busy
    assert ["a"] in run(True)
    assert all(b == [] for b in run(False))              # what the old rule saw


def test_policy_runs_without_taskstats_when_pyroute2_is_unusable(monkeypatch):
    """Debian 12 ships pyroute2 0.7, which lacks the async netlink API taskstats.py
    uses: the policy goes on without the per-QEMU signal and says why."""
    import builtins
    real_import = builtins.__import__

    def no_taskstats(name, *a, **kw):
        if name.endswith("taskstats") or name.startswith("pyroute2"):
            raise ImportError(f"no module named {name!r} (test)")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_taskstats)
    guests = {"a": FakeGuest(avail=2048)}
    loop = FakeLoop()
    pol = PolicyLoop(CFG, guests, loop, host_reader=lambda: H(1024))
    monkeypatch.setattr(builtins, "__import__", real_import)
    pol.open_sources()
    pol.start()
    loop.timers.pop()[1]()
    assert pol.last is not None and "pyroute2" in pol.last["taskstats_error"]
    assert guests["a"].set_calls        # the policy still decides


# ---- deciding on fresh stats ------------------------------------------------------

def test_pressure_onset_decides_on_fresh_stats(monkeypatch):
    """At the idle pace the stats are a whole interval old: from before an allocation
    that may be under way. When the host is short, the tick first asks for fresh stats
    and decides once they are in: the allocating guest is seen busy, not inflated (with
    the stale stats it was, and its allocation met the balloon: the guest's OOM killer
    ended it, seen in the reclaim benchmark)."""
    g = FakeGuest(avail=2048)
    pol, host, tick = loop_rig(monkeypatch, {"a": g}, 8192)
    tick(0)
    asked = g.stats_requests
    g.stats_age = 5.0                            # it allocates; the stats do not show it yet
    host[0] = H(2048 - 256)
    tick(5)
    assert g.set_calls == [] and g.stats_requests == asked + 1
    assert pol.loop.timers[-1][0] == 0.5         # decides within 0.5 s in any case
    g.avail, g.stats_age = 1000, 0.0             # the fresh stats: 1 GiB taken
    pol.stats_arrived("a")
    assert pol.loop.timers[-1][0] == 0           # all in: decide now
    last = tick(0)
    assert last["busy"] == ["a"] and g.set_calls == []


def test_a_deferred_decision_does_not_wait_for_ever(monkeypatch):
    g = FakeGuest(avail=2048, stats_age=5.0)
    pol, host, tick = loop_rig(monkeypatch, {"a": g}, 2048 - 256)
    tick(0)
    assert pol.last is None and g.set_calls == []
    last = tick(0.5)                             # no answer: decide on what there is
    assert last is not None and g.set_calls == [256 * PG]
    assert pol.loop.timers[-1][0] == CFG.interval


def test_a_big_free_under_pressure_is_decided_on_at_once(monkeypatch):
    """With fast reclaim, fresh stats showing a guest freed --policy-fast-min or more
    since the last tick start the decision at once, not at the next tick."""
    g = freed_guest(free=900, unreported=0)
    pol, host, tick = loop_rig(monkeypatch, {"a": g}, 2048 + 100, FAST_CFG)
    tick(0)
    g.avail, g.backed = 100, 4096                 # it allocates 800 MiB
    host[0] = H(2048 - 512)
    assert tick(1)["busy"] == ["a"]
    n = len(pol.loop.timers)
    g.avail = 300                                 # 200 MiB back: wait for the tick
    pol.stats_arrived("a")
    assert len(pol.loop.timers) == n
    g.avail = 900                                 # the allocator exited
    pol.stats_arrived("a")
    assert pol.loop.timers[-1][0] == 0
    last = tick(0.1)
    assert last["busy"] == [] and last["fast"] == {"a": (900 - 64) * PG}
    n = len(pol.loop.timers)
    pol.stats_arrived("a")                        # nothing new since that decision
    assert len(pol.loop.timers) == n


def test_no_early_decision_without_fast_reclaim_or_pressure(monkeypatch):
    from dataclasses import replace
    for cfg, host_mib in ((replace(FAST_CFG, fast_reclaim=False), 2048 - 512),
                          (FAST_CFG, 8192)):
        g = freed_guest(free=900, unreported=0)
        g.avail = 100
        pol, host, tick = loop_rig(monkeypatch, {"a": g}, host_mib, cfg)
        tick(0)
        n = len(pol.loop.timers)
        g.avail = 900
        pol.stats_arrived("a")
        assert len(pol.loop.timers) == n


def test_fast_reclaim_watches_the_host_between_idle_ticks(monkeypatch):
    """With fast reclaim, the host is read every --policy-fast-interval at the idle
    pace: the decision starts when the pressure does, not up to a tick later."""
    g = freed_guest()
    pol, host, tick = loop_rig(monkeypatch, {"a": g}, 8192, FAST_CFG)
    tick(0)
    watch, nxt = pol.loop.timers[-2:]
    assert watch == (1.0, pol._watch) and nxt[0] == 5.0
    watch[1]()                                    # still fine: watch again
    assert pol.loop.timers[-1] == (1.0, pol._watch)
    pol.loop.timers.pop()
    assert g.set_calls == []
    host[0] = H(2048 - 64)
    watch[1]()
    assert pol.loop.timers[-1][0] == 0            # short: decide now
    g.actual = 0
    assert tick(0.2)["fast"] == {"a": (900 - 64) * PG}


def test_no_host_watch_without_fast_reclaim(monkeypatch):
    pol, host, tick = loop_rig(monkeypatch, {"a": FakeGuest(avail=2048)}, 8192)
    tick(0)
    assert [t for t in pol.loop.timers if t[1] == pol._watch] == []


def test_a_fast_reclaim_over_with_the_host_above_its_floor_leaves_no_need_behind(monkeypatch):
    """While the balloon is on its way the host does not show it yet, and decide() adds
    the need to the guest's target on every tick; once the host is above its floor the
    fast reclaim met that need itself: the target goes back to what it was when the fast
    reclaim started, not to the piled-up need (which the surplus would return only a few
    MiB a tick, holding memory the guest is about to reuse)."""
    g = freed_guest()
    pol, host, tick = loop_rig(monkeypatch, {"a": g}, 2048 - 64, FAST_CFG)
    g.actual = 0
    last = tick(0)
    assert last["fast"] == {"a": (900 - 64) * PG}
    start = 64 * PG                                   # decide()'s share of the need
    host[0] = H(2048 - 300)                           # the balloon is not there yet
    tick(1)
    tick(1)
    assert pol.fast.active["a"]["base"] > start + 300 * PG    # the need piled up
    g.actual = None                                   # the balloon got there, and the
    host[0] = H(2048 + 600)                           # host is above floor + hysteresis
    last = tick(1)
    assert last["fast"] == {} and g.target == start
    host[0] = H(2048 + 520)                           # surplus: back to 0 from there
    tick(1)
    assert g.target < start


def test_a_free_must_settle_before_a_fast_reclaim_takes_it(monkeypatch):
    """--policy-fast-settle: the free is seen, fresh stats are asked for a settle later,
    and the fast reclaim starts on them if the memory is still free."""
    from dataclasses import replace
    g = freed_guest()
    g.actual = 0
    pol, host, tick = loop_rig(monkeypatch, {"a": g}, 2048 - 64, replace(FAST_CFG, fast_settle=0.5))
    last = tick(0)
    assert last["fast"] == {} and pol.fast.pending == {"a"}
    settle = pol.loop.timers.pop()
    assert settle[0] == 0.5 and settle[1] == pol._settle_check
    before = g.stats_requests
    settle[1]()
    assert g.stats_requests == before + 1 and pol._waiting == {"a"}
    pol.stats_arrived("a")                       # in: decide now
    assert pol.loop.timers[-1][0] == 0
    last = tick(0.5)
    assert last["fast"] == {"a": (900 - 64) * PG} and pol.fast.pending == set()


def test_a_free_reused_at_once_is_left_to_the_guest(monkeypatch):
    """The immediate-reuse case of the overhead benchmark: the guest allocates again
    right after its free; by the settle its free memory fell: no fast reclaim."""
    from dataclasses import replace
    g = freed_guest()
    g.actual = 0
    pol, host, tick = loop_rig(monkeypatch, {"a": g}, 2048 - 64, replace(FAST_CFG, fast_settle=0.5))

    def settle_then_decide():
        assert pol.loop.timers[-1][1] == pol._settle_check
        tick(0.5)                                    # the settle: stats asked for
        pol.stats_arrived("a")
        return tick(0)                               # decided on them
    assert tick(0)["fast"] == {}
    g.avail -= 100                                   # reusing it
    last = settle_then_decide()
    assert last["fast"] == {} and pol.fast.pending == {"a"}        # seen again, from here
    assert settle_then_decide()["fast"] == {"a": (800 - 64) * PG}  # held still this time


def test_host_side_growth_marks_a_guest_busy_before_its_stats_show_it(monkeypatch):
    """A guest faulting in memory the host does not hold (ram_backed_bytes growing) is
    allocating, whatever its stats (a round trip late) still say: not squeezed."""
    g = freed_guest(free=900, unreported=0)
    pol, host, tick = loop_rig(monkeypatch, {"a": g}, 2048 + 100, FAST_CFG)
    tick(0)
    g.backed += 300                                  # faulted in; stats unchanged
    host[0] = H(2048 - 512)
    last = tick(1)
    assert last["busy"] == ["a"] and g.target == 0 and last["fast"] == {}
    g.avail = 900 - 300 + 300 + 300                  # it freed that and more: done
    last = tick(1)
    assert last["busy"] == []


def test_growth_before_a_free_does_not_keep_the_guest_busy(monkeypatch):
    """alloc_touch: backing grows while it allocates, then it frees; the growth already
    counted must not make the guest busy again at the next tick."""
    g = freed_guest(free=900, unreported=0)
    pol, host, tick = loop_rig(monkeypatch, {"a": g}, 2048 + 100, FAST_CFG)
    tick(0)
    g.backed += 400
    host[0] = H(2048 - 512)
    assert tick(1)["busy"] == ["a"]
    g.backed += 500
    g.avail = 100
    assert tick(1)["busy"] == ["a"]
    g.avail = 900                                    # freed; still backed (not yet reported)
    last = tick(1)
    assert last["busy"] == [] and last["fast"] == {"a": (900 - 64) * PG}
    assert tick(1)["busy"] == []


def test_a_guest_that_just_freed_is_not_squeezed_by_the_need_before_it_settles(monkeypatch):
    """The overhead benchmark: a pass ends with a free while the host is still short;
    decide()'s share of the need went into the balloon at once, met the guest's next
    allocation and came back a surplus at a time. Now it waits for the settle, and the
    fast reclaim (which ends with the balloon empty) takes the free."""
    from dataclasses import replace
    g = freed_guest(free=900, unreported=0)
    pol, host, tick = loop_rig(monkeypatch, {"a": g}, 2048 + 100, replace(FAST_CFG, fast_settle=0.5))
    tick(0)
    g.avail, g.backed = 100, 4096                    # a pass: 800 MiB faulted in
    host[0] = H(2048 - 512)
    assert tick(1)["busy"] == ["a"]
    g.avail = 900                                    # the pass ended: freed, still backed
    last = tick(1)
    assert last["busy"] == [] and g.target == 0 and last["fast"] == {}
    assert pol.loop.timers[-1][1] == pol._settle_check
    tick(0.5)
    pol.stats_arrived("a")
    last = tick(0)
    assert last["fast"] == {"a": (900 - 64) * PG}


def test_a_guest_allocating_and_freeing_in_a_loop_is_left_alone(monkeypatch):
    """The overhead benchmark's immediate reuse: rounds of allocate, touch, free back
    to back. Its stats swing between a free and an allocation, none of them a fall
    over the busy window; decide() inflated it in a swing's free moment, the balloon
    met the next round. Now it is settling while its memory use moves, and squeezed
    only once it held still --policy-fast-settle."""
    from dataclasses import replace
    g = freed_guest(free=300, unreported=0)
    g.backed = 4096
    pol, host, tick = loop_rig(monkeypatch, {"a": g}, 2048 - 512, replace(FAST_CFG, fast_settle=0.5))
    tick(0)
    for k in range(8):                               # the swings, seen every quarter second
        g.avail = 900 if k % 2 else 300
        pol.stats_arrived("a")
        while pol.loop.timers and pol.loop.timers[-1][0] == 0:
            pol.loop.timers.pop()
        last = tick(0.25)
        assert g.target == 0 and last["fast"] == {}, k
    assert tick(0.25)["targets"]["a"] == 0           # held still 0.25 s: not yet
    tick(0.5)                                        # held still: fair game (or pending)
    assert pol.fast.pending == {"a"} or g.target > 0


def test_the_need_takes_only_memory_the_host_still_holds():
    """decide() shares the need by each guest's room: the available memory the host
    still holds for it. A guest that just booted (its RAM never touched) or whose free
    memory was reported gives nothing; a guest with backed free memory or page cache
    gives it; balloon pages asked for and not arrived count against it."""
    cfg = PolicyConfig(floor_bytes=2 * GiB, guest_min_bytes=256 * MiB, margin_bytes=128 * MiB,
                       hysteresis_bytes=512 * MiB, psi_threshold=0, fast_reclaim=True)
    host = HostMemory(2 * GiB - 1 * GiB)              # 1 GiB short

    def view(backed, target=0, actual=0):
        return GuestView(target_pages=target * PG, actual_pages=actual * PG,
                         memory_bytes=4 * GiB, available_bytes=3 * GiB,
                         ram_backed_bytes=None if backed is None else backed * MiB)
    # 1024 MiB of each guest's RAM is used beyond its available memory
    out = decide(host, {"fresh": view(1024 + 100), "held": view(1024 + 500)}, cfg)
    assert out == {"fresh": 100 * PG, "held": 500 * PG}   # what the host still holds
    out = decide(host, {"reported": view(1024), "unknown": view(None)}, cfg)
    assert out == {"reported": 0, "unknown": 1024 * PG}
    # 600 MiB asked for, 200 arrived (available was measured with those 200 out):
    # 700 MiB of available memory still backed, 400 of it already on its way
    out = decide(host, {"a": view(1024 + 500, target=600, actual=200)}, cfg)
    assert out["a"] == (600 + 300) * PG


def test_the_balloons_own_growth_is_not_an_allocation(monkeypatch):
    """A guest kernel with init_on_alloc zeroes the pages it hands to the balloon, so
    inflating over free memory the host no longer holds faults it in for a moment:
    not the guest allocating (it cut a storm run's fast reclaims short)."""
    g = freed_guest(free=900, unreported=800)
    pol, host, tick = loop_rig(monkeypatch, {"a": g}, 2048 - 64, FAST_CFG)
    g.actual = 0
    assert tick(0)["fast"]
    g.actual = 300 * PG                   # 300 MiB of backed free memory inflated: discarded
    g.backed -= 300
    g.avail -= 300
    g.stats_actual = 300
    assert tick(1)["busy"] == []
    g.actual = 500 * PG                   # 200 MiB more, the host did not hold them:
    g.backed += 150                       # zeroed in on the way, not yet discarded
    g.avail -= 200
    g.stats_actual = 500
    last = tick(1)
    assert last["busy"] == [] and last["fast"]


def test_a_reporting_batch_is_not_an_allocation(monkeypatch):
    """Free page reporting takes up to 128 MiB off the guest's free lists while a batch
    is reported: an idle guest's available memory dips by that much. Not busy (a 30 s
    busy hold kept the storm's freed guests from their fast reclaim); a bigger fall is."""
    from dataclasses import replace
    cfg = replace(FAST_CFG, margin_bytes=32 * MiB)
    g = freed_guest(free=900, unreported=0)
    pol, host, tick = loop_rig(monkeypatch, {"a": g}, 2048 + 100, cfg)
    tick(0)
    g.avail -= 128                                   # a batch in flight
    assert tick(1)["busy"] == []
    g.avail += 128
    tick(1)
    g.avail -= 200                                   # more than a batch: allocating
    assert tick(1)["busy"] == ["a"]


def test_a_guest_that_allocates_again_after_a_fast_reclaim_has_no_cooldown(monkeypatch):
    """The overhead benchmark's passes: a fast reclaim got there, the guest allocates and
    frees again 10 s later; that free is new memory: fast-reclaimed at once, not left to
    decide()'s need (which kept a balloon into the next pass)."""
    g = freed_guest(free=900, unreported=900)
    pol, host, tick = loop_rig(monkeypatch, {"a": g}, 2048 - 512, FAST_CFG)
    g.actual = 0
    assert tick(0)["fast"]
    g.actual = None                                   # got there: done, cooldown
    g.backed -= 900
    assert tick(1)["fast_done"] == {"a": 1}
    host[0] = H(8192)
    tick(5)
    g.avail, g.backed = 100, g.backed + 900           # a pass: allocates 800 MiB; all
                                                      # its RAM is backed again
    host[0] = H(2048 - 512)
    assert tick(5)["busy"] == ["a"]
    g.avail = 900                                     # and frees it, 10 s after the first
    g.actual = 0
    last = tick(1)
    assert last["busy"] == [] and last["fast"] == {"a": (900 - 64) * PG}
