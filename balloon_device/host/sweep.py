"""Balloon sweeps: make a quiet guest hand back free memory that reporting cannot see.

Free page reporting only sees a Linux guest's buddy free lists. The pages a guest freed
last sit on its per-CPU lists instead, up to about the zone's low watermark per CPU
(54 MiB in a 1 GiB guest with THP: the huge pages of a process that exited). They stay
backed on the host for as long as the guest does not reuse them.

A sweep raises a quiet guest's balloon by --policy-sweep (default 128 MiB) and lowers
it as soon as the balloon got there. The inflation takes pages reporting already
returned (nothing to free on the host). The deflation frees that many pages in a row,
which makes the guest's page allocator (Linux 6.x) flush its per-CPU lists in growing
batches; the next small high-order page the guest frees (any process exiting does)
then sends the whole per-CPU list back to the buddy allocator, and reporting returns
it within seconds. Measured on a 1 GiB Debian 6.1 guest after `alloc_touch 800`:
guest RAM backed on the host 141-149 MiB -> 105 MiB. A guest that runs no process at
all keeps its lists until something runs (docs/operations.md).

Who is swept: a guest with fresh stats whose available memory has not fallen (it has
not allocated, see "busy" in policy.py) for --policy-sweep-quiet seconds, whose balloon
has been at its target since the last tick (so its stats count it), with room for the
sweep within its limits (guest_min, available - margin), while the host is within
floor + hysteresis. Once after each allocation, and again every --policy-sweep-every
seconds. One guest at a time. This may be within the 30 s a busy guest is otherwise
left alone: the sweep takes only what the guest's margin allows and ends at once when
the guest allocates again, when its limits shrink below the sweep, when the guest goes
away (its old target is restored) or after --policy-sweep-timeout. Only guests that
negotiated free page reporting are swept (without it the flushed pages would stay on
the host anyway).
"""

import logging

log = logging.getLogger("vhost-user-balloon.policy")

PAGE = 4096


class Sweeper:
    def __init__(self, cfg):
        self.cfg = cfg
        self.pages = cfg.sweep_bytes // PAGE
        self.active = None        # {"name", "base", "target", "started"}
        self.quiet_since = {}     # name -> monotonic time since it has been quiet
        self.due = {}             # name -> a sweep is wanted
        self.last_sweep = {}      # name -> monotonic time of its last sweep
        self.count = {}           # name -> sweeps done
        self.settled = {}         # name -> (actual pages last tick, balloon settled now)

    @property
    def enabled(self):
        return self.pages > 0

    def forget(self, name):
        """The guest went away. Returns the target its device must get back if it was
        being swept (the device keeps its target across a reconnect), else None."""
        for d in (self.quiet_since, self.due, self.last_sweep, self.settled):
            d.pop(name, None)
        if self.active and self.active["name"] == name:
            base = self.active["base"]
            self.active = None
            log.info("policy: sweep of guest %s stopped (the guest went away); its balloon "
                     "target goes back to %d MiB", name, base >> 8)
            return base
        return None

    def base_target(self, name, target_pages):
        """The target decide() should see: without the sweep's extra pages."""
        if self.active and self.active["name"] == name:
            return self.active["base"]
        return target_pages

    def observe(self, name, view, last_fall, now):
        """Track quiet spells: last_fall is when the guest's available memory last fell
        (it allocated; None: never seen). A guest that allocated needs a sweep once it
        has been quiet for sweep_quiet seconds - the memory it freed since is likely
        to sit on its per-CPU lists."""
        prev = self.settled.get(name, (None, False))[0]
        self.settled[name] = (view.actual_pages,
                              prev == view.actual_pages == view.target_pages)
        if view.available_bytes is None:
            self.quiet_since.pop(name, None)
            return
        first = self.quiet_since.setdefault(name, now)
        if last_fall is not None and last_fall > first:
            self.quiet_since[name] = last_fall
            self.due[name] = True
        self.due.setdefault(name, True)
        if now - self.last_sweep.get(name, now) >= self.cfg.sweep_every:
            self.due[name] = True

    def apply(self, views, targets, caps, short, now):
        """Adjust decide()'s targets for a sweep in progress or one to start.
        caps: the most each guest's balloon may hold (policy._cap, ignoring "busy")."""
        if not self.enabled:
            return targets
        act = self.active
        if act is not None:
            name = act["name"]
            act["base"] = targets.get(name, 0)
            v = views.get(name)
            if v is None:
                self._finish(name, "the guest went away", now)
            elif v.busy or self.quiet_since.get(name, now) > act["started"]:
                self._finish(name, "the guest is allocating", now, due=True)
            elif caps.get(name, 0) < act["target"]:
                self._finish(name, "the guest needs its memory", now, due=True)
            elif v.actual_pages >= act["target"]:
                self.count[name] = self.count.get(name, 0) + 1
                self._finish(name, None, now)
            elif now - act["started"] >= self.cfg.sweep_timeout:
                self._finish(name, f"the balloon did not get there in "
                                   f"{self.cfg.sweep_timeout:g}s", now)
            else:
                targets[name] = max(targets[name], act["target"])
            return targets
        if not short:
            return targets
        for name in sorted(views, key=lambda n: self.quiet_since.get(n, now)):
            if (self.due.get(name) and views[name].reporting
                    and self.settled.get(name, (0, False))[1]
                    and now - self.quiet_since.get(name, now) >= self.cfg.sweep_quiet
                    and caps.get(name, 0) - targets[name] >= self.pages):
                base = targets[name]
                self.active = {"name": name, "base": base, "target": base + self.pages,
                               "started": now}
                targets[name] = base + self.pages
                log.info("policy: sweeping quiet guest %s: its balloon takes %d MiB for a "
                         "moment and gives it back, so that free memory held on its per-CPU "
                         "lists reaches free page reporting", name, self.pages >> 8)
                break
        return targets

    def _finish(self, name, why, now, due=False):
        base = self.active["base"]
        self.active = None
        self.due[name] = due
        self.last_sweep[name] = now
        if why is None:
            log.info("policy: swept guest %s; its balloon goes back to %d MiB", name, base >> 8)
        else:
            log.info("policy: sweep of guest %s stopped (%s); its balloon goes back to %d MiB",
                     name, why, base >> 8)
