"""Host memory policy: inflate the guests' balloons when the host runs short, give
the memory back when the pressure has passed.

Every --policy-interval seconds the loop reads the host (memory PSI "some avg10",
MemAvailable, or a memory cgroup's limit - usage) and each connected guest's
status (balloon target/actual, guest RAM, latest stats), calls the pure function
``decide`` and applies the targets that changed. It also asks every guest for fresh
stats so that the next tick sees current values.

Rules of ``decide`` (all sizes in bytes, targets in 4 KiB pages):

* cap(guest) = the most its balloon may hold:
  min(guest RAM - guest_min, actual + available_memory - margin), never below 0.
  A guest without (fresh) stats is never inflated further: its cap is its target.
  A target above the cap is lowered to it (the guest needs that memory).
* A busy guest (one that is allocating) has cap 0: its whole balloon is given back
  and it is not inflated. Busy = its available_memory fell since the previous tick
  by more than the margin plus what its balloon (actual) grew over the last two
  ticks (inflating takes available memory too, and the stats lag the balloon by
  up to a tick). With fast reclaim also: its RAM allocated on the host
  (ram_backed_bytes) grew by more than the margin within 1.5 intervals, the balloon's
  own growth not counted (seen at once, while the stats lag); and with reporting a
  fall of up to margin + 128 MiB counts only when two samples in a row show it (free
  page reporting takes up to 128 MiB off the free lists per batch). It stays busy
  for busy_hold seconds after the last such fall, or (with fast reclaim) until its
  available memory rose by --policy-fast-min over its level at that fall, not
  counting its balloon given back: it freed what it took.
  Without this rule the guest with the most available memory - typically one that
  just booted and is about to load - takes the largest share of an inflation, and
  its own allocation then meets the balloon and is OOM-killed inside the guest.
* With fast reclaim, a guest whose own memory use (available + balloon) moved by more
  than --policy-fast-min / 4 within the last --policy-fast-settle seconds (it just
  freed, or allocates and frees in a loop), or whose free waits for the settle in
  fast reclaim, is "settling": its cap is its target, decide() does not inflate it
  (its next allocation would meet the balloon: the overhead benchmark's passes).
* need = floor - host available; with PSI some avg10 >= psi_threshold, at least
  psi_step. need > 0: raise targets by need in total, shared in proportion to each
  guest's room: its headroom (cap - target), but (with fast reclaim) no more than the
  available memory the host still holds for it (ram_backed_bytes - what the guest
  uses beyond its available memory and balloon), minus balloon pages asked for and
  not arrived yet.
  Inflating memory the host no longer holds wins nothing: a guest that just booted
  (never touched its RAM) or whose free memory was reported keeps it (the boot storm:
  freshly launched guests were squeezed by the need and met the balloon 3 s later,
  and reported guests were squeezed for no gain).
* host available >= floor + hysteresis and no PSI pressure: surplus = available -
  floor - hysteresis; lower targets by up to surplus in total, in proportion to
  their size, down to 0 (all memory returned once the surplus covers the balloons).
* in between: hold.
* Stalling guests (their QEMU waits in direct reclaim, on thrashing pages or swap-in
  for --policy-stall ms per second or more, by taskstats: taskstats.py; they stay
  stalling for busy_hold seconds): the need is taken from the other guests first,
  a surplus goes to them first, and they are never fast-reclaimed.

Fast reclaim (fastreclaim.py): under pressure, a guest with a lot of free memory still
backed on the host gets its balloon raised by all of it at once, and lowered again as
soon as the balloon got there; the loop then ticks every --policy-fast-interval, asks
for stats every quarter of it, reads the host that often between idle ticks, and decides
at once when a guest's fresh stats show a big free under pressure (stats_arrived).

Under pressure a decision is taken on fresh stats: stats older than
--policy-fast-interval are asked for first, and the decision waits for them (at most
STATS_WAIT); at the idle pace they come from the previous tick, from before an
allocation that may be under way since.

Sweeps (sweep.py): while the host is within floor + hysteresis, one quiet guest at a
time gets its balloon raised by sweep_bytes and lowered again at once, which makes the
guest release free memory that reporting cannot see.
"""

import logging
import os
import time
from dataclasses import dataclass, replace

from .errors import ConfigError
from .fastreclaim import FastReclaim
from .sweep import Sweeper

log = logging.getLogger("vhost-user-balloon.policy")

PAGE = 4096
STATS_WAIT = 0.5    # seconds a deferred decision waits for fresh stats at most
# Linux's free page reporting takes up to 32 x 4 MiB off the free lists while a batch
# is reported: a guest's available memory dips by that much without it allocating
# (the storm: "128 MiB taken" by an idle guest a second after its free, 30 s busy).
# A fall within margin + REPORT_BATCH makes a guest busy only when two samples in a
# row show it (an allocation goes on, a batch comes back).
REPORT_BATCH = 128 * 1024 * 1024
MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class PolicyConfig:
    floor_bytes: int = 2 * GiB
    guest_min_bytes: int = 256 * MiB
    margin_bytes: int = 128 * MiB
    hysteresis_bytes: int = 512 * MiB
    psi_threshold: float = 10.0   # memory "some avg10" percent; 0 = ignore PSI
    psi_step_bytes: int = 256 * MiB
    interval: float = 5.0
    stats_max_age: float = 30.0   # older guest stats count as no stats
    cgroup: str = None
    busy_hold: float = 30.0       # a guest stays busy this long after its memory use grew
    sweep_bytes: int = 128 * MiB  # 0 = no sweeps (sweep.py)
    sweep_quiet: float = 10.0     # a guest must be quiet this long before a sweep
    sweep_timeout: float = 20.0   # give up a sweep the balloon does not complete in this time
    sweep_every: float = 600.0    # sweep a quiet guest again after this long
    fast_reclaim: bool = False    # fastreclaim.py (opt-in until the storm shows a gain)
    fast_interval: float = 1.0    # tick this often while the host is short / a fast reclaim runs
    fast_min_bytes: int = 256 * MiB   # "a lot of free memory": worth a fast reclaim
    fast_timeout: float = 15.0    # give a fast reclaim up after this long
    fast_cooldown: float = 30.0   # fast-reclaim the same guest again after this long at the earliest
    fast_settle: float = 0.5      # a free must hold this long before a fast reclaim takes it
    taskstats: bool = True        # per-guest pressure of each QEMU from taskstats (taskstats.py)
    stall_ms: float = 50.0        # a QEMU stalled this many ms per second on memory is "stalling"
    delayacct: bool = False       # switch kernel.task_delayacct on at start

    def __post_init__(self):
        for name in ("floor_bytes", "guest_min_bytes", "margin_bytes", "hysteresis_bytes",
                     "psi_step_bytes", "sweep_bytes", "fast_min_bytes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--policy-{name[:-6].replace('_', '-')} must be >= 0")
        if self.interval <= 0:
            raise ConfigError("--policy-interval must be > 0 seconds")
        if self.stall_ms <= 0:
            raise ConfigError("--policy-stall must be > 0 milliseconds per second")
        if self.busy_hold < 0:
            raise ConfigError("busy_hold must be >= 0 seconds")
        if self.fast_settle < 0:
            raise ConfigError("--policy-fast-settle must be >= 0 seconds")
        for name in ("sweep_quiet", "sweep_timeout", "sweep_every", "fast_interval",
                     "fast_timeout", "fast_cooldown"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--policy-{name.replace('_', '-')} must be > 0 seconds")
        if not 0 <= self.psi_threshold <= 100:
            raise ConfigError("--policy-psi is a percentage of time stalled: 0 to 100 "
                              "(0 = ignore pressure stall information)")
        if self.cgroup is not None and not os.path.isdir(self.cgroup):
            raise ConfigError(f"--policy-cgroup {self.cgroup}: no such folder (give the memory "
                              "cgroup folder, e.g. /sys/fs/cgroup/memory/machine.slice)")


@dataclass(frozen=True)
class HostMemory:
    available_bytes: int
    psi_some_avg10: float = None  # None: no PSI on this host


@dataclass(frozen=True)
class GuestView:
    target_pages: int
    actual_pages: int = 0
    memory_bytes: int = 0          # guest RAM (0: unknown)
    available_bytes: int = None    # guest's available_memory stat (None: no fresh stats)
    busy: bool = False             # allocating: give its balloon back, do not inflate it
    reporting: bool = True         # free page reporting negotiated (sweeps need it)
    free_bytes: int = None         # guest's free_memory stat (None: no fresh stats / not sent)
    ram_backed_bytes: int = None   # guest RAM allocated on the host (None: unknown)
    stalling: bool = False         # its QEMU stalls in reclaim / refaults (taskstats)
    stats_actual_pages: int = None # balloon size when those stats arrived (None: unknown)
    settling: bool = False         # it just freed a lot: not inflated until the free held
                                   # --policy-fast-settle (it may reuse it at once)


def _cap(g, cfg):
    if g.busy:
        return 0
    limits = []
    if g.memory_bytes:
        limits.append((g.memory_bytes - cfg.guest_min_bytes) // PAGE)
    if g.available_bytes is None or g.settling:
        limits.append(g.target_pages)
    else:
        limits.append(g.actual_pages + (g.available_bytes - cfg.margin_bytes) // PAGE)
    return max(0, min(limits))


def _share(amount, weights):
    """Split amount (int) in proportion to weights {k: w >= 0}; never more than w each."""
    total = sum(weights.values())
    if total <= amount:
        return dict(weights)
    out = {k: amount * w // total for k, w in weights.items()}
    left = amount - sum(out.values())
    for k in sorted(weights, key=lambda k: (-weights[k], k)):  # remainder: biggest first
        if left <= 0:
            break
        extra = min(left, weights[k] - out[k])
        out[k] += extra
        left -= extra
    return out


def pressure(host, cfg):
    return bool(cfg.psi_threshold and host.psi_some_avg10 is not None
                and host.psi_some_avg10 >= cfg.psi_threshold)


def room(g, cap, base, host_side=True):
    """How far decide() may raise a guest's target for the host's need: up to its cap,
    and (with host_side, which comes with fast reclaim, and when the host side is known)
    no further than the available memory the host still holds for it, minus what the
    balloon was already asked for and has not got yet. Inflating memory the host no longer holds (never touched, or already
    reported) wins the host nothing: a guest that just booted or whose free memory
    was returned keeps it."""
    out = max(0, cap - base)
    if (not host_side or g.ram_backed_bytes is None or g.available_bytes is None
            or not g.memory_bytes):
        return out
    balloon = g.actual_pages if g.stats_actual_pages is None else g.stats_actual_pages
    hard = g.memory_bytes - g.available_bytes - balloon * PAGE     # not available, not balloon
    winnable = max(0, g.ram_backed_bytes - max(0, hard)) // PAGE
    in_flight = max(0, base - g.actual_pages)
    return min(out, max(0, winnable - in_flight))


def decide(host, guests, cfg):
    """{name: GuestView} -> {name: target_pages} for every guest given."""
    caps = {n: _cap(g, cfg) for n, g in guests.items()}
    base = {n: min(g.target_pages, caps[n]) for n, g in guests.items()}
    # the host-side limit goes with fast reclaim (opt-in, like every rule of issue 15)
    rooms = {n: room(g, caps[n], base[n], cfg.fast_reclaim) for n, g in guests.items()}
    quiet = [n for n, g in guests.items() if not g.stalling]
    stalling = [n for n, g in guests.items() if g.stalling]
    need = cfg.floor_bytes - host.available_bytes
    if pressure(host, cfg):
        need = max(need, cfg.psi_step_bytes)
    if need > 0:
        out = dict(base)
        left = -(-need // PAGE)
        for group in (quiet, stalling):          # quiet guests are squeezed first
            give = _share(left, {n: rooms[n] for n in group})
            for n in group:
                out[n] += give[n]
            left -= sum(give.values())
        return out
    surplus = host.available_bytes - cfg.floor_bytes - cfg.hysteresis_bytes
    if surplus > 0:
        out = dict(base)
        left = surplus // PAGE
        for group in (stalling, quiet):          # stalling guests get theirs back first
            take = _share(left, {n: base[n] for n in group})
            for n in group:
                out[n] -= take[n]
            left -= sum(take.values())
        return out
    return base


# ---- reading the host ------------------------------------------------------

def parse_meminfo(text):
    """/proc/meminfo -> {field: bytes}."""
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def parse_psi(text):
    """/proc/pressure/memory -> the 'some avg10' percentage (None if absent)."""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "some":
            for f in fields[1:]:
                key, _, value = f.partition("=")
                if key == "avg10":
                    return float(value)
    return None


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


class HostReader:
    """Host memory from /proc, or from a memory cgroup (v1 or v2) when given one."""

    def __init__(self, cgroup=None, proc="/proc"):
        self.cgroup = cgroup
        self.proc = proc

    def _cgroup_available(self):
        cg = self.cgroup
        for limit_f, usage_f in (("memory.limit_in_bytes", "memory.usage_in_bytes"),
                                 ("memory.max", "memory.current")):
            limit, usage = _read(os.path.join(cg, limit_f)), _read(os.path.join(cg, usage_f))
            if limit is None or usage is None:
                continue
            limit = limit.strip()
            if limit == "max" or int(limit) >= 1 << 60:
                return None  # no limit: the host's MemAvailable decides
            return max(0, int(limit) - int(usage))
        raise OSError(f"{cg} has neither memory.limit_in_bytes nor memory.max")

    def read(self):
        meminfo = parse_meminfo(_read(os.path.join(self.proc, "meminfo")) or "")
        available = meminfo.get("MemAvailable", meminfo.get("MemFree", 0))
        psi_text = None
        if self.cgroup:
            cg = self._cgroup_available()
            if cg is not None:
                available = min(available, cg) if available else cg
            psi_text = _read(os.path.join(self.cgroup, "memory.pressure"))  # cgroup v2
        if psi_text is None:
            psi_text = _read(os.path.join(self.proc, "pressure", "memory"))
        return HostMemory(available, parse_psi(psi_text) if psi_text else None)


# ---- the loop --------------------------------------------------------------

def view_of(status, cfg):
    """A guest's GuestStatus (multi.Guest.status()) -> GuestView."""
    dev = status.device
    age = dev.stats_age
    fresh = age is not None and age <= cfg.stats_max_age
    available = dev.stats.get("available_memory") if fresh else None
    free = dev.stats.get("free_memory") if fresh else None
    return GuestView(target_pages=dev.target_pages, actual_pages=dev.actual_pages,
                     memory_bytes=status.memory_bytes, available_bytes=available,
                     reporting=dev.reporting, free_bytes=free,
                     ram_backed_bytes=status.ram_backed_bytes,
                     stats_actual_pages=dev.stats_actual_pages if fresh else None)


class NoPressure:
    """Stands in for taskstats.PressureReader when it cannot be imported: no signal,
    and the reason in status (taskstats_error)."""

    def __init__(self, error):
        self.error = error

    def open(self):
        pass

    def close(self):
        pass

    def sample(self, pids):
        return dict.fromkeys(pids)


class PolicyLoop:
    """Runs decide() every cfg.interval seconds on the daemon's event loop."""

    def __init__(self, cfg, guests, loop, host_reader=None, pressure_reader=None):
        self.cfg = cfg
        self.guests = guests      # name -> multi.Guest
        self.loop = loop          # call_later / cancel
        self.read_host = host_reader or HostReader(cfg.cgroup).read
        self.last = None          # snapshot of the last tick, for status / metrics
        self._handle = None
        self._stats_handle = None
        self._watch_handle = None
        self._settle_handle = None
        self._refreshes = 0       # stats refreshes left before the next fast-pace tick
        self._waiting = None      # names whose fresh stats the deferred tick waits for
        self._was_pressure = False
        self._hist = {}           # name -> [(available bytes, actual pages)] of the last 3 ticks
        self._busy_until = {}     # name -> monotonic time its busy state ends
        self._last_fall = {}      # name -> monotonic time its available memory last fell
        self._fall_ref = {}       # name -> (available, actual) when it last fell
        self._backed_from = {}    # name -> time from which host-side growth counts
        self._steady = {}         # name -> (since, level): its memory use held still since
        self._dipped = {}         # name -> its last sample fell by more than the margin
        self.sweeper = Sweeper(cfg)
        self.fast = FastReclaim(cfg)
        self._fast_cfg = replace(cfg, margin_bytes=self.fast.margin)   # its caps
        self._stalling_until = {}  # name -> monotonic time its stalling state ends
        self.pressure = pressure_reader
        if self.pressure is None and cfg.taskstats:
            try:
                from .taskstats import PressureReader
                self.pressure = PressureReader()
            except ImportError as e:     # e.g. Debian 12's pyroute2 0.7 lacks the async API
                log.warning("no per-QEMU pressure from taskstats: %s (needs pyroute2 >= 0.9)", e)
                self.pressure = NoPressure(f"taskstats unavailable: {e} (needs pyroute2 >= 0.9)")

    def open_sources(self):
        """Open the taskstats socket (and switch delay accounting on if asked) now,
        before --user/--seccomp take the right to do so (the daemon calls this)."""
        if self.cfg.taskstats and self.cfg.delayacct:
            from .taskstats import enable_delayacct
            try:
                enable_delayacct()
                log.info("delay accounting switched on (sysctl kernel.task_delayacct=1)")
            except OSError as e:
                log.warning("cannot switch delay accounting on: %s", e)
        if self.pressure is not None:
            self.pressure.open()

    def next_interval(self):
        """Tick fast while the host is short or a fast reclaim runs; else idle along."""
        if self.fast.enabled and (self.fast.active or (self.last or {}).get("pressure")):
            return min(self.cfg.fast_interval, self.cfg.interval)
        return self.cfg.interval

    def start(self):
        log.info("memory policy on: keep %d MiB available on the host, guests keep at least "
                 "%d MiB, check every %gs", self.cfg.floor_bytes >> 20,
                 self.cfg.guest_min_bytes >> 20, self.cfg.interval)
        for guest in self.guests.values():
            watch = getattr(guest, "watch_stats", None)
            if watch is not None:
                watch(self.stats_arrived)
        self._handle = self.loop.call_later(0, self._tick)

    def _cancel_timers(self):
        for attr in ("_handle", "_stats_handle", "_watch_handle", "_settle_handle"):
            handle = getattr(self, attr)
            if handle is not None:
                self.loop.cancel(handle)
                setattr(self, attr, None)

    def _tick_now(self):
        """Decide at once (the next tick is scheduled from there)."""
        self._cancel_timers()
        self._handle = self.loop.call_later(0, self._tick)

    def stop(self):
        self._cancel_timers()
        if self.pressure is not None:
            self.pressure.close()

    def _mark_stalling(self, name, view, pres, now):
        if pres is not None and pres.stall_ms_per_s >= self.cfg.stall_ms:
            if now >= self._stalling_until.get(name, 0):
                log.info("policy: guest %s's QEMU (pid %d) stalls on host memory (%.0f ms/s: "
                         "reclaim %.0f, thrashing %.0f, swap-in %.0f): its balloon goes back "
                         "first, it is squeezed last", name, pres.pid, pres.stall_ms_per_s,
                         pres.reclaim_ms_per_s, pres.thrashing_ms_per_s, pres.swapin_ms_per_s)
            self._stalling_until[name] = now + self.cfg.busy_hold
        if now < self._stalling_until.get(name, 0):
            return replace(view, stalling=True)
        return view

    @property
    def _fresh_age(self):
        """Stats older than this are refreshed before a decision under pressure."""
        return min(self.cfg.fast_interval, self.cfg.interval)

    def _defer_for_stats(self):
        """Under pressure, decide on fresh stats: ask the guests whose stats are older
        than _fresh_age (at the idle pace they are a whole --policy-interval old, from
        before an allocation that may be under way) and decide when they are all in
        (stats_arrived), or after STATS_WAIT at the latest. True: deferred."""
        if self._waiting is not None:      # the wait is over
            self._waiting = None
            return False
        host = self.read_host()
        if not (self.cfg.floor_bytes > host.available_bytes or pressure(host, self.cfg)):
            return False
        stale = []
        for name, guest in self.guests.items():
            st = guest.status()
            age = st.device.stats_age
            if st.serving and age is not None and age > self._fresh_age:
                if self._each(name, guest.request_stats) is not False:
                    stale.append(name)
        if not stale:
            return False
        self._waiting = set(stale)
        self._handle = self.loop.call_later(min(STATS_WAIT, self._fresh_age), self._tick)
        return True

    def stats_arrived(self, name):
        """A guest's device got fresh stats (its on_stats hook, on the loop thread):
        the deferred tick may go on; and under pressure with fast reclaim, a guest
        whose available memory rose by --policy-fast-min since the last tick (it freed
        a lot) is decided on at once rather than at the next tick."""
        if self._handle is None:
            return
        view = None
        if self.fast.enabled and name in self.guests:
            # every stats buffer counts for "settling", not only those a tick reads
            view = view_of(self.guests[name].status(), self.cfg)
            self._observe(name, view, time.monotonic())
        if self._waiting is not None:
            self._waiting.discard(name)
            if not self._waiting:
                self._tick_now()
            return
        if view is None or not (self.last or {}).get("pressure"):
            return
        hist = self._hist.get(name)
        if not hist or name in self.fast.active:
            return
        avail = view.available_bytes
        if avail is not None and avail - hist[-1][1] >= self.cfg.fast_min_bytes:
            log.info("policy: guest %s freed %d MiB while the host is short: deciding now",
                     name, (avail - hist[-1][1]) >> 20)
            self._tick_now()

    def _tick(self):
        self._cancel_timers()
        try:
            if self._defer_for_stats():
                return
            self.tick()
        except Exception:
            log.exception("memory policy tick failed; trying again in %gs", self.cfg.interval)
            self._waiting = None
            self._handle = self.loop.call_later(self.cfg.interval, self._tick)
            return
        nxt = self.next_interval()
        if nxt < self.cfg.interval:
            # fast pace: fresh stats every quarter interval, so the next tick sees them
            # at most a quarter interval old (the guest answers within milliseconds),
            # and a guest that frees a lot is seen within a quarter (stats_arrived)
            self._refreshes = 2
            self._stats_handle = self.loop.call_later(nxt / 4, self._refresh_stats)
        elif self.fast.enabled and self.cfg.fast_interval < self.cfg.interval:
            # idle pace: watch the host (a cheap read) every --policy-fast-interval, so
            # that fast reclaim starts when the pressure does, not up to a tick later
            self._watch_handle = self.loop.call_later(self.cfg.fast_interval, self._watch)
        self._handle = self.loop.call_later(nxt, self._tick)
        if self.fast.pending:
            self._settle_handle = self.loop.call_later(self.cfg.fast_settle, self._settle_check)

    def _settle_check(self):
        """--policy-fast-settle after a guest was seen worth a fast reclaim: ask it for
        fresh stats and decide as soon as they are in (STATS_WAIT at most)."""
        self._settle_handle = None
        waiting = set()
        for name in sorted(self.fast.pending):
            guest = self.guests.get(name)
            if guest is not None and guest.status().serving:
                if self._each(name, guest.request_stats) is not False:
                    waiting.add(name)
        if not waiting:
            return
        if self._handle is not None:
            self.loop.cancel(self._handle)
        self._waiting = waiting
        self._handle = self.loop.call_later(STATS_WAIT, self._tick)

    def _watch(self):
        self._watch_handle = None
        try:
            host = self.read_host()
            if self.cfg.floor_bytes > host.available_bytes or pressure(host, self.cfg):
                log.info("policy: host memory below the floor (%d MiB available): deciding "
                         "now", host.available_bytes >> 20)
                self._tick_now()
                return
        except Exception:
            log.exception("policy: reading host memory failed")
        self._watch_handle = self.loop.call_later(self.cfg.fast_interval, self._watch)

    def _refresh_stats(self):
        self._stats_handle = None
        for guest in self.guests.values():
            try:
                if guest.status().serving:
                    guest.request_stats()
            except Exception:
                log.exception("policy: asking guest %s for stats failed", guest.name)
        if self._refreshes > 0:
            self._refreshes -= 1
            self._stats_handle = self.loop.call_later(self.next_interval() / 4,
                                                      self._refresh_stats)

    def _each(self, name, fn, *args):
        """fn(*args) for one guest: its error is its own (logged, that guest's frontend
        dropped), and the tick goes on with the other guests."""
        try:
            return fn(*args)
        except Exception:
            failed = getattr(self.guests[name], "failed", None)
            if failed is not None:
                failed()   # multi.Guest: logs the traceback, drops this guest's frontend
            else:
                log.exception("policy: guest %s failed", name)
            return None

    def _mark_busy(self, name, view, now):
        """Busy when the guest's available memory fell by more than the margin plus its
        balloon's recent growth since about one --policy-interval ago: it is allocating.
        (Measured over time, not ticks: a fast tick must not hide a slow allocation.)"""
        if view.available_bytes is None:
            self._hist.pop(name, None)
            return view
        hist = self._hist.setdefault(name, [])
        hist.append((now, view.available_bytes, view.actual_pages, view.stats_actual_pages,
                     view.ram_backed_bytes))
        window = 1.5 * self.cfg.interval
        while len(hist) > 3 and hist[1][0] < now - window:
            del hist[0]
        if len(hist) >= 2:
            i = next(k for k in range(len(hist) - 1)
                     if hist[k][0] >= now - window or k == len(hist) - 2)
            ref, before = hist[i], hist[max(0, i - 1)]
            if ref[3] is not None and hist[-1][3] is not None:
                # the balloon's size when each of the two stats arrived: its growth in
                # between is exactly what the balloon took from available memory
                grown = max(0, hist[-1][3] - ref[3]) * PAGE
            else:   # unknown: count the growth from a tick earlier (stats lag a tick)
                grown = max(0, hist[-1][2] - before[2]) * PAGE
            taken = ref[1] - hist[-1][1] - grown                # what the guest itself took
        else:
            taken = 0
        freed = None
        if self.cfg.fast_reclaim and name in self._fall_ref and now < self._busy_until.get(name, 0):
            ref_avail, ref_actual = self._fall_ref[name]
            freed = (view.available_bytes - ref_avail
                     - max(0, ref_actual - view.actual_pages) * PAGE)
        # the host-side signal goes with fast reclaim, whose "freed" rule ends the busy
        # spell it starts; without it a guest that allocated and exited stayed busy for
        # busy_hold and the need could not take what it freed (tests/e2e/test_host_policy)
        faulted = self._faulted_in(name, hist, now) if self.cfg.fast_reclaim else 0
        if freed is not None and freed >= self.cfg.fast_min_bytes:
            # with fast reclaim: a busy guest that freed a lot since it last allocated is
            # done (its balloon given back does not count): its free memory is fair game;
            # what it faulted in before that free no longer counts
            log.info("policy: guest %s freed %d MiB since it last allocated: no longer "
                     "busy", name, freed >> 20)
            self._busy_until[name] = now
            del self._fall_ref[name]
            self._backed_from[name] = now
        elif (faulted > self.cfg.margin_bytes
              or taken > self.cfg.margin_bytes + (
                  REPORT_BATCH if view.reporting and self.cfg.fast_reclaim else 0)
              or (taken > self.cfg.margin_bytes and self._dipped.get(name))):
            taken = max(taken, faulted)
            self._last_fall[name] = now
            self._fall_ref[name] = (view.available_bytes, view.actual_pages)
            if now >= self._busy_until.get(name, 0):
                log.info("policy: guest %s is allocating (%d MiB taken since the last check): "
                         "its balloon is given back and it is left alone for %gs", name,
                         taken >> 20, self.cfg.busy_hold)
            self._busy_until[name] = now + self.cfg.busy_hold
            # it allocates: its next free is new memory, no cooldown for that one (with
            # a 30 s cooldown the overhead benchmark's next pass met decide()'s balloon)
            self.fast.ended.pop(name, None)
        elif freed is not None and view.available_bytes < ref_avail:
            # still busy and lower than at its last fall: "freed" counts from the bottom
            self._fall_ref[name] = (view.available_bytes, view.actual_pages)
        # a fall within a reporting batch counts once it shows in two samples running
        self._dipped[name] = taken > self.cfg.margin_bytes
        if now < self._busy_until.get(name, 0):
            return replace(view, busy=True)
        return view

    def _observe(self, name, view, now):
        """Track how long the guest's own memory use held still: its available memory
        plus its balloon when those stats arrived (the balloon's moves do not count)
        within --policy-fast-min / 4."""
        if view.available_bytes is None:
            self._steady.pop(name, None)
            return
        balloon = view.stats_actual_pages
        if balloon is None:
            balloon = view.actual_pages
        level = view.available_bytes + balloon * PAGE
        steady = self._steady.get(name)
        if steady is None or abs(level - steady[1]) > self.cfg.fast_min_bytes // 4:
            self._steady[name] = (now, level)

    def _settling(self, name, now):
        """With fast reclaim: the guest's memory use moved within the last
        --policy-fast-settle seconds (it just freed, or allocates and frees in a loop):
        neither decide() nor fast reclaim inflates it yet, its next allocation would
        meet the balloon."""
        if not (self.cfg.fast_reclaim and self.cfg.fast_settle > 0):
            return False
        steady = self._steady.get(name)
        return steady is not None and now - steady[0] < self.cfg.fast_settle

    def _faulted_in(self, name, hist, now):
        """Guest RAM newly allocated on the host (ram_backed_bytes) since the lowest
        point in the busy window: the guest touches memory the host does not hold, i.e.
        it allocates. Seen on the host at once, while its stats lag (a stats round trip,
        a tick): the balloon stays out of an allocation's way from its start."""
        since = max(now - 1.5 * self.cfg.interval, self._backed_from.get(name, -1e18))
        pts = [(h[4], h[2]) for h in hist if h[0] >= since and h[4] is not None]
        if len(pts) < 2:
            return 0
        low = min(pts)
        # the balloon's own growth since then may fault pages in too: a guest kernel
        # with init_on_alloc zeroes each page it hands to the balloon (seen in the
        # storm: "127 MiB taken" during a fast reclaim of a guest that was idle)
        grown = max(0, pts[-1][1] - low[1]) * PAGE
        return max(0, pts[-1][0] - low[0] - grown)

    def tick(self):
        host = self.read_host()
        views, current = {}, {}   # current: the targets the devices hold now
        now = time.monotonic()
        statuses = {name: guest.status() for name, guest in self.guests.items()}
        pres = {}
        if self.pressure is not None:
            pres = self.pressure.sample({n: st.frontend_pid for n, st in statuses.items()
                                         if st.serving})
        for name, guest in self.guests.items():
            st = statuses[name]
            if st.serving:
                v = self._mark_busy(name, view_of(st, self.cfg), now)
                self._observe(name, v, now)
                v = self._mark_stalling(name, v, pres.get(name), now)
                current[name] = v.target_pages
                base = self.fast.base_target(name, self.sweeper.base_target(name, v.target_pages))
                v = replace(v, target_pages=base, settling=self._settling(name, now))
                self.sweeper.observe(name, v, self._last_fall.get(name), now)
                views[name] = v
            else:
                self._hist.pop(name, None)
                self._busy_until.pop(name, None)
                self._last_fall.pop(name, None)
                self._fall_ref.pop(name, None)
                self._backed_from.pop(name, None)
                self._steady.pop(name, None)
                self._dipped.pop(name, None)
                self._stalling_until.pop(name, None)
                base = self.sweeper.forget(name)
                fbase = self.fast.forget(name, now)
                base = fbase if fbase is not None else base
                if base is not None:
                    self._each(name, guest.set_target, base)
        # decide() also leaves alone a guest whose fast reclaim waits for the settle
        targets = decide(host, {n: replace(v, settling=True) if n in self.fast.seen else v
                                for n, v in views.items()}, self.cfg)
        short = host.available_bytes < self.cfg.floor_bytes + self.cfg.hysteresis_bytes
        caps = {n: _cap(replace(v, busy=False, settling=False), self.cfg)
                for n, v in views.items()}
        under = self.cfg.floor_bytes > host.available_bytes or pressure(host, self.cfg)
        fast = set(self.fast.active)
        targets = self.sweeper.apply({n: v for n, v in views.items() if n not in fast},
                                     targets, caps, short, now)
        swept = self.sweeper.active["name"] if self.sweeper.active else None
        targets = self.fast.apply(views, targets,
                                  {n: _cap(replace(v, settling=False), self._fast_cfg)
                                   for n, v in views.items()},
                                  under, now, skip={swept})
        if under != self._was_pressure:
            log.info("host memory %s: %d MiB available (floor %d MiB), PSI some avg10 %s",
                     "pressure: inflating balloons" if under else "pressure passed",
                     host.available_bytes >> 20, self.cfg.floor_bytes >> 20,
                     "n/a" if host.psi_some_avg10 is None else f"{host.psi_some_avg10:.1f}%")
            self._was_pressure = under
        for name, pages in targets.items():
            old = current[name]
            if pages != old:
                log.info("policy: guest %s balloon target %d MiB -> %d MiB (host has %d MiB "
                         "available, floor %d MiB)", name, old >> 8, pages >> 8,
                         host.available_bytes >> 20, self.cfg.floor_bytes >> 20)
                self._each(name, self.guests[name].set_target, pages)
            self._each(name, self.guests[name].request_stats)
        self.last = {"time": time.time(), "host_available": host.available_bytes,
                     "psi_some_avg10": host.psi_some_avg10, "pressure": under,
                     "targets": dict(targets),
                     "busy": sorted(n for n, v in views.items() if v.busy),
                     "sweeping": self.sweeper.active["name"] if self.sweeper.active else None,
                     "sweeps": dict(self.sweeper.count),
                     "fast": self.fast.targets(), "fast_done": dict(self.fast.count),
                     "stalling": sorted(n for n, v in views.items() if v.stalling),
                     "host_pressure": {n: p.to_dict() for n, p in pres.items() if p is not None},
                     "taskstats_error": getattr(self.pressure, "error", None)}
        return targets
