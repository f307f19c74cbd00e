#!/usr/bin/env python3
"""Daemon footprint: resident memory and idle CPU of the daemon serving one guest.

    python benchmarks/footprint.py [--idle 30] [--stats-interval 0]

One daemon (default options, --log-level info) serves one 1 GiB guest (TCG).
Phases: (1) 10 s after the guest booted: memory; (2) --idle s idle: CPU
(utime+stime from /proc/PID/stat) and wake-ups (context switches);
(3) the guest allocates and frees 800 MiB, the daemon discards what the
guest reports; 15 s later: memory again, and the CPU that cost; (4) --idle
s idle again.  Memory: RSS and PSS (smaps_rollup), and the same without the
guest-RAM mapping (the daemon maps guest RAM shared: pages of it that are
resident are the guest's, not the daemon's), anon, file, shmem; VmHWM.
QEMU's own RSS without guest RAM is shown for scale.
Writes benchmarks/results/footprint/.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (MIB, cpu_seconds, env_lines, f, md_table, mib, proc_memory,  # noqa: E402
                    start_run)

from balloon_device.host.harness import Guest  # noqa: E402
from balloon_device.host.harness.daemon import Daemon  # noqa: E402


def ctx_switches(pid):
    out = {}
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                k, v = line.split(":")
                out[k.strip()] = int(v)
    except OSError:
        pass
    return sum(out.values()) if out else None


def idle(pid, qpid, seconds):
    c0, q0, s0, t0 = cpu_seconds(pid), cpu_seconds(qpid), ctx_switches(pid), time.monotonic()
    time.sleep(seconds)
    dt = time.monotonic() - t0
    return {"seconds": round(dt, 2), "daemon_cpu_s": cpu_seconds(pid) - c0,
            "daemon_wakeups": ctx_switches(pid) - s0, "qemu_cpu_s": cpu_seconds(qpid) - q0}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--idle", type=float, default=30.0)
    ap.add_argument("--alloc-mib", type=int, default=800)
    ap.add_argument("--guest-mib", type=int, default=1024)
    ap.add_argument("--stats-interval", type=float, default=0.0,
                    help="daemon --stats-interval (0 = default, off)")
    ap.add_argument("--out", help="results folder (default benchmarks/results/footprint)")
    ns = ap.parse_args()
    res, accel = start_run("footprint", ns)
    args = ["--stats-interval", str(ns.stats_interval)] if ns.stats_interval else []
    phases = {}
    wait = int(10 + ns.idle + 5)
    with Daemon(tempfile.mkdtemp(prefix="vub-bench-"), args=args, log_level="info") as d:
        phases["daemon started, no guest"] = {"memory": proc_memory(d.serving_pid())}
        steps = [("wait", f"sleep {wait}"), ("alloc", f"alloc_touch {ns.alloc_mib}")]
        with Guest(name="footprint", mem_mib=ns.guest_mib, accel=accel, balloon="vhost-user",
                   vhost_socket=d.socket_path, steps=steps) as g:
            g.wait_marker("booted", timeout=120)
            g.wait_marker("balloon", timeout=30)
            g.wait_marker("step-start", timeout=60, name="wait")
            time.sleep(10)
            phases["guest booted, +10 s"] = {"memory": proc_memory(d.serving_pid()),
                                             "qemu": proc_memory(g.pid)}
            phases["guest booted, +10 s"]["idle"] = idle(d.pid, g.pid, ns.idle)
            print(f"idle after boot: {phases['guest booted, +10 s']['idle']}", flush=True)
            g.wait_marker("step-start", timeout=120, name="alloc")
            c0 = cpu_seconds(d.pid)
            before = d.status()["counters"]
            g.wait_step("alloc", timeout=300)
            time.sleep(15)
            st = d.status()
            discarded = st["counters"]["bytes_discarded"] - before["bytes_discarded"]
            ph = {"memory": proc_memory(d.serving_pid()), "qemu": proc_memory(g.pid),
                  "reclaim_cpu_s": cpu_seconds(d.pid) - c0, "bytes_discarded": discarded,
                  "report_chains": st["counters"]["report_chains"] - before["report_chains"]}
            ph["idle"] = idle(d.pid, g.pid, ns.idle)
            phases[f"after reporting {ns.alloc_mib} MiB, +15 s"] = ph
            print(f"after reclaim: {ph['idle']}; reclaim cpu {ph['reclaim_cpu_s']:.2f} s for "
                  f"{discarded / MIB:.0f} MiB", flush=True)
            res.data["daemon_status"] = st
    res.data["phases"] = phases

    rows = []
    keys = [("rss", "RSS"), ("pss", "PSS"), ("rss_own", "RSS excl. guest RAM"),
            ("pss_own", "PSS excl. guest RAM"), ("rss_anon", "anon"), ("rss_file", "file"),
            ("rss_shmem", "shmem (guest RAM + rings)"), ("vm_hwm", "VmHWM (peak RSS)")]
    for name, ph in phases.items():
        mm = ph["memory"]
        rows.append([name] + [mib(mm.get(k), "{:.1f}") for k, _ in keys]
                    + [mib(ph["qemu"].get("rss_own"), "{:.0f}") if "qemu" in ph else "-"])
    md = ["### Daemon footprint: one daemon serving one 1 GiB guest", ""]
    md += env_lines(res.data["environment"])
    md += ["", "Memory, MiB:", "",
           md_table(["phase"] + [k for _, k in keys] + ["QEMU RSS excl. guest RAM (scale)"], rows),
           ""]
    irows = []
    for name, ph in phases.items():
        if "idle" in ph:
            i = ph["idle"]
            irows.append([name, f"{i['seconds']:.0f}", f"{i['daemon_cpu_s']:.2f}",
                          f"{i['daemon_cpu_s'] / i['seconds'] * 100:.2f}%",
                          f"{i['daemon_wakeups']}", f"{i['qemu_cpu_s']:.1f}"])
    md += ["Idle CPU:", "", md_table(["after", "idle s", "daemon CPU s", "daemon CPU %",
                                      "daemon context switches", "QEMU CPU s (scale)"], irows), ""]
    ph = phases[f"after reporting {ns.alloc_mib} MiB, +15 s"]
    md.append(f"Reclaim of {ns.alloc_mib} MiB: the daemon discarded "
              f"{ph['bytes_discarded'] / MIB:.0f} MiB in {ph['report_chains']} chains and used "
              f"{ph['reclaim_cpu_s']:.2f} s CPU "
              f"({f(ph['reclaim_cpu_s'] / (ph['bytes_discarded'] / (1 << 30)) if ph['bytes_discarded'] else None, '{:.3f}')}"
              " s/GiB, 10 ms tick resolution).")
    md.append("")
    md.append("Target (issue 6): about 19 MiB resident per guest at most, no CPU when idle. "
              "\"RSS excl. guest RAM\" is the daemon's own memory (anon + code + other files); "
              "the raw RSS also counts the guest-RAM pages the daemon touched through its shared "
              "mapping (the rings), which are the guest's memory.")
    res.write("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
