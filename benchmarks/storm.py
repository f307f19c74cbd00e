#!/usr/bin/env python3
"""Boot storm: guests launched at a fixed interval, without waiting for memory to settle.

    python benchmarks/storm.py [--limit-gib 3.6] [--intervals 3,6] [--cap 10] [--rounds 2]
                               [--guest-append init_on_alloc=0]
                               [--launch auto|boot|resume]
                               [--configs noreport,builtin,ours,policy,policy-notaskstats]

The density set-up (benchmarks/density.py): a parent memory cgroup v1 with a limit
of --limit-gib GiB stands for the host; 1 GiB guests (TCG) each run
`alloc_touch 800` once booted, then idle. Here guest k is launched k * interval
seconds after the first, whatever memory does. We count the guests whose
allocation completed before the first OOM kill (a QEMU or daemon process killed,
or a process killed inside a guest because a balloon was in the way), for:

  noreport       QEMU virtio-balloon-pci, free-page-reporting=off
  builtin        QEMU virtio-balloon-pci, free-page-reporting=on
  ours           one shared daemon, reporting only (its memory counts too)
  policy         the shared daemon with the host memory policy on the parent
                 cgroup and fast reclaim (--policy-fast-reclaim), --deflate-on-oom
  policy-nofast  the same with --no-policy-fast-reclaim (optional)
  policy-notaskstats  the policy without the taskstats signal (the policy
                 configurations switch delay accounting on: --taskstats-delayacct)

Launch (--launch): "boot" starts QEMU at the launch time; "resume" (the default
under TCG) boots every guest beforehand, two at a time, and pauses it (QMP stop)
just after boot, inside a 3 s sleep that precedes its allocation; the launch is
then QMP cont, and the allocation starts about 3 s later, as after a KVM boot.
Two TCG cores cannot boot a guest every 3 s (a boot takes 20-40 s of CPU, 0 guests
fitted at 3 s in every configuration on 2026-12-01): resume keeps the storm's
memory pattern (a new 800 MiB demand every interval) and moves only the boot's CPU
before the clock. The paused guests' memory counts (the parent cgroup holds them
from the start), and the storm begins once their stats are stale (the policy never
inflates a guest without fresh stats: a paused guest stands for one not launched yet).

Guest kernel (--guest-append, default init_on_alloc=0 for every configuration): TCG
clears pages slowly, and the guest kernel's default init_on_alloc=1 adds a clear of
every allocated page (alloc_touch 800: 3.5 s of CPU instead of 2.2 s), including every
page handed to a balloon (an 800 MiB inflate: 4.0 s of CPU instead of 0.8 s;
benchmarks/inflate_cost.py). With it the storm is CPU-bound (the QEMUs use the two
cores, allocations stretch to 7-24 s) and measures the CPU price of clearing pages,
not memory; pass --guest-append '' to run it so.

Every run ends at the first OOM kill, at --cap guests, or --watch seconds after
the last launch. Writes benchmarks/results/storm/ (result.json, result.md,
storm.png: guests fitted against the launch interval).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (GIB, Sampler, cpu_seconds, dmesg_len, dmesg_tail, env_lines,  # noqa: E402
                    md_table, median, mib, pyplot, rotated, start_run)
from density import OOM_RE, SharedDaemon, guest_oom_lines  # noqa: E402

from balloon_device.host.harness import Guest, MemCgroup  # noqa: E402

CONFIGS = ("noreport", "builtin", "ours", "policy", "policy-notaskstats")
LABELS = {"noreport": "no reporting", "builtin": "QEMU built-in reporting",
          "ours": "ours, reporting only (shared daemon)",
          "policy": "ours + policy with fast reclaim",
          "policy-nofast": "ours + policy, no fast reclaim",
          "policy-notaskstats": "ours + policy with fast reclaim, no taskstats"}
COLORS = {"noreport": "tab:gray", "builtin": "tab:orange", "ours": "tab:blue",
          "policy": "tab:purple", "policy-nofast": "tab:green",
          "policy-notaskstats": "tab:red"}


HOLD_S = 3   # the sleep before a guest's allocation, in which resume mode pauses it


def policy_args(ns, parent, cfg):
    fast = cfg != "policy-nofast"
    taskstats = cfg != "policy-notaskstats"
    return ["--stats-interval", "1", "--deflate-on-oom", "--policy",
            "--policy-taskstats" if taskstats else "--no-policy-taskstats",
            *(["--taskstats-delayacct"] if taskstats else []),
            "--policy-cgroup", str(parent.path),
            "--policy-floor", ns.policy_floor, "--policy-guest-min", ns.policy_guest_min,
            "--policy-margin", ns.policy_margin, "--policy-hysteresis", ns.policy_hysteresis,
            "--policy-interval", str(ns.policy_interval), "--policy-psi", "0",
            "--policy-fast-interval", str(ns.fast_interval),
            "--policy-fast-reclaim" if fast else "--no-policy-fast-reclaim"]


def make_guest(cfg, i, ns, accel, parent, shared, hold):
    kw = (dict(balloon="vhost-user", vhost_socket=shared.socket(f"g{i}"))
          if shared is not None else
          dict(balloon="builtin" if cfg == "builtin" else "builtin-noreport"))
    steps = ([("hold", f"sleep {HOLD_S}")] if hold else []) + [
        ("alloc", f"alloc_touch {ns.alloc_mib}")]
    return Guest(name=f"storm-{cfg}-{i}", mem_mib=ns.guest_mib, accel=accel,
                 cgroup_parent=parent.child(f"g{i}").create(), steps=steps,
                 stats=ns.guest_ticker, append=ns.guest_append, **kw)


def preboot(guests, t_global, cfg):
    """Resume mode: boot the guests two at a time, each paused (QMP stop) as soon as
    its hold step starts. Returns the seconds from that marker to the stop (max)."""
    worst = 0.0
    for k in range(0, len(guests), 2):
        pair = guests[k:k + 2]
        for g in pair:
            g.start()
        left = set(range(len(pair)))
        deadline = time.monotonic() + 600
        while left:
            for j in sorted(left):
                g = pair[j]
                if g.find_marker("step-start", name="hold"):
                    t = time.monotonic()
                    g.qmp("stop")
                    worst = max(worst, time.monotonic() - t)
                    left.discard(j)
                elif not g.alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"guest {g.name} did not boot:\n{g.diagnostics()}")
            time.sleep(0.05)
        print(f"[{time.monotonic() - t_global:6.0f}s] {cfg}: guests {k}-{k + len(pair) - 1} "
              "booted and paused", flush=True)
    return worst


def group_pids(cg):
    """The processes now in memory cgroup ``cg`` and the cgroups below it (a guest's
    QEMU sits in a child of its own)."""
    pids = set()
    for f in cg.path.rglob("cgroup.procs"):
        try:
            pids.update(int(x) for x in f.read_text().split())
        except (OSError, ValueError):
            pass
    return pids


def group_cpu(cg):
    """CPU seconds (user + system) of the processes in ``cg`` and below it."""
    return sum(cpu_seconds(p) or 0.0 for p in group_pids(cg))


def cpu_spent(samples):
    """CPU seconds the guests' QEMUs and the daemon spent from the storm's start
    to the last sample before the first OOM kill (a killed process leaves the sum)."""
    ok = [s for s in samples if "cpu_guests" in s]
    if len(ok) < 2:
        return {}
    a = ok[0]
    top = {k: max(s[k] for s in ok) for k in ("cpu_guests", "cpu_daemon", "t")}
    return {"cpu_guests_s": round(top["cpu_guests"] - a["cpu_guests"], 1),
            "cpu_daemon_s": round(top["cpu_daemon"] - a["cpu_daemon"], 1),
            "cpu_window_s": round(top["t"] - a["t"], 1)}


def run_one(cfg, interval, ns, accel, t_global):
    tag = f"vub-bench-storm-{cfg}-{interval:g}-{int(time.time())}"
    parent = MemCgroup(tag, limit_bytes=int(ns.limit_gib * GIB)).create()
    resume = ns.launch == "resume"
    guests, shared, failure = [], None, None
    pids = []
    dmesg0 = dmesg_len()
    groups = {"daemon": parent.child("daemon"),
              **{f"g{i}": parent.child(f"g{i}") for i in range(ns.cap)}}

    def sample():
        cpu = {k: round(group_cpu(cg), 2) for k, cg in groups.items()}
        return {"usage": parent.usage(), "cpu_daemon": cpu.pop("daemon"),
                "cpu_guests": round(sum(cpu.values()), 2)}
    sp = Sampler(sample, interval=0.5)
    done_at, launched_at = {}, {}
    t0 = None
    pre = {}

    def check():
        out = [f"qemu of guest {i} exited rc={g.proc.returncode}"
               for i, g in enumerate(guests) if g.proc is not None and g.proc.poll() is not None]
        if shared is not None and not shared.alive():
            out.append(f"shared daemon exited rc={shared.proc.returncode}")
        for i, g in enumerate(guests):
            if i in launched_at and i not in done_at:
                if g.find_marker("alloc-done"):
                    done_at[i] = round(time.monotonic() - t0, 1)
                elif g.find_marker("step-done", name="alloc"):
                    out.append(f"allocator in guest {i} killed inside the guest")
            if guest_oom_lines(g):
                out.append(f"guest {i}'s kernel OOM-killed a process")
        return out

    try:
        if cfg != "noreport" and cfg != "builtin":
            args = () if cfg == "ours" else policy_args(ns, parent, cfg)
            shared = SharedDaemon([f"g{i}" for i in range(ns.cap)],
                                  parent.child("daemon").create(), args=args)
            pids.append(shared.pid)
        if resume:
            guests = [make_guest(cfg, i, ns, accel, parent, shared, True) for i in range(ns.cap)]
            pre["stop_latency_s"] = round(preboot(guests, t_global, cfg), 3)
            pids += [g.pid for g in guests]
            early = [i for i, g in enumerate(guests) if g.find_marker("step-start", name="alloc")]
            if early:
                raise RuntimeError(f"guests {early} started allocating before their launch")
            pre["usage_paused"] = parent.usage()
            stale = 32.0    # past the policy's stats_max_age (30 s): paused = not launched
            print(f"[{time.monotonic() - t_global:6.0f}s] {cfg}: {len(guests)} guests paused, "
                  f"parent {mib(pre['usage_paused'])} MiB; storm in {stale:g}s", flush=True)
            time.sleep(stale)
            failure = check() or None
        sp.start()
        t0 = time.monotonic()
        next_launch = t0
        last_launch = None
        while not failure:
            now = time.monotonic()
            n = len(launched_at)
            if n < ns.cap and now >= next_launch:
                if resume:
                    guests[n].qmp("cont")
                else:
                    guests.append(make_guest(cfg, n, ns, accel, parent, shared, False))
                    guests[n].start()
                    pids.append(guests[n].pid)
                launched_at[n] = round(now - t0, 1)
                sp.mark("launch", guest=n)
                last_launch = now
                next_launch = t0 + (n + 1) * interval
                print(f"[{now - t_global:6.0f}s] {cfg} @{interval:g}s: guest {n} launched; "
                      f"parent {mib(parent.usage())} MiB", flush=True)
            failure = check()
            if failure:
                break
            if len(launched_at) >= ns.cap:
                if len(done_at) == ns.cap and now - last_launch >= ns.watch:
                    break
                if now - last_launch > ns.watch + 600:
                    failure = ["timeout: allocations did not finish"]
                    break
            time.sleep(0.2)
        if failure:
            sp.mark("oom", what=failure)
    finally:
        t_end = time.monotonic() - (t0 or time.monotonic())
        policy_log = []
        if shared is not None and cfg.startswith("policy"):
            try:
                policy_log = [ln for ln in shared.log.read_text(errors="replace").splitlines()
                              if "policy" in ln or "pressure" in ln][-300:]
            except OSError:
                pass
        samples = sp.stop() if t0 is not None else []
        daemon_cpu = {}
        for pid in group_pids(groups["daemon"]):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            daemon_cpu[str(pid)] = [cpu_seconds(pid), cmd.decode(errors="replace")[-60:]]
        alloc_start = {}
        for i, g in enumerate(guests):
            mk = g.find_marker("step-start", name="alloc") if i in launched_at else None
            if mk is not None and mk.values.get("t"):
                alloc_start[i] = mk.values["t"]
        for g in guests:
            g.close()
        if shared is not None:
            shared.stop()
        parent.remove()
    ps = {str(p) for p in pids}
    dmesg = [ln for ln in dmesg_tail(dmesg0) if OOM_RE.search(ln) and (
        tag in ln or any(f"process {p} " in ln or f"pid={p}," in ln for p in ps))]
    fitted = len(done_at)
    r = {"config": cfg, "interval": interval, "launch": ns.launch, "launched": len(launched_at),
         "fitted": fitted, "capped": not failure, "failure": failure or [],
         "launched_at": launched_at, "alloc_done_at": done_at, "preboot": pre,
         "duration_s": round(t_end, 1), "dmesg_oom": dmesg[-12:], "policy_log": policy_log,
         "samples": samples, "marks": sp.marks,
         "peak_usage": max((s["usage"] for s in samples if s.get("usage")), default=None),
         "daemon_cpu": daemon_cpu, **cpu_spent(samples)}
    print(f"[{time.monotonic() - t_global:6.0f}s] {cfg} @{interval:g}s: {fitted} guests "
          f"completed their allocation before " + ("the first OOM kill: " + "; ".join(failure)
                                                   if failure else f"the cap ({ns.cap})"),
          flush=True)
    return r


def render(res, ns):
    results = res.data["results"]
    configs = list(dict.fromkeys(r["config"] for r in results))
    intervals = sorted({r["interval"] for r in results})
    rows = []
    for r in results:
        fit = f"{r['fitted']}" + (" (cap, no OOM)" if r["capped"] else "")
        rows.append([LABELS[r["config"]], f"{r['interval']:g}", r.get("round", 0), f"**{fit}**",
                     r["launched"],
                     "; ".join(r["failure"])[:120] or "-", mib(r["peak_usage"]),
                     f"{r['duration_s']:.0f}",
                     f"{r.get('cpu_guests_s', '?')} / {r.get('cpu_daemon_s', '?')}"])
    runs = {}
    for r in results:
        runs.setdefault((r["config"], r["interval"]), []).append(r["fitted"])
    by = {k: median(v) for k, v in runs.items()}
    md = [f"### Boot storm: guests that completed their allocation before the first OOM kill "
          f"(parent cgroup {ns.limit_gib:g} GiB, {ns.guest_mib} MiB guests touching "
          f"{ns.alloc_mib} MiB, one launched every INTERVAL s, cap {ns.cap})", ""]
    md += env_lines(res.data["environment"])
    if ns.launch == "resume":
        md += [f"- launch = QMP cont of a guest booted beforehand and paused {HOLD_S} s before its "
               "allocation (TCG: two cores cannot boot a guest every few seconds); the paused "
               "guests' memory counts from the start"]
    if ns.guest_append:
        md += [f"- guest kernel command line also has: `{ns.guest_append}` (every configuration)"]
    md += ["", md_table(["configuration", "interval s", "round", "guests fitted", "launched",
                         "first failure", "peak parent usage MiB", "run s",
                         "CPU s: QEMUs / daemon"], rows), ""]
    for iv in intervals:
        b, p = by.get(("builtin", iv)), by.get(("policy", iv))
        if b and p is not None:
            md.append(f"At {iv:g} s: policy with fast reclaim / built-in, medians of the guests "
                      f"fitted = **{p / b:.2f}** ({p:g} vs {b:g}; per round: policy "
                      f"{runs[('policy', iv)]}, built-in {runs[('builtin', iv)]}; target >= 1.5 "
                      "at 3 s; a run that reached the cap counts the cap).")
        t = by.get(("policy-notaskstats", iv))
        if p is not None and t is not None:
            md.append(f"At {iv:g} s: policy with the taskstats signal {runs[('policy', iv)]}, "
                      f"without it {runs[('policy-notaskstats', iv)]} (per round: does the "
                      "per-QEMU stall signal decide better?).")
    md += ["", "![storm](storm.png)"]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for c in configs:
        pts = sorted((iv, f) for (cc, iv), f in by.items() if cc == c)
        ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", color=COLORS[c], label=LABELS[c])
    ax.set_xlabel("seconds between two guest launches")
    ax.set_ylabel("guests fitted before the first OOM kill (median)")
    ax.set_title(f"Boot storm, {ns.limit_gib:g} GiB host cgroup", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    res.png(fig, "storm.png")
    res.write("\n".join(md))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit-gib", type=float, default=3.6,
                    help="the parent cgroup's limit (default 3.6: ten paused guests hold "
                         "about 2.1-2.2 GiB, leaving about 1.4 GiB for the storm; at 3.9 "
                         "the built-in balloon fitted all 10 guests in 5 of 8 runs)")
    ap.add_argument("--guest-mib", type=int, default=1024)
    ap.add_argument("--alloc-mib", type=int, default=800)
    ap.add_argument("--cap", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2,
                    help="repeat every configuration and interval (default 2; the start "
                         "configuration rotates)")
    ap.add_argument("--intervals", default="3,6", help="comma-separated seconds (default 3,6)")
    ap.add_argument("--watch", type=float, default=30.0,
                    help="seconds watched after the last launch once all allocations ended")
    ap.add_argument("--guest-ticker", type=int, default=5, metavar="S")
    ap.add_argument("--guest-append", default="init_on_alloc=0", metavar="WORDS",
                    help="extra guest kernel command line words for every configuration "
                         "(default init_on_alloc=0; '' for the kernel's default): under TCG "
                         "clearing pages is slow, and Debian's init_on_alloc=1 clears a THP "
                         "allocation's pages a second time and every page handed to a "
                         "balloon, so the storm turns CPU-bound instead of memory-bound "
                         "(docs/benchmarks.md, boot storm)")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--launch", choices=("auto", "boot", "resume"), default="auto",
                    help="boot: QEMU starts at the launch; resume: booted beforehand and "
                         "paused, the launch resumes it (auto: resume under TCG)")
    pol = ap.add_argument_group("the policy configurations (the daemon's --policy-*)")
    pol.add_argument("--policy-floor", default="1GiB")
    pol.add_argument("--policy-guest-min", default="128MiB")
    pol.add_argument("--policy-margin", default="32MiB")
    pol.add_argument("--policy-hysteresis", default="256MiB")
    pol.add_argument("--policy-interval", type=float, default=1.0)
    pol.add_argument("--fast-interval", type=float, default=1.0)
    ap.add_argument("--out", help="results folder (default benchmarks/results/storm)")
    ns = ap.parse_args()
    configs = [c for c in ns.configs.split(",") if c]
    bad = [c for c in configs if c not in LABELS]
    if bad:
        ap.error(f"unknown configurations {bad}; choose from {', '.join(LABELS)}")
    intervals = [float(x) for x in ns.intervals.split(",") if x]
    res, accel = start_run("storm", ns)
    if ns.launch == "auto":
        ns.launch = "resume" if accel == "tcg" else "boot"
        res.data["params"]["launch"] = ns.launch
    t0 = time.monotonic()
    res.data["results"] = []
    for rnd in range(ns.rounds):
        for iv in intervals:
            for _, cfg in rotated(configs[rnd % len(configs):] + configs[:rnd % len(configs)], 1):
                r = run_one(cfg, iv, ns, accel, t0)
                r["round"] = rnd
                res.data["results"].append(r)
                res.write("(partial)")
    render(res, ns)
    return 0


if __name__ == "__main__":
    sys.exit(main())
