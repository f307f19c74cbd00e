"""Fast reclaim: beat free page reporting's pace when the host is short now.

Free page reporting returns what a guest frees at the guest's pace: Linux waits 2 s
after a free and reports a bounded share of its free lists per pass (800 MiB: 90%
back after about 6 s, docs/benchmarks.md). The balloon is faster: the guest hands
inflated pages over as fast as it can allocate them, and the device discards them as
they arrive.

While the host is under pressure (below --policy-floor, or PSI), a guest whose fresh
stats show a lot of free memory still backed on the host gets its balloon raised by
that backed free memory minus half of --policy-margin (within its cap, policy._cap, with that
half margin: the balloon is gone a tick after it got there), on top of
decide()'s share, once its own memory use held still --policy-fast-settle seconds
(policy.py: "settling"). As soon as the balloon got there, or reporting caught up by
itself, its target goes back to decide()'s (once the host is back above its floor, to
at most what it was when the fast reclaim started: the need decide() added meanwhile
was met by the fast reclaim itself). The pressure ending does not cut a fast reclaim
short: the balloon takes only free memory that reporting would return seconds later
anyway and gives it back a tick after it got there, so finishing costs the guest
nothing and leaves the host the headroom the next burst needs (cut short at floor +
hysteresis, the reclaim benchmark got half of the 800 MiB at once and the rest at
reporting's pace). The deflated
pages return to the guest as free pages that cost the host nothing until the guest
touches them, so the guest keeps its memory when it needs it.

"Free" is the guest's free_memory stat (available_memory without it): free pages
are what reporting has not returned yet; taking page cache as well would cost the
guest its cache for a gain reporting never promised. "Still backed" is the guest's
RAM allocated on the host (GuestStatus.ram_backed_bytes) minus what the guest uses
(RAM - free - balloon): this is what inflating can win. After a fast reclaim that got
there or ran --policy-fast-timeout, the guest is fast-reclaimed again --policy-fast-cooldown seconds
later at the earliest (no churn on a guest that keeps the memory free, or that the
balloon cannot get to), unless it allocates in between (busy: its next free is new
memory); one cut short because the guest allocated does not count (the guest must
first be no longer busy: it freed what it took).

Who is never fast-reclaimed: a busy guest (its available memory is falling, see
policy.py), a guest without fresh stats, the guest being swept, a guest whose QEMU
stalls in reclaim (taskstats, policy.py). A fast reclaim ends early when the guest
becomes busy or stalling, or its cap falls below the fast target (it needs its memory), and after
--policy-fast-timeout in any case.

While the host is under pressure or a fast reclaim runs, the policy ticks every
--policy-fast-interval seconds and asks for stats every quarter of it, instead of every
--policy-interval: a 5 s tick would lose against reporting's 6 s. Between idle ticks it
reads the host every --policy-fast-interval and decides at once when it falls below the
floor; a decision under pressure first asks for stats older than that interval and
waits for them (0.5 s at most), so that a guest allocating since the last idle tick is
seen busy; and stats showing a guest freed --policy-fast-min or more since the last
tick start the decision at once (PolicyLoop.stats_arrived): the balloon target is set
within about a quarter interval of the free (reclaim benchmark, docs/benchmarks.md).
"""

import logging

log = logging.getLogger("vhost-user-balloon.policy")

PAGE = 4096


def free_bytes(view):
    """The guest's free memory by its last stats (None: no fresh stats)."""
    if view.free_bytes is not None:
        if view.available_bytes is not None:
            return min(view.free_bytes, view.available_bytes)
        return view.free_bytes
    return view.available_bytes


def backed_free(view):
    """Free guest memory still allocated on the host (None: no fresh stats).
    Without ram_backed_bytes: all free memory may be."""
    free = free_bytes(view)
    if free is None:
        return None
    if view.ram_backed_bytes is None or not view.memory_bytes:
        return free
    in_use = view.memory_bytes - free - view.actual_pages * PAGE   # balloon pages: not backed
    return max(0, min(free, view.ram_backed_bytes - max(0, in_use)))


class FastReclaim:
    def __init__(self, cfg):
        self.cfg = cfg
        self.min_pages = cfg.fast_min_bytes // PAGE
        # half the margin: a fast reclaim's balloon is gone a tick after it got there,
        # the margin protects a guest from a balloon that stays (with the whole margin
        # the reclaim benchmark left 126 MiB of the 800 to reporting's next pass, 4 s on)
        self.margin = cfg.margin_bytes // 2
        self.active = {}          # name -> {"target", "started", "base", "start": base then}
        self.ended = {}           # name -> monotonic time its last fast reclaim ended (kept
                                  # across reconnects: the cooldown still holds)
        self.count = {}           # name -> fast reclaims done (the balloon got there)
        self.seen = {}            # name -> time it was first seen worth one, while its
                                  # memory use has not held still --policy-fast-settle

    @property
    def enabled(self):
        return self.cfg.fast_reclaim

    @property
    def pending(self):
        """Guests worth a fast reclaim that wait for their memory use to hold still
        --policy-fast-settle (GuestView.settling): a guest that reuses what it freed at
        once (a loop of allocations) shows it moving again by then, and the balloon
        stays out of its way; decide() leaves a guest waiting here alone too."""
        return set(self.seen)

    def targets(self):
        return {n: a["target"] for n, a in self.active.items()}

    def forget(self, name, now):
        """The guest went away: the base target its device must get back, or None."""
        act = self.active.pop(name, None)
        if act is None:
            return None
        log.info("policy: fast reclaim of guest %s stopped (the guest went away); its balloon "
                 "target goes back to %d MiB", name, act["base"] >> 8)
        return act["base"]

    def base_target(self, name, target_pages):
        """The target decide() should see: without the fast reclaim's extra pages."""
        act = self.active.get(name)
        return act["base"] if act else target_pages

    def _why_end(self, name, act, v, cap, now):
        if v.busy:
            return "the guest is allocating"
        if v.stalling:
            return "its QEMU stalls on host memory"
        if cap < act["target"]:
            return "the guest needs its memory"
        if v.actual_pages >= act["target"]:
            return None          # done: the balloon got there
        bf = backed_free(v)
        if v.ram_backed_bytes is not None and bf is not None and bf <= self.margin:
            return None          # reporting caught up by itself
        if now - act["started"] >= self.cfg.fast_timeout:
            return f"the balloon did not get there in {self.cfg.fast_timeout:g}s"
        return ""

    def apply(self, views, targets, caps, under, now, skip=()):
        """Adjust decide()'s targets. caps: policy._cap of each view (busy counts);
        under: the host is under pressure (a fast reclaim may start); skip: guests not
        to touch (being swept). Candidates in order: most memory to win first."""
        if not self.enabled:
            return targets
        just_ended = set()
        for name in sorted(self.active):
            act = self.active[name]
            act["base"] = targets.get(name, 0)
            v = views.get(name)
            why = self._why_end(name, act, v, caps.get(name, 0), now)
            if why == "":
                targets[name] = max(targets[name], act["target"])
                continue
            del self.active[name]
            just_ended.add(name)           # not restarted in the same tick
            if not under and targets[name] > act["start"]:
                # decide() added the need to this guest's target on every tick while
                # the balloon was on its way (the host did not show it yet): with the
                # host above its floor now, that need was met by the fast reclaim
                # itself; keeping it would hold the guest's memory until the surplus
                # gives it back, a few MiB a tick (seen in the overhead benchmark)
                targets[name] = act["base"] = act["start"]
            if why is None or now - act["started"] >= self.cfg.fast_timeout:
                self.ended[name] = now     # done, or ran its full time: cool down
            if why is None:
                self.count[name] = self.count.get(name, 0) + 1
                log.info("policy: fast reclaim of guest %s done (its free memory is back on the "
                         "host); its balloon goes back to %d MiB", name, act["base"] >> 8)
            else:
                log.info("policy: fast reclaim of guest %s stopped (%s); its balloon goes back "
                         "to %d MiB", name, why, act["base"] >> 8)
        if not under:
            self.seen.clear()
            return targets
        waiting = {}              # the next self.seen: worth one, settling
        for name in sorted(views, key=lambda n: (-(backed_free(views[n]) or 0), n)):
            v = views[name]
            if (name in self.active or name in just_ended or name in skip or v.busy
                    or v.stalling):
                continue
            bf = backed_free(v)
            if bf is None or bf < self.cfg.fast_min_bytes:
                continue
            if now - self.ended.get(name, -1e18) < self.cfg.fast_cooldown:
                continue
            free = free_bytes(v)
            # what the host still holds, not all the free memory: the balloon's pages
            # beyond it are ones reporting already returned, which the guest zeroes
            # (init_on_alloc) and so faults in on the host again, only for the device
            # to discard them a moment later: CPU and a transient rise, no gain
            goal = min(caps.get(name, 0), v.actual_pages + (bf - self.margin) // PAGE)
            if goal - max(targets[name], v.actual_pages) < self.min_pages:
                continue
            if v.settling:
                waiting[name] = self.seen.get(name, now)
                continue
            self.active[name] = {"target": goal, "started": now, "base": targets[name],
                                 "start": targets[name]}
            log.info("policy: fast reclaim of guest %s: the host is short and the guest has "
                     "%d MiB free (%d MiB of it still backed on the host): balloon target "
                     "%d MiB until it got there", name, free >> 20, bf >> 20, goal >> 8)
            targets[name] = goal
        self.seen = waiting
        return targets
