"""Stateful property test: the host memory policy loop (policy.PolicyLoop, its "busy"
rule) and sweeps (sweep.Sweeper) over many ticks, with 2-4 simulated guests.

Between ticks the clock moves by 0-700 s, the host's available memory and PSI change,
guests allocate and free, their balloons follow the target fully, partly or not at
all, they disconnect and reconnect (the device keeps its target, the balloon restarts
empty), gain or lose REPORTING, and their stats stop coming (stale). A guest's
available_memory stat is a snapshot taken when the policy asks for stats, so it lags
the balloon by a tick as in a real guest.

Invariants, after every tick (decide() is wrapped to see what it returned):
- tick() (called directly, not through _tick's catch-all) never raises; the devices
  hold the targets it returned; decide() starts from its own previous targets;
- 0 <= target <= (RAM - guest_min) / 4 KiB;
- at most one guest - the one being swept - gets a target other than decide()'s,
  and then max(decide(), the sweep's target);
- a sweep starts only on a connected guest with REPORTING, fresh stats and no fall
  of its available memory for sweep_quiet seconds, with room for sweep_bytes, while
  the host is below floor + hysteresis and no other sweep runs; it counts as done
  only if the balloon reached its target;
- a sweep ends at the first tick sweep_timeout after its start, or earlier;
  when it ends, the guest's target is decide()'s;
- a busy guest's target is 0, unless it is being swept (then the sweep's pages).
Behaviour we find questionable is counted with event("Q: ...") (see
--hypothesis-show-statistics) rather than asserted.

Examples per run: the conftest profile (ci: 2000, about 30 s); steps per example: STEPS.
"""

import types
from dataclasses import replace

import pytest
from hypothesis import event, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

import balloon_device.host.policy as policy
from balloon_device.host.policy import HostMemory, PolicyConfig, PolicyLoop
from balloon_device.host.status import GuestStatus

MiB = 1 << 20
PAGE = 4096
STEPS = 80

CFG = PolicyConfig()        # the daemon's defaults: sweeps on, busy_hold 30 s, PSI 10 %
SWEEP = CFG.sweep_bytes // PAGE
LIMIT = CFG.floor_bytes + CFG.hysteresis_bytes
STEADY = st.sampled_from([0.0, 1.0, 5.0, 5.0, 5.0, 5.0, 10.0, 20.0, 31.0])  # seconds


class Clock:
    now = 1000.0


class Loop:
    def call_later(self, delay, cb):
        return cb

    def cancel(self, handle):
        pass


class Guest:
    """The device side (target, actual, stats) and the guest (RAM, memory in use)."""

    def __init__(self, ram_mib, used_mib):
        self.ram = ram_mib * MiB
        self.used = used_mib * MiB
        self.target = self.actual = 0
        self.connected, self.reporting, self.answers = True, True, True
        self.stats = None           # available_memory the guest last reported
        self.stats_time = None

    def available(self):
        return max(0, self.ram - self.used - self.actual * PAGE)

    def status(self):
        age = None if self.stats_time is None else Clock.now - self.stats_time
        feats = (["STATS_VQ", "REPORTING"] if self.reporting else ["STATS_VQ"])
        return GuestStatus.from_dict({
            "connected": self.connected, "features_acked": feats if self.connected else [],
            "target_pages": self.target, "actual_pages": self.actual,
            "memory_bytes": self.ram, "stats_age": age,
            "stats": {} if self.stats is None else {"available_memory": self.stats}})

    def set_target(self, pages):
        # the policy sets targets of connected guests only, except to give a swept
        # guest that went away its old target back (the device keeps it meanwhile)
        self.target = pages

    def request_stats(self):
        assert self.connected
        if self.answers:
            self.stats, self.stats_time = self.available(), Clock.now


class PolicyMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.saved = policy.time, policy.decide
        policy.time = types.SimpleNamespace(monotonic=lambda: Clock.now, time=lambda: Clock.now)
        policy.decide = self._decide
        Clock.now = 1000.0
        self.host = HostMemory(LIMIT - 100 * MiB)   # short: sweeps allowed
        self.sweep = None           # (name, started, its target) of the sweep in progress
        self.counts = {}            # sweeps done, per guest
        self.fresh = {}             # guest -> since when it has had fresh stats

    def teardown(self):
        policy.time, policy.decide = self.saved

    def _decide(self, host, views, cfg):
        out = self.saved[1](host, views, cfg)
        self.decided, self.views = dict(out), views
        return out

    @initialize(rams=st.lists(st.sampled_from([1024, 2048, 4096]), min_size=2, max_size=4),
                data=st.data())
    def setup(self, rams, data):
        self.guests = {f"g{i}": Guest(r, data.draw(st.integers(64, r // 2), label="used"))
                       for i, r in enumerate(rams)}
        self.base = dict.fromkeys(self.guests, 0)   # decide()'s last target for each guest
        self.pol = PolicyLoop(CFG, self.guests, Loop(), host_reader=lambda: self.host)

    def guest(self, data):
        return self.guests[data.draw(st.sampled_from(sorted(self.guests)), label="guest")]

    @rule(mib=st.one_of(st.integers(0, 2048), st.integers(2048, 2560), st.integers(0, 16384)),
          psi=st.one_of(st.none(), st.floats(0, 100)))
    def host_changes(self, mib, psi):
        self.host = HostMemory(mib * MiB, psi)

    @rule(data=st.data(), mib=st.one_of(st.integers(-200, 200), st.integers(-2048, 2048)))
    def allocate_or_free(self, data, mib):
        g = self.guest(data)
        g.used = min(g.ram, max(0, g.used + mib * MiB))

    @rule(data=st.data(), how=st.sampled_from(["full", "part", "none"]))
    def balloon_moves(self, data, how):
        g = self.guest(data)
        if not g.connected or how == "none":
            return
        # inflating takes the guest's free memory; it cannot take more than there is
        goal = min(g.target, g.actual + g.available() // PAGE)
        if how == "part":
            goal = data.draw(st.integers(min(g.actual, goal), max(g.actual, goal)), label="to")
        g.actual = goal

    @rule(data=st.data())
    def disconnect_or_reconnect(self, data):
        g = self.guest(data)
        g.connected = not g.connected
        g.actual = 0                # a new driver starts with an empty balloon

    @rule(data=st.data())
    def toggle_reporting(self, data):
        g = self.guest(data)
        g.reporting = not g.reporting

    @rule(data=st.data())
    def toggle_stats(self, data):
        g = self.guest(data)
        g.answers = not g.answers   # a guest that stops answering: its stats go stale

    @rule(n=st.integers(1, 8))
    def run_undisturbed(self, n):
        for _ in range(n):
            self.tick(CFG.interval)

    @rule(dt=st.one_of(STEADY, st.floats(0, 700)))
    def tick(self, dt):
        Clock.now += dt
        host = self.host
        targets = self.pol.tick()
        last, now = self.pol.last, Clock.now
        live = {n for n, g in self.guests.items() if g.connected}
        assert set(targets) == live == set(self.decided)
        before = self.sweep
        if before and before[0] not in live:
            # the guest went away mid-sweep: its device got its old target back
            assert self.guests[before[0]].target == self.base[before[0]], "sweep pages kept"
            before = None
        for n in set(self.fresh) - live:
            del self.fresh[n]
        for n in live:
            g = self.guests[n]
            if self.views[n].available_bytes is None:
                self.fresh.pop(n, None)
            else:
                self.fresh.setdefault(n, now)
            # decide() starts from its own last target: no sweep pages left over in it
            assert self.views[n].target_pages == self.base[n], (n, "sweep pages left over")
            self.base[n] = self.decided[n]
            assert 0 <= targets[n] <= (g.ram - CFG.guest_min_bytes) // PAGE, n
            assert g.target == targets[n], n
        swept = last["sweeping"]
        differ = {n for n in live if targets[n] != self.decided[n]}
        assert differ <= ({swept} if swept else set()), (differ, swept)
        if swept is None:
            self.sweep = None
            if before:                                  # a sweep ended: decide()'s target
                assert targets[before[0]] == self.decided[before[0]]
                event("sweep ended")
        else:
            g = self.guests[swept]
            if before is None or before[0] != swept:   # it started in this tick
                assert before is None, "a sweep started while another was running"
                st_ = g.status()
                assert "REPORTING" in st_.device.features_acked
                assert st_.device.stats_age <= CFG.stats_max_age and g.stats is not None
                assert host.available_bytes < LIMIT
                quiet = max(self.fresh[swept], self.pol._last_fall.get(swept, 0))
                assert now - quiet >= CFG.sweep_quiet, "swept before sweep_quiet"
                assert targets[swept] == self.decided[swept] + SWEEP
                assert targets[swept] <= policy._cap(replace(self.views[swept], busy=False), CFG)
                self.sweep = (swept, now, targets[swept])
                event("sweep started")
                if swept in last["busy"]:
                    event("Q: sweep started on a busy guest (busy_hold > sweep_quiet)")
            else:
                assert now - before[1] < CFG.sweep_timeout, "the sweep outlived its timeout"
                assert targets[swept] == max(self.decided[swept], before[2])
                event("sweep continues")
                if targets[swept] > self.decided[swept] + SWEEP:
                    event("Q: sweep holds more than decide() + sweep_bytes")
                if targets[swept] > policy._cap(replace(self.views[swept], busy=False), CFG):
                    event("Q: sweep target above the guest's cap")
        for n, count in last["sweeps"].items():         # counted only when the balloon got there
            if count != self.counts.get(n, 0):
                assert count == self.counts.get(n, 0) + 1 and before and before[0] == n
                assert self.guests[n].actual >= before[2]
        self.counts = dict(last["sweeps"])
        if last["busy"]:
            event("a guest is busy")
        for n in last["busy"]:
            assert targets[n] == 0 or (n == swept and targets[n] <= SWEEP), (n, targets[n])


TestPolicyProps = PolicyMachine.TestCase
TestPolicyProps.settings = TestPolicyProps.settings.__class__(TestPolicyProps.settings,
                                                              stateful_step_count=STEPS)


def test_sweep_cut_by_a_disconnect_gives_its_pages_back(monkeypatch):
    monkeypatch.setattr(policy, "time", types.SimpleNamespace(monotonic=lambda: Clock.now,
                                                              time=lambda: Clock.now))
    Clock.now = 1000.0
    g = Guest(1024, 64)
    host = HostMemory(LIMIT - 100 * MiB)          # within floor + hysteresis: hold, sweeps on
    pol = PolicyLoop(CFG, {"a": g}, Loop(), host_reader=lambda: host)
    for _ in range(5):                            # quiet for sweep_quiet: the sweep starts
        if pol.tick()["a"]:
            break
        Clock.now += CFG.interval
    assert pol.last["sweeping"] == "a" and g.target == SWEEP
    g.connected = False                           # the guest goes away before the balloon moved
    Clock.now += CFG.interval
    pol.tick()
    g.connected, g.actual = True, 0               # ... and comes back
    Clock.now += CFG.interval
    assert pol.tick()["a"] == 0, "the sweep's pages stayed in the balloon's target"
