#!/usr/bin/env python3
"""Guest density: the seed's experiment, scaled to this machine.

    python benchmarks/density.py [--limit-gib 3] [--cap 14]
                                 [--configs noreport,builtin,ours,shared,policy]

Seed: a 15 GB host, 5 GB guests; each guest runs a program that allocates
4 GB, touches it and exits, then the next guest is launched; guests
launched before one was killed for lack of memory: 3 without hinting, 5
with.  Here: a parent memory cgroup v1 with a limit of --limit-gib GiB
(use_hierarchy=1) stands for the host; 1 GiB guests (TCG) each run
`alloc_touch 800` and then idle.  The next guest is launched once the
previous one's allocator exited and the parent cgroup's usage settled
(range < 8 MiB over 4 s, at most 30 s).  We count guests launched until the
first OOM kill (a QEMU or daemon process dying; dmesg is recorded), for:

  noreport   QEMU virtio-balloon-pci, free-page-reporting=off
  builtin    QEMU virtio-balloon-pci, free-page-reporting=on
  ours       one daemon per guest, started inside that guest's child cgroup
             (its memory counts against the 3 GiB)
  shared     one daemon for all guests (--socket-dir/--guests), in its own
             child cgroup of the parent (its memory counts too)
  policy     the shared daemon, reporting on, with the host memory policy
             (--policy) pointed at the parent cgroup: it inflates the guests'
             balloons to keep --policy-floor of the parent's limit available
             (tuned by the --policy-* options below, passed through)

--cap stops a configuration that has not failed after that many guests.
Also records the daemons' resident memory (RSS without the guest-RAM
mapping, PSS, anon) once each guest settled, summed over every process of a
daemon (its supervisor, and the serving process, or for the shared daemon the
manager and one serving process per guest; benchmarks/common.py tree_memory).  Writes benchmarks/results/density/.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (GIB, MIB, ROOT, Results, Sampler, dmesg_len, dmesg_tail,  # noqa: E402
                    env_lines, md_table, median, mib, pyplot, start_run, tree_memory)

from balloon_device.host.harness import Guest, MemCgroup, start_process, stop_process  # noqa: E402
from balloon_device.host.harness.daemon import Daemon  # noqa: E402
from balloon_device.host.control import request as control_request  # noqa: E402

CONFIGS = ("noreport", "builtin", "ours", "shared", "policy")
LABELS = {"noreport": "no reporting", "builtin": "QEMU built-in reporting",
          "ours": "our daemon, one per guest (in the guest's cgroup)",
          "shared": "our daemon, one shared by all guests",
          "policy": "ours + policy (shared daemon, reporting and host memory policy)"}
COLORS = {"noreport": "tab:gray", "builtin": "tab:orange", "ours": "tab:blue",
          "shared": "tab:green", "policy": "tab:purple"}
OOM_RE = re.compile(r"oom|Killed process|Out of memory", re.I)
GUEST_OOM_RE = re.compile(r"Out of memory|Killed process|oom-kill|invoked oom-killer")


class SharedDaemon:
    """One daemon serving guests g0..gN-1 on DIR/gK.sock."""

    def __init__(self, names, cgroup, args=()):
        self.dir = Path(tempfile.mkdtemp(prefix="vub-bench-shared-"))
        self.names = names
        self.log = self.dir / "daemon.log"
        self.control = self.dir / "control.sock"
        self.args = list(args)
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = start_process(
            [sys.executable, "-m", "balloon_device.host.cli", "--socket-dir", str(self.dir),
             "--guests", ",".join(names), "--log-level", "info", *self.args],
            cgroup=cgroup, log_path=self.log, env=env, cwd=ROOT)
        deadline = time.monotonic() + 20
        while not all((self.dir / f"{n}.sock").exists() for n in names):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"shared daemon did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)

    def socket(self, name):
        return str(self.dir / f"{name}.sock")

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        stop_process(self.proc)

    def guest_status(self, name):
        """(target, actual, guest stats) of one guest, from the control socket."""
        try:
            st = control_request(str(self.control), {"cmd": "status", "guest": name},
                                 timeout=5)["status"]
        except Exception as e:  # noqa: BLE001 - evidence is best effort
            return {"error": repr(e)}
        stats = st.get("stats") or {}
        return {"target": st.get("target_bytes"), "actual": st.get("actual_bytes"),
                "stats_age": st.get("stats_age"),
                **{k: stats.get(k) for k in ("total_memory", "free_memory", "available_memory",
                                             "disk_caches", "oom_kills")
                   if stats.get(k) is not None}}


def policy_args(ns, parent):
    return ["--stats-interval", "1", "--policy", "--policy-cgroup", str(parent.path),
            "--policy-floor", ns.policy_floor, "--policy-guest-min", ns.policy_guest_min,
            "--policy-margin", ns.policy_margin, "--policy-hysteresis", ns.policy_hysteresis,
            "--policy-interval", str(ns.policy_interval), "--policy-psi", str(ns.policy_psi),
            "--policy-sweep", ns.policy_sweep]


def cgroup_breakdown(cg):
    """A guest's child cgroup split (memory cgroup v1 memory.stat): rss = QEMU's own
    anonymous memory, shmem = guest RAM backed on the host, cache = other files."""
    try:
        st = cg.stat()
    except Exception:  # noqa: BLE001
        return {}
    return {k: st.get("total_" + k) for k in ("rss", "shmem", "cache", "mapped_file")}


def guest_oom_lines(g):
    try:
        return [ln for ln in g.serial_text().splitlines() if GUEST_OOM_RE.search(ln)]
    except Exception:  # noqa: BLE001
        return []

def run_config(cfg, ns, accel, t_global):
    tag = f"vub-bench-density-{cfg}-{int(time.time())}"
    parent = MemCgroup(tag, limit_bytes=int(ns.limit_gib * GIB)).create()
    guests, daemons, per_guest = [], [], []
    shared = None
    pids_seen = []
    dmesg0 = dmesg_len()
    sp = Sampler(lambda: {"usage": parent.usage()}, interval=0.5).start()
    failure = None
    launched = 0
    t_start = time.monotonic()

    def dead():
        out = [f"qemu of guest {i} (pid {g.pid}) exited rc={g.proc.returncode}"
               for i, g in enumerate(guests) if g.proc is not None and g.proc.poll() is not None]
        out += [f"daemon of guest {i} (pid {d.pid}) exited rc={d.proc.returncode}"
                for i, d in enumerate(daemons) if d is not None and not d.alive()]
        if shared is not None and not shared.alive():
            out.append(f"shared daemon (pid {shared.pid}) exited rc={shared.proc.returncode}")
        return out

    try:
        if cfg in ("shared", "policy"):
            shared = SharedDaemon([f"g{i}" for i in range(ns.cap)],
                                  parent.child("daemon").create(),
                                  args=(policy_args(ns, parent) if cfg == "policy" else [])
                                  + ["--guest-processes", ns.guest_processes])
            pids_seen.append(shared.pid)
        for i in range(ns.cap):
            child = parent.child(f"g{i}").create()
            kw = {}
            d = None
            if cfg == "ours":
                d = Daemon(tempfile.mkdtemp(prefix="vub-bench-"), cgroup=child, log_level="info")
                d.start()
                kw = dict(balloon="vhost-user", vhost_socket=d.socket_path)
            elif cfg in ("shared", "policy"):
                kw = dict(balloon="vhost-user", vhost_socket=shared.socket(f"g{i}"))
            else:
                kw = dict(balloon="builtin" if cfg == "builtin" else "builtin-noreport")
            daemons.append(d)
            g = Guest(name=f"dens-{cfg}-{i}", mem_mib=ns.guest_mib, accel=accel,
                      cgroup_parent=child, steps=[("alloc", f"alloc_touch {ns.alloc_mib}")],
                      stats=ns.guest_ticker, **kw)
            guests.append(g)
            g.start()
            pids_seen.append(g.pid)
            if d is not None:
                pids_seen.append(d.pid)
            launched = i + 1
            sp.mark("launch", guest=i)
            print(f"[{time.monotonic() - t_global:6.0f}s] {cfg}: guest {i} launched; parent usage "
                  f"{mib(parent.usage())} MiB", flush=True)
            # wait for its allocator to exit, watching every guest
            deadline = time.monotonic() + 240
            while not failure:
                failure = dead()
                if failure:
                    break
                if g.find_marker("step-done", name="alloc"):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"guest {i} allocation did not finish:\n{g.diagnostics()}")
                time.sleep(0.2)
            if failure:
                break
            if not g.find_marker("alloc-done"):
                # the allocator exited without finishing: killed for lack of memory inside
                # the guest (a balloon in the way); that is this guest failing too
                failure = [f"allocator in guest {i} killed inside the guest (guest OOM: "
                           f"{(guest_oom_lines(g) or ['no kernel line'])[0].strip()[:160]})"]
                break
            t_done = sp.mark("alloc-exited", guest=i)
            # settle: parent usage flat within 8 MiB over 4 s (at most 30 s)
            while not failure:
                failure = dead()
                now = sp.now()
                win = [s["usage"] for s in sp.samples if s["t"] >= now - 4.0 and s.get("usage")]
                if now - t_done >= 4.0 and win and max(win) - min(win) < 8 * MIB:
                    break
                if now - t_done > 30:
                    break
                time.sleep(0.25)
            if failure:
                break
            hurt = [k for k, gk in enumerate(guests) if guest_oom_lines(gk)]
            if hurt:
                failure = [f"guest {k}'s kernel OOM-killed a process inside it" for k in hurt]
                break
            sp.mark("settled", guest=i)
            rec = {"guest": i, "parent_usage": parent.usage(), "child_usage": child.usage(),
                   "settle_s": round(sp.now() - t_done, 1),
                   "alloc_ms": g.find_marker("alloc-done").num("elapsed_ms")
                   if g.find_marker("alloc-done") else None}
            if d is not None:
                rec["daemon"] = tree_memory(d.pid)   # supervisor + serving process
            if shared is not None:
                # supervisor + manager + one serving process per guest, PSS summed
                rec["daemon"] = tree_memory(shared.pid)
                rec["daemon_cgroup_usage"] = parent.child("daemon").usage()
            # every guest so far: its cgroup split and, for our daemon, balloon and stats
            rec["guests"] = []
            for k, gk in enumerate(guests):
                cg = parent.child(f"g{k}")
                row = {"guest": k, "usage": cg.usage(), **cgroup_breakdown(cg)}
                if shared is not None:
                    row.update(shared.guest_status(f"g{k}"))
                rec["guests"].append(row)
            per_guest.append(rec)
            dm = rec.get("daemon")
            if cfg == "policy":
                print("    " + "; ".join(
                    f"g{r['guest']} {mib(r['usage'])}"
                    f" (qemu {mib(r.get('rss'))}, ram {mib(r.get('shmem'))},"
                    f" balloon {mib(r.get('actual'))}, avail {mib(r.get('available_memory'))})"
                    for r in rec["guests"]), flush=True)
            print(f"[{time.monotonic() - t_global:6.0f}s] {cfg}: guest {i} settled after "
                  f"{rec['settle_s']} s; its cgroup {mib(rec['child_usage'])} MiB, parent "
                  f"{mib(rec['parent_usage'])} MiB"
                  + (f"; daemon ({len(dm['processes'])} processes) rss "
                     f"{mib(dm['rss'], '{:.1f}')} (own {mib(dm['rss_own'], '{:.1f}')}, "
                     f"anon {mib(dm['rss_anon'], '{:.1f}')}) pss {mib(dm['pss'], '{:.1f}')} "
                     f"(own {mib(dm['pss_own'], '{:.1f}')}) MiB"
                     if dm else ""), flush=True)
        if not failure:
            # a last look: did anything die while the last guest settled?
            time.sleep(1)
            failure = dead()
        if failure:
            sp.mark("oom", what=failure)
            time.sleep(1.0)
    finally:
        # did any guest's kernel kill something inside (the balloon squeezed it too far)?
        guest_ooms = {k: hits[:6] for k, gk in enumerate(guests) if (hits := guest_oom_lines(gk))}
        policy_log = []
        if shared is not None and cfg == "policy":
            try:
                policy_log = [ln for ln in shared.log.read_text(errors="replace").splitlines()
                              if "policy" in ln or "pressure" in ln][-400:]
            except OSError:
                pass
        samples = sp.stop()
        for g in guests:
            g.close()
        for d in daemons:
            if d is not None:
                d.stop()
        if shared is not None:
            shared.stop()
        parent.remove()
    # only the kernel lines about our cgroups / processes (other tests may OOM too)
    pids = {str(p) for p in pids_seen}
    dmesg = [ln for ln in dmesg_tail(dmesg0) if OOM_RE.search(ln) and (
        tag in ln or any(f"process {p} " in ln or f"pid={p}," in ln for p in pids))]
    killed = [ln for ln in dmesg if "Killed process" in ln]
    result = {
        "config": cfg, "launched": launched, "oom": bool(failure), "failure": failure or [],
        "guests_before_oom": (launched - 1) if failure else None,
        "capped": not failure, "dmesg_oom": dmesg[-12:], "dmesg_killed": killed,
        "per_guest": per_guest, "samples": samples, "marks": sp.marks,
        "guest_kernel_oom": guest_ooms, "policy_log": policy_log,
        "duration_s": round(time.monotonic() - t_start, 1),
    }
    settled = [r["child_usage"] for r in per_guest if r.get("child_usage")]
    result["settled_guest_usage_median"] = median(settled)
    d_rss = [r["daemon"] for r in per_guest if r.get("daemon")]
    if d_rss:
        result["daemon_rss_median"] = median([x.get("rss") for x in d_rss])
        result["daemon_rss_own_median"] = median([x.get("rss_own") for x in d_rss])
        result["daemon_pss_own_median"] = median([x.get("pss_own") for x in d_rss])
        result["daemon_anon_median"] = median([x.get("rss_anon") for x in d_rss])
        result["daemon_last"] = d_rss[-1]
    print(f"[{time.monotonic() - t_global:6.0f}s] {cfg}: launched {launched}, "
          + (f"first OOM: {failure}" if failure else f"no OOM (cap {ns.cap})")
          + (f"; dmesg: {killed[:3]}" if killed else "")
          + (f"; OOM inside guests {sorted(guest_ooms)}" if guest_ooms else ""), flush=True)
    return result


def plot(res, results, ns):
    plt = pyplot()
    fig, axes = plt.subplots(len(results), 1, sharex=True,
                             figsize=(8, 1.6 + 1.5 * len(results)), squeeze=False)
    for ax, r in zip(axes[:, 0], results):
        xs = [s["t"] for s in r["samples"] if s.get("usage") is not None]
        ys = [s["usage"] / GIB for s in r["samples"] if s.get("usage") is not None]
        ax.plot(xs, ys, color=COLORS[r["config"]], lw=1.0)
        ax.axhline(ns.limit_gib, color="r", ls="--", lw=0.8)
        for m in r["marks"]:
            if m["label"] == "launch":
                ax.axvline(m["t"], color="k", lw=0.5, alpha=0.5)
            elif m["label"] == "oom":
                ax.plot([m["t"]], [ns.limit_gib], "rx", ms=9, mew=2)
        outcome = (f"{r['launched'] - 1} guests fit; launching guest {r['launched']} led to an "
                   f"OOM kill" if r["oom"] else f"{r['launched']} launched, no OOM (cap)")
        ax.set_title(f"{LABELS[r['config']]}: {outcome}", fontsize=8)
        ax.set_ylabel("GiB")
        ax.set_ylim(0, ns.limit_gib * 1.08)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("seconds (vertical lines: guest launches; red x: first OOM kill; "
                           "dashed: limit)")
    fig.suptitle(f"Density: parent cgroup limit {ns.limit_gib} GiB, {ns.guest_mib} MiB guests "
                 f"each touching {ns.alloc_mib} MiB", fontsize=9)
    fig.tight_layout()
    res.png(fig, "density.png")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit-gib", type=float, default=3.0)
    ap.add_argument("--guest-mib", type=int, default=1024)
    ap.add_argument("--alloc-mib", type=int, default=800)
    ap.add_argument("--cap", type=int, default=14)
    ap.add_argument("--guest-ticker", type=int, default=5, metavar="S",
                    help="the idle guest runs a small process every S seconds (its meminfo "
                         "marker), like the timers of any real guest; 0 = a silent guest "
                         "(default 5)")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--guest-processes", choices=("per-guest", "shared"), default="per-guest",
                    help="the shared daemon's --guest-processes (shared and policy "
                         "configurations; default per-guest)")
    pol = ap.add_argument_group("the policy configuration (passed to the daemon's --policy-*)")
    pol.add_argument("--policy-floor", default="1GiB",
                     help="keep this much of the parent cgroup's limit available: room for "
                          "the next guest's allocation (default 1GiB)")
    pol.add_argument("--policy-guest-min", default="128MiB")
    pol.add_argument("--policy-margin", default="32MiB")
    pol.add_argument("--policy-hysteresis", default="256MiB")
    pol.add_argument("--policy-interval", type=float, default=1.0)
    pol.add_argument("--policy-sweep", default="128MiB",
                     help="--policy-sweep of the daemon (0 = no sweeps; see balloon_device/sweep.py)")
    pol.add_argument("--policy-psi", type=float, default=0.0,
                     help="0: ignore the system-wide PSI (the host here is the cgroup, and "
                          "other work on the machine would move /proc/pressure/memory)")
    ap.add_argument("--out", help="results folder (default benchmarks/results/density)")
    ap.add_argument("--render-only", action="store_true",
                    help="rewrite result.md and the plot from an existing result.json")
    ns = ap.parse_args()
    if ns.render_only:
        res = Results("density", ns.out)
        res.data = json.loads((res.dir / "result.json").read_text())
        for k, v in res.data["params"].items():
            if k not in ("render_only", "out"):
                setattr(ns, k, v)
        render(res, ns)
        return 0
    configs = [c for c in ns.configs.split(",") if c]
    res, accel = start_run("density", ns)
    t0 = time.monotonic()
    results = []
    for cfg in configs:
        results.append(run_config(cfg, ns, accel, t0))
        res.data["results"] = results
    render(res, ns)
    return 0


def render(res, ns):
    """Plot and Markdown table from res.data (also used by --render-only)."""
    results = res.data["results"]
    plot(res, results, ns)
    rows = []
    for r in results:
        dm = ""
        if r.get("daemon_rss_median") is not None:
            per = ("" if r["config"] not in ("shared", "policy")
                   else f" (one daemon, {len(r['per_guest'])} guests)")
            dm = (f"{mib(r['daemon_rss_median'], '{:.1f}')} / "
                  f"{mib(r['daemon_rss_own_median'], '{:.1f}')} / "
                  f"{mib(r['daemon_pss_own_median'], '{:.1f}')} / "
                  f"{mib(r['daemon_anon_median'], '{:.1f}')}{per}")
        fit = r["launched"] - 1 if r["oom"] else f">= {r['launched']} (cap, no OOM)"
        died = "; ".join(x.split(" (pid")[0].split(" (guest OOM")[0]
                         for x in r["failure"]) if r["oom"] else "-"
        rows.append([LABELS[r["config"]], f"**{fit}**", r["launched"], died,
                     mib(r["settled_guest_usage_median"]), dm or "-", f"{r['duration_s']:.0f}"])
    md = [f"### Density: guests that fit before the first OOM kill (parent cgroup {ns.limit_gib} GiB, "
          f"{ns.guest_mib} MiB guests touching {ns.alloc_mib} MiB)", ""]
    md += env_lines(res.data["environment"])
    md += ["", md_table(["configuration", "guests that fit", "launched (incl. the one that "
                         "triggered the OOM kill)", "killed", "settled guest cgroup MiB (median)",
                         "daemon RSS / RSS excl. guest RAM / PSS excl. guest RAM / anon MiB "
                         "(median over guests)", "run s"], rows), ""]
    md.append("Reference on this machine (issue 6): no reporting 3, built-in 9. \"Guests that "
              "fit\" = guests launched before the launch that led to the first OOM kill (a QEMU "
              "or daemon process SIGKILLed; the kernel's lines are in result.json). The settled "
              "figure is the guest's child cgroup (QEMU, and for \"ours\" its daemon) once its "
              "memory settled.")
    md.append("")
    md.append("![density](density.png)")
    res.write("\n".join(md))


if __name__ == "__main__":
    sys.exit(main())
