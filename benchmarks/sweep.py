#!/usr/bin/env python3
"""What a policy sweep gives back: one 1 GiB guest, before and after its sweep.

    python benchmarks/sweep.py [--rounds 2] [--configs ticking,silent]

The daemon runs the policy with floor 0 and a huge hysteresis (the host counts as
short, so sweeps are on, and nothing else is inflated) and --policy-sweep-quiet 25.
The guest touches 800 MiB and exits (`alloc_touch 800`); 18 s later (reporting done,
no sweep yet) the guest-RAM memfd's allocated size is "reporting only"; the daemon
then sweeps it (balloon +128 MiB and back); 12 s after the sweep it is "after the
sweep". The guest's free memory (its balloon stats) is read at both points: the
pages a sweep flushes were on the guest's per-CPU lists, which Linux does not count
as free.

  ticking  the idle guest runs a small process every 2 s (its meminfo marker)
  silent   the idle guest runs nothing at all

Writes benchmarks/results/sweep/.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import env_lines, md_table, median, mib, rotated, start_run  # noqa: E402

from balloon_device.host.harness import Guest  # noqa: E402
from balloon_device.host.harness.daemon import Daemon  # noqa: E402

CONFIGS = ("ticking", "silent")
ARGS = ["--stats-interval", "1", "--policy", "--policy-floor", "0", "--policy-hysteresis",
        "1TiB", "--policy-interval", "1", "--policy-psi", "0", "--policy-sweep", "128MiB",
        "--policy-sweep-quiet", "25"]


def point(g, d):
    st = d.status()
    return {"memfd": g.sample_memory()["memfd_allocated"],
            "guest_free": (st.get("stats") or {}).get("free_memory")}


def run_one(cfg, rnd, ns, accel):
    with Daemon(args=ARGS, log_level="info") as d, \
            Guest(name=f"sweep-{cfg}-{rnd}", mem_mib=1024, balloon="vhost-user",
                  vhost_socket=d.socket_path, num_vqs=4, accel=accel,
                  steps=[("settle", "sleep 4"), ("alloc", f"alloc_touch {ns.alloc_mib}")],
                  stats=2 if cfg == "ticking" else 0) as g:
        g.wait_step("alloc", timeout=300)
        time.sleep(18)
        before = point(g, d)
        deadline = time.monotonic() + 60
        while "swept guest" not in d.log_text(400):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no sweep within 60 s:\n{d.log_text(40)}")
            time.sleep(0.5)
        time.sleep(12)
        return {"config": cfg, "round": rnd, "before": before, "after": point(g, d)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--alloc-mib", type=int, default=800)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--out", help="results folder (default benchmarks/results/sweep)")
    ns = ap.parse_args()
    configs = [c for c in ns.configs.split(",") if c]
    res, accel = start_run("sweep", ns)
    runs = []
    for rnd, cfg in rotated(configs, ns.rounds):
        r = run_one(cfg, rnd, ns, accel)
        runs.append(r)
        print(f"round {rnd} {cfg:8s} guest RAM backed {mib(r['before']['memfd'])} -> "
              f"{mib(r['after']['memfd'])} MiB; guest free {mib(r['before']['guest_free'])} -> "
              f"{mib(r['after']['guest_free'])} MiB", flush=True)
    res.data["runs"] = runs
    rows = []
    for cfg in configs:
        rs = [r for r in runs if r["config"] == cfg]
        rows.append([cfg, len(rs)] + [
            mib(median([r[when][k] for r in rs]))
            for when in ("before", "after") for k in ("memfd", "guest_free")])
    md = [f"### Sweep: one 1 GiB guest after `alloc_touch {ns.alloc_mib}` (medians)", ""]
    md += env_lines(res.data["environment"])
    md += ["", md_table(["guest", "runs", "guest RAM backed, reporting only MiB",
                         "guest free MiB", "guest RAM backed after the sweep MiB",
                         "guest free MiB"], rows), "",
           "A silent guest never frees the small high-order page that makes Linux flush its "
           "per-CPU lists after a sweep (docs/operations.md)."]
    res.write("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
