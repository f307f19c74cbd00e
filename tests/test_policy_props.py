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
Taskstats (a fake reader: each guest's QEMU stalls or not, switched by a rule):
- under a need, a stalling guest's target grows only if every quiet guest is at its
  cap or has no room left (policy.room: no available memory the host still holds); with a surplus, a quiet guest's target falls only once every stalling guest's
  is 0; a stalling guest is never fast-reclaimed.
Fast reclaim (fastreclaim.py, opt-in; CFG turns it on):
- a guest in fast reclaim holds max(decide(), its fast target), and the fast target
  never exceeds the guest's cap with "busy" counted (so never on a busy guest, never
  below the guest's available memory minus half the margin), nor, when it starts, its
  balloon plus the free memory the host still holds minus half the margin; the swept
  guest is never one;
- fast reclaims start only while the host is under pressure (below the floor or
  PSI) and may go on after it (until the balloon got there, reporting caught up,
  the guest needs its memory, or the timeout);
- a fast reclaim starts only with fresh stats and at least fast_min_bytes free and
  still backed on the host, once its memory use held still fast_settle; its target does not move while it runs; it ends at the
  first tick where the balloon is at its target, and before fast_timeout in any case;
  after one that got there or timed out, the next one on the same guest starts
  fast_cooldown later at the earliest.
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
from balloon_device.host.fastreclaim import backed_free

MiB = 1 << 20
PAGE = 4096
STEPS = 80

CFG = PolicyConfig(fast_reclaim=True)  # the daemon's defaults (sweeps on, busy_hold 30 s,
#                                        PSI 10 %) plus fast reclaim, which is opt-in
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
        self.stats_actual = None    # the balloon when it did
        self.dirty = 0              # free memory still backed on the host (not reported yet)
        self.pid = None
        self.stall = 0.0            # its QEMU's stall on host memory, ms/s
        self.backed_known = True    # the device knows ram_backed_bytes

    def backed(self):
        return min(self.ram, self.used + self.dirty)

    def available(self):
        return max(0, self.ram - self.used - self.actual * PAGE)

    def status(self):
        age = None if self.stats_time is None else Clock.now - self.stats_time
        feats = (["STATS_VQ", "REPORTING"] if self.reporting else ["STATS_VQ"])
        return GuestStatus.from_dict({
            "connected": self.connected, "features_acked": feats if self.connected else [],
            "target_pages": self.target, "actual_pages": self.actual,
            "memory_bytes": self.ram, "stats_age": age,
            "ram_backed_bytes": self.backed() if self.backed_known else None,
            "stats_actual_pages": self.stats_actual,
            "frontend_pid": self.pid,
            "stats": {} if self.stats is None else {"available_memory": self.stats,
                                                    "free_memory": self.stats}})

    def set_target(self, pages):
        # the policy sets targets of connected guests only, except to give a swept
        # guest that went away its old target back (the device keeps it meanwhile)
        self.target = pages

    def request_stats(self):
        assert self.connected
        if self.answers:
            self.stats, self.stats_time = self.available(), Clock.now
            self.stats_actual = self.actual


class Pressure:
    def __init__(self, guests):
        self.guests = guests

    def sample(self, pids):
        from balloon_device.host.taskstats import Pressure as P
        by_pid = {g.pid: g for g in self.guests.values()}
        return {n: P(pid=pid, stall_ms_per_s=by_pid[pid].stall) for n, pid in pids.items()}

    def close(self):
        pass


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
        self.fast = {}              # guest -> (started, fast target) of fast reclaims running
        self.fast_end = {}          # guest -> when its last fast reclaim ended

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
        for i, g in enumerate(self.guests.values()):
            g.pid = 1000 + i
        self.base = dict.fromkeys(self.guests, 0)   # decide()'s last target for each guest
        self.pol = PolicyLoop(CFG, self.guests, Loop(), host_reader=lambda: self.host,
                              pressure_reader=Pressure(self.guests))

    def guest(self, data):
        return self.guests[data.draw(st.sampled_from(sorted(self.guests)), label="guest")]

    @rule(mib=st.one_of(st.integers(0, 2048), st.integers(2048, 2560), st.integers(0, 16384)),
          psi=st.one_of(st.none(), st.floats(0, 100)))
    def host_changes(self, mib, psi):
        self.host = HostMemory(mib * MiB, psi)

    @rule(data=st.data(), mib=st.one_of(st.integers(-200, 200), st.integers(-2048, 2048)))
    def allocate_or_free(self, data, mib):
        g = self.guest(data)
        used = min(g.ram, max(0, g.used + mib * MiB))
        if used < g.used:
            g.dirty += g.used - used                    # freed, not reported yet
        else:
            g.dirty = max(0, g.dirty - (used - g.used))
        g.used = used
        g.dirty = min(g.dirty, g.available())

    @rule(data=st.data(), part=st.floats(0, 1))
    def reporting_pass(self, data, part):
        g = self.guest(data)
        g.dirty = int(g.dirty * (1 - part))

    @rule(data=st.data())
    def toggle_backed_known(self, data):
        g = self.guest(data)
        g.backed_known = not g.backed_known

    @rule(data=st.data(), how=st.sampled_from(["full", "part", "none"]))
    def balloon_moves(self, data, how):
        g = self.guest(data)
        if not g.connected or how == "none":
            return
        # inflating takes the guest's free memory; it cannot take more than there is
        goal = min(g.target, g.actual + g.available() // PAGE)
        if how == "part":
            goal = data.draw(st.integers(min(g.actual, goal), max(g.actual, goal)), label="to")
        if goal > g.actual:                             # inflated pages are discarded
            g.dirty = max(0, g.dirty - data.draw(st.integers(0, goal - g.actual)) * PAGE)
        g.actual = goal
        g.dirty = min(g.dirty, g.available())

    @rule(data=st.data())
    def disconnect_or_reconnect(self, data):
        g = self.guest(data)
        g.connected = not g.connected
        g.actual = 0                # a new driver starts with an empty balloon

    @rule(data=st.data(), ms=st.sampled_from([0.0, 10.0, CFG.stall_ms, 500.0]))
    def qemu_stalls(self, data, ms):
        self.guest(data).stall = ms

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
        fast = last["fast"]
        reset = self.check_fast(host, fast, swept, live, now)
        for n in reset:                                 # decide() goes on from there
            self.base[n] = targets[n]
        self.check_stalling(host, live)
        differ = {n for n in live if targets[n] != self.decided[n]}
        assert differ <= ({swept} if swept else set()) | set(fast) | reset, (differ, swept, fast)
        if swept is None:
            self.sweep = None
            if before:                                  # a sweep ended: decide()'s target
                assert targets[before[0]] == self.decided[before[0]] or before[0] in fast
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
                assert targets[swept] <= policy._cap(replace(self.views[swept], busy=False, settling=False), CFG)
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
                if targets[swept] > policy._cap(replace(self.views[swept], busy=False, settling=False), CFG):
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


    def check_stalling(self, host, live):
        views, out = self.views, self.decided
        stalling = {n for n in live if views[n].stalling}
        quiet = live - stalling
        caps = {n: policy._cap(views[n], CFG) for n in live}
        start = {n: min(views[n].target_pages, caps[n]) for n in live}
        if stalling and quiet:
            event("stalling and quiet guests")
        full = {n: start[n] + policy.room(views[n], caps[n], start[n]) for n in live}
        for n in live:      # the need never takes more than the host still holds
            assert out[n] <= max(start[n], full[n]), (n, out[n], full[n])
        if any(out[n] > start[n] for n in stalling):
            assert all(out[n] == full[n] for n in quiet), "a stalling guest squeezed first"
            event("stalling guest squeezed (others full)")
        if any(out[n] < start[n] for n in quiet):
            assert all(out[n] == 0 for n in stalling), "a quiet guest got memory back first"
        for n in stalling:
            assert n not in self.pol.last["fast"], "fast reclaim of a stalling guest"

    def check_fast(self, host, fast, swept, live, now):
        targets = {n: self.guests[n].target for n in live}
        under = host.available_bytes < CFG.floor_bytes or policy.pressure(host, CFG)
        if fast and not under:
            event("fast reclaim goes on after the pressure")
        assert swept not in fast
        reset = set()
        for n, (started, goal, start) in list(self.fast.items()):
            if n not in fast:
                del self.fast[n]
                v = self.views.get(n)
                if v is not None and (v.actual_pages >= goal or now - started >= CFG.fast_timeout):
                    self.fast_end[n] = now       # done or timed out: cooldown
                event("fast reclaim ended")
                if n in live and not under and self.decided[n] > start:
                    # the need decide() piled up meanwhile was met by the fast reclaim:
                    # back to the target it had when it started
                    assert targets[n] == start, (n, targets[n], start)
                    reset.add(n)
                    event("fast reclaim ended: back to its start")
                continue
            # still running: it did not get there yet, and is within its timeout
            assert fast[n] == goal, "the fast target moved"
            assert self.views[n].actual_pages < goal, "fast reclaim kept after the balloon got there"
            assert now - started < CFG.fast_timeout, "fast reclaim outlived its timeout"
        for n, goal in fast.items():
            v = self.views[n]
            assert n in live
            assert targets[n] == max(self.decided[n], goal), (n, targets[n], goal)
            # (a settling guest's cap is its target for decide(); fast reclaim waits for
            # the settle itself and then goes to the cap without it)
            # (its caps count half the margin: the balloon is gone a tick after)
            assert goal <= policy._cap(replace(v, settling=False),
                                       replace(CFG, margin_bytes=CFG.margin_bytes // 2)), (
                "fast reclaim above the guest's cap", n)
            if n not in self.fast:
                assert under, "fast reclaim started without pressure"
                assert v.available_bytes is not None and not v.busy
                free = v.free_bytes                    # what the guest reported before the tick
                assert free - CFG.margin_bytes // 2 >= CFG.fast_min_bytes
                if v.ram_backed_bytes is not None:
                    assert v.ram_backed_bytes - (v.memory_bytes - free - v.actual_pages * PAGE) \
                        >= CFG.fast_min_bytes
                assert goal <= v.actual_pages + (backed_free(v) - CFG.margin_bytes // 2) // PAGE, (
                    "fast reclaim beyond the free memory the host still holds", n)
                assert now - self.fast_end.get(n, -1e9) >= CFG.fast_cooldown, "restarted at once"
                steady = self.pol._steady.get(n)    # its memory use held still since
                assert steady is not None and now - steady[0] >= CFG.fast_settle, "not settled"
                self.fast[n] = (now, goal, self.decided[n])
                event("fast reclaim started")
        return reset


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
