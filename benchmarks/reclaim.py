#!/usr/bin/env python3
"""Reclaim speed: how fast does memory a guest frees come back to the host?

    python benchmarks/reclaim.py [--rounds 2] [--watch 20] [--alloc-mib 800]

A 1 GiB guest (QEMU 11.1, TCG) sleeps, allocates and touches --alloc-mib MiB
(alloc_touch), frees it, and idles.  Host memory of that guest is sampled
every 100 ms: the allocated size of the guest-RAM memfd, and the usage of a
memory cgroup holding QEMU (and, for "ours", the daemon too).  Three
configurations, alternated round by round (the starting one rotates):

  ours       our daemon (vhost-user-test-device-pci), free page reporting on
  builtin    QEMU's virtio-balloon-pci,free-page-reporting=on (the reference)
  noreport   QEMU's virtio-balloon-pci,free-page-reporting=off (control)
  killed     ours, with the serving process SIGKILLed twice (its supervisor
             restarts it): once while the guest allocates (--kill-alloc-delay s
             after the allocation starts) and once during the first reporting
             pass after the free (as soon as the daemon completed a report chain
             after the guest's `alloc-freed` marker); the time without service of
             each kill is recorded (kill -> successor restored and answering)

Under pressure (the parent cgroup, standing for the host, gets a limit of
--pressure-limit MiB: after the allocation its available memory (limit - usage)
is below the policy's floor --pressure-floor, before it above floor + hysteresis):

  fast             our daemon with --policy pointed at the parent cgroup, fast
                   reclaim on (sweeps off, to measure fast reclaim alone)
  builtin-pressure QEMU's built-in balloon, reporting on, same limit (the reference)
  ours-pressure    our daemon, reporting only, same limit (optional)

Figures per run: baseline (before the allocation), peak, level after the free
(end of the watch window), seconds from the free (the guest's `alloc-freed`
marker, seen by the host) to the first drop and to 50% / 90% of the freed
memory back, memory never returned (level after - baseline).  Ratio
ours/builtin of the median time to 90%.  Writes benchmarks/results/reclaim/.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (MIB, Sampler, env_lines, f, md_table, median, mib, pyplot,  # noqa: E402
                    ratio, rotated, start_run)

from balloon_device.host.harness import Guest, MemCgroup, alloc_steps  # noqa: E402
from balloon_device.host.harness.daemon import Daemon  # noqa: E402
from balloon_device.host.harness.reclaim import figures  # noqa: E402

CONFIGS = ("ours", "builtin", "noreport", "fast", "builtin-pressure")
OURS = ("ours", "fast", "ours-pressure", "killed")
PRESSURE = ("fast", "builtin-pressure", "ours-pressure")
LABELS = {"ours": "ours (vhost-user daemon)", "builtin": "QEMU built-in, reporting on",
          "noreport": "QEMU built-in, reporting off",
          "fast": "under pressure: ours + policy, fast reclaim",
          "builtin-pressure": "under pressure: QEMU built-in, reporting on",
          "ours-pressure": "under pressure: ours, reporting only",
          "killed": "ours, serving process SIGKILLed twice"}
COLORS = {"ours": "tab:blue", "builtin": "tab:orange", "noreport": "tab:gray",
          "fast": "tab:purple", "builtin-pressure": "tab:red", "ours-pressure": "tab:cyan",
          "killed": "tab:green"}
DROP = 16 * MIB  # "first drop": level below peak by this much


class TwoKills(threading.Thread):
    """The "killed" configuration: SIGKILL the daemon's serving process while the
    guest allocates, and again during the first reporting pass after the free
    (set ``freed`` when the guest's alloc-freed marker is seen). Each kill's record:
    when (seconds on the sampler's clock), the old pid, and the time without service
    (until a new serving process answers status with the session restored)."""

    def __init__(self, d, sp, freed, alloc_delay, timeout=120.0):
        super().__init__(daemon=True)
        self.d, self.sp, self.freed = d, sp, freed
        self.alloc_delay, self.timeout = alloc_delay, timeout
        self.kills = []
        self.error = None

    def _status(self):
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return self.d.status()
            except Exception:   # the control socket is away during a restart
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def _kill(self, when):
        st = self._status()
        pid, chains = st["process"]["pid"], st["counters"]["report_chains"]
        t_kill = time.monotonic()
        rec = {"when": when, "t": round(self.sp.now(), 3), "pid": pid, "chains_before": chains,
               "before_free": not self.freed.is_set()}
        os.kill(pid, signal.SIGKILL)
        while time.monotonic() - t_kill < self.timeout:
            try:
                st = self.d.status()
            except Exception:
                st = None
            if st and st["process"]["pid"] != pid and st["connected"]:
                rec.update(gap_s=round(time.monotonic() - t_kill, 3),
                           restored=bool(st["process"].get("restored")),
                           new_pid=st["process"]["pid"])
                break
            time.sleep(0.01)
        else:
            raise RuntimeError(f"no serving process {self.timeout:g}s after killing {pid}")
        self.kills.append(rec)
        return rec

    def run(self):
        try:
            time.sleep(self.alloc_delay)
            self._kill("allocation")
            if not self.freed.wait(self.timeout):
                raise RuntimeError("the guest did not free its memory")
            chains0 = self._status()["counters"]["report_chains"]
            deadline = time.monotonic() + self.timeout
            while self._status()["counters"]["report_chains"] <= chains0:
                if time.monotonic() > deadline:
                    raise RuntimeError("no report chain after the free")
                time.sleep(0.01)
            self._kill("first reporting pass")
        except Exception as e:  # noqa: BLE001 - reported with the run
            self.error = repr(e)


def run_one(cfg, rnd, ns, accel):
    """One guest, one configuration; returns the run's record with samples."""
    tag = f"vub-bench-reclaim-{cfg}-{rnd}-{int(time.time())}"
    parent = MemCgroup(tag, limit_bytes=ns.pressure_limit * MIB if cfg in PRESSURE
                       else None).create()
    d = None
    g = None
    try:
        kw = {}
        if cfg in OURS:
            args = []
            if cfg == "fast":
                args = ["--policy", "--policy-fast-reclaim", "--policy-cgroup", str(parent.path),
                        "--policy-floor", f"{ns.pressure_floor}MiB",
                        "--policy-hysteresis", f"{ns.pressure_hysteresis}MiB",
                        "--policy-fast-interval", str(ns.fast_interval),
                        "--policy-sweep", "0", "--policy-psi", "0"]
            d = Daemon(tempfile.mkdtemp(prefix="vub-bench-"), cgroup=parent.child("daemon").create(),
                       log_level="info", args=args)
            d.start()
            kw = dict(balloon="vhost-user", vhost_socket=d.socket_path, num_vqs=4, vq_size=64)
        else:
            kw = dict(balloon="builtin-noreport" if cfg == "noreport" else "builtin")
        g = Guest(name=f"reclaim-{cfg}", mem_mib=ns.guest_mib, accel=accel, cgroup_parent=parent,
                  steps=alloc_steps(ns.alloc_mib), **kw)
        g.start()
        g.wait_marker("booted", timeout=120)
        info = g.wait_marker("balloon", timeout=30)
        g.wait_marker("step-start", timeout=60, name="settle")

        def sample():
            return {"memfd": g.memfd_allocated(), "usage": parent.usage()}

        sp = Sampler(sample, interval=0.1).start()
        killer = None
        try:
            start = g.wait_marker("step-start", timeout=60, name="alloc")
            t_alloc = sp.mark("alloc-start")
            if cfg == "killed":
                killer = TwoKills(d, sp, threading.Event(), ns.kill_alloc_delay)
                killer.start()
            freed = g.wait_marker("alloc-freed", timeout=300, since=start.index)
            t_free = sp.mark("freed")
            if killer:
                killer.freed.set()
            g.wait_step("alloc", timeout=60)
            time.sleep(ns.watch)
            if killer:
                killer.join(timeout=60)
                if killer.error or len(killer.kills) != 2:
                    raise RuntimeError(f"the kills went wrong: {killer.error}\n"
                                       f"{d.log_text(60)}")
            if not g.alive():
                raise RuntimeError(f"QEMU died during the run:\n{g.diagnostics()}")
        finally:
            samples = sp.stop()
        done = g.find_marker("alloc-done")
        counters = d.status()["counters"] if d else None
        daemon_alive = d.alive() if d else None
        policy_log = [ln for ln in d.log_text(tail=400).splitlines()
                      if "policy" in ln or "pressure" in ln][-60:] if cfg == "fast" else []
        if cfg == "killed":
            policy_log = d.log_text(tail=400).splitlines()[-200:]
    finally:
        if g is not None:
            g.close()
        if d is not None:
            d.stop()
        parent.remove()

    rec = {"config": cfg, "round": rnd, "t_alloc": t_alloc, "t_free": t_free,
           "reporting": info.get("reporting"), "alloc_elapsed_ms": done.num("elapsed_ms") if done
           else None, "daemon_counters": counters, "daemon_alive_at_end": daemon_alive,
           "freed_marker": freed.line, "policy_log": policy_log,
           "limit": parent.limit_bytes,
           "kills": [dict(k, t=round(k["t"] - t_free, 3)) for k in killer.kills] if killer else [],
           "samples": [{"t": round(s["t"] - t_free, 2), "memfd": s.get("memfd"),
                        "usage": s.get("usage")} for s in samples]}
    for key in ("memfd", "usage"):
        rec[key] = figures(rec["samples"], key, ns.watch, t_alloc - t_free)
    return rec


def plot(res, runs, ns):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, sharex=True)
    seen = set()
    for r in runs:
        for ax, key, title in ((axes[0], "memfd", "guest-RAM memfd allocated"),
                               (axes[1], "usage", "cgroup usage (QEMU [+ daemon])")):
            xs = [s["t"] for s in r["samples"] if s[key] is not None]
            ys = [s[key] / MIB for s in r["samples"] if s[key] is not None]
            lab = LABELS[r["config"]] if (r["config"] not in seen and key == "memfd") else None
            ax.plot(xs, ys, color=COLORS[r["config"]], lw=1.2 if r["round"] == 0 else 0.8,
                    alpha=1.0 if r["round"] == 0 else 0.55, label=lab)
            ax.set_title(title)
        seen.add(r["config"])
    for ax in axes:
        ax.axvline(0, color="k", ls=":", lw=0.8)
        ax.set_xlabel("seconds since the guest freed its memory")
        ax.set_xlim(-12, ns.watch)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("MiB")
    axes[0].legend(loc="upper right", fontsize=7)
    fig.suptitle(f"Reclaim: 1 GiB guest frees {ns.alloc_mib} MiB (100 ms samples, "
                 f"{ns.rounds} rounds)", fontsize=9)
    fig.tight_layout()
    res.png(fig, "reclaim.png")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--watch", type=float, default=20.0, help="seconds watched after the free")
    ap.add_argument("--guest-mib", type=int, default=1024)
    ap.add_argument("--alloc-mib", type=int, default=800)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--out", help="results folder (default benchmarks/results/reclaim)")
    ap.add_argument("--kill-alloc-delay", type=float, default=0.8,
                    help="killed: seconds after the allocation starts to the first SIGKILL "
                         "(default 0.8; the allocation takes 2-11 s here)")
    pr = ap.add_argument_group("under pressure (fast, builtin-pressure, ours-pressure)")
    pr.add_argument("--pressure-limit", type=int, default=1600, metavar="MIB",
                    help="limit of the parent cgroup standing for the host (default 1600)")
    pr.add_argument("--pressure-floor", type=int, default=1000, metavar="MIB",
                    help="--policy-floor of the daemon (default 1000: the host is ~400 MiB "
                         "below it once the guest touched its 800 MiB, still below it after "
                         "reporting's first pass, above floor + hysteresis before)")
    pr.add_argument("--pressure-hysteresis", type=int, default=256, metavar="MIB",
                    help="--policy-hysteresis of the daemon (default 256)")
    pr.add_argument("--fast-interval", type=float, default=1.0,
                    help="--policy-fast-interval of the daemon (default 1)")
    ns = ap.parse_args()
    configs = [c for c in ns.configs.split(",") if c]
    res, accel = start_run("reclaim", ns)
    runs = []
    t0 = time.monotonic()
    for rnd, cfg in rotated(configs, ns.rounds):
        r = run_one(cfg, rnd, ns, accel)
        m = r["memfd"]
        print(f"[{time.monotonic() - t0:6.0f}s] round {rnd} {cfg:9s} baseline {mib(m['baseline'])} "
              f"peak {mib(m['peak'])} after {mib(m['after'])} MiB; first drop "
              f"{f(m['t_first_drop'], '{:.1f}')} s, 50% {f(m['t50'], '{:.1f}')} s, "
              f"90% {f(m['t90'], '{:.1f}')} s; never returned {mib(m['never_returned'])} MiB"
              + (f"; daemon {r['daemon_counters']['bytes_discarded'] // MIB} MiB discarded in "
                 f"{r['daemon_counters']['report_chains']} chains" if r["daemon_counters"] else "")
              + "".join(f"; killed at {k['t']:+.1f} s ({k['when']}), served again after "
                        f"{k['gap_s'] * 1e3:.0f} ms" for k in r["kills"]),
              flush=True)
        runs.append(r)
    res.data["runs"] = runs

    summary = {}
    for cfg in configs:
        rs = [r for r in runs if r["config"] == cfg]
        s = {}
        for key in ("memfd", "usage"):
            s[key] = {k: median([r[key][k] for r in rs]) for k in
                      ("baseline", "peak", "after", "never_returned", "t_first_drop", "t50", "t90")}
            s[key]["t90_runs"] = [r[key]["t90"] for r in rs]
            s[key]["reached90"] = sum(r[key]["t90"] is not None for r in rs)
        summary[cfg] = s
    res.data["summary"] = summary
    r90 = ratio(summary.get("ours", {}).get("memfd", {}).get("t90"),
                summary.get("builtin", {}).get("memfd", {}).get("t90"))
    r90u = ratio(summary.get("ours", {}).get("usage", {}).get("t90"),
                 summary.get("builtin", {}).get("usage", {}).get("t90"))
    res.data["ratio_t90_ours_over_builtin"] = {"memfd": r90, "usage": r90u}
    p90 = ratio(summary.get("fast", {}).get("memfd", {}).get("t90"),
                summary.get("builtin-pressure", {}).get("memfd", {}).get("t90"))
    p90u = ratio(summary.get("fast", {}).get("usage", {}).get("t90"),
                 summary.get("builtin-pressure", {}).get("usage", {}).get("t90"))
    res.data["ratio_t90_fast_over_builtin_pressure"] = {"memfd": p90, "usage": p90u}
    k90 = ratio(summary.get("killed", {}).get("memfd", {}).get("t90"),
                summary.get("builtin", {}).get("memfd", {}).get("t90"))
    k90u = ratio(summary.get("killed", {}).get("usage", {}).get("t90"),
                 summary.get("builtin", {}).get("usage", {}).get("t90"))
    res.data["ratio_t90_killed_over_builtin"] = {"memfd": k90, "usage": k90u}
    gaps = {w: [k["gap_s"] for r in runs for k in r["kills"] if k["when"] == w]
            for w in ("allocation", "first reporting pass")}
    res.data["kill_gaps_s"] = gaps
    plot(res, runs, ns)

    rows = []
    for cfg in configs:
        for key, what in (("memfd", "memfd"), ("usage", "cgroup")):
            s = summary[cfg][key]
            runs90 = ", ".join(f(x, "{:.1f}", "never") for x in s["t90_runs"])
            rows.append([LABELS[cfg], what, mib(s["baseline"]), mib(s["peak"]), mib(s["after"]),
                         f(s["t_first_drop"], "{:.1f}", "never"), f(s["t50"], "{:.1f}", "never"),
                         f(s["t90"], "{:.1f}", "never") + f" ({runs90})",
                         mib(s["never_returned"])])
    md = [f"### Reclaim speed: 1 GiB guest frees {ns.alloc_mib} MiB ({ns.rounds} rounds, "
          "medians; time to 90% per run in brackets)", ""]
    md += env_lines(res.data["environment"])
    md += ["", md_table(["configuration", "measure", "baseline MiB", "peak MiB",
                         f"after {ns.watch:.0f} s MiB", "first drop s", "50% back s",
                         "90% back s", "never returned MiB"], rows), ""]
    if r90 is not None:
        md.append(f"Ratio ours / built-in, time to 90%: **{f(r90, '{:.2f}')}** (memfd), "
                  f"{f(r90u, '{:.2f}')} (cgroup usage); target <= 1.05.")
    if k90 is not None:
        md.append("")
        md.append(f"Two SIGKILLs of the serving process (one {ns.kill_alloc_delay:g} s into the "
                  "allocation, one right after the first report chain after the free): ratio "
                  f"killed / built-in, time to 90%: **{f(k90, '{:.2f}')}** (memfd), "
                  f"{f(k90u, '{:.2f}')} (cgroup usage); target (issue 12) <= 1.25. Time without "
                  "service per kill (kill -> successor restored and answering), ms: "
                  + "; ".join(f"{w}: " + ", ".join(f"{g * 1e3:.0f}" for g in gs)
                              for w, gs in gaps.items()) + ".")
    if p90 is not None:
        md.append("")
        md.append(f"Under pressure (parent cgroup limit {ns.pressure_limit} MiB, policy floor "
                  f"{ns.pressure_floor} MiB): ratio fast reclaim / built-in, time to 90%: "
                  f"**{f(p90, '{:.2f}')}** (memfd), {f(p90u, '{:.2f}')} (cgroup usage); "
                  "target <= 0.5.")
    md.append("")
    md.append("Times are seconds after the guest's `alloc-freed` marker reached the host "
              "(100 ms sampling). memfd = allocated size of the guest-RAM memfd; cgroup = "
              "memory.usage_in_bytes of a cgroup holding QEMU and, for ours, the daemon.")
    md.append("")
    md.append("![reclaim](reclaim.png)")
    res.write("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
