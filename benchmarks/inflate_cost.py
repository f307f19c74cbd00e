#!/usr/bin/env python3
"""What a balloon inflate costs the guest, with and without init_on_alloc.

    python benchmarks/inflate_cost.py [--mib 800] [--rounds 2]

One 1 GiB guest (TCG, QEMU's built-in balloon without reporting: the guest's side
is the same for every balloon) per setting of the guest kernel's init_on_alloc:
the kernel's default (Debian: on) and init_on_alloc=0. In each: inflate the
balloon by MIB and deflate it (QMP balloon), then run `alloc_touch MIB`. The QEMU
process's CPU time (the guest's vCPU and QEMU's own work) and the wall time of each
step are recorded; the reference is the allocation of the same size in the same
guest, so the script prints inflate / allocation ratios. Why it matters: fast
reclaim (issue 15) inflates what a guest freed, and with init_on_alloc the guest
clears every page it hands to the balloon (docs/benchmarks.md, boot storm).
Writes benchmarks/results/inflate_cost/ (result.json, result.md).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_seconds, env_lines, md_table, median, start_run  # noqa: E402

from balloon_device.host.harness import Guest  # noqa: E402

SETTINGS = {"default": "", "init_on_alloc=0": "init_on_alloc=0"}
GUEST_MIB = 1024


def wait_actual(g, cond, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not cond(g.qmp("query-balloon")["actual"] >> 20):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the balloon did not get there:\n{g.diagnostics()}")
        time.sleep(0.02)


def measure(append, mib, accel):
    steps = [("idle", "sleep 20"), ("alloc", f"alloc_touch {mib}"), ("rest", "sleep 600")]
    out = {}
    with Guest(name="inflate-cost", mem_mib=GUEST_MIB, balloon="builtin-noreport",
               accel=accel, steps=steps, append=append) as g:
        g.wait_marker("step-start", timeout=180, name="idle")
        time.sleep(2)                          # the boot's tail settles
        for step, value, cond in (
                ("inflate", GUEST_MIB - mib, lambda a: a <= GUEST_MIB - mib + 4),
                ("deflate", GUEST_MIB, lambda a: a >= GUEST_MIB - 4)):
            c0, t0 = cpu_seconds(g.pid), time.monotonic()
            g.qmp("balloon", {"value": value << 20})
            wait_actual(g, cond)
            out[step] = {"wall_s": round(time.monotonic() - t0, 3),
                         "cpu_s": round(cpu_seconds(g.pid) - c0, 3)}
        if g.find_marker("step-start", name="alloc"):
            raise RuntimeError("the allocation began before the balloon was back: raise the "
                               "idle step")
        g.wait_marker("step-start", timeout=60, name="alloc")
        c0 = cpu_seconds(g.pid)
        done = g.wait_marker("alloc-done", timeout=180)
        out["alloc"] = {"wall_s": round(float(done.values["elapsed_ms"]) / 1000, 3),
                        "cpu_s": round(cpu_seconds(g.pid) - c0, 3)}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=800)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", help="results folder (default benchmarks/results/inflate_cost)")
    ns = ap.parse_args()
    res, accel = start_run("inflate_cost", ns)
    runs = []
    for rnd in range(ns.rounds):
        for name, append in SETTINGS.items():
            r = measure(append, ns.mib, accel)
            r.update(setting=name, round=rnd)
            runs.append(r)
            print(f"round {rnd} {name}: " + ", ".join(
                f"{k} {r[k]['wall_s']:.2f} s wall / {r[k]['cpu_s']:.2f} s CPU"
                for k in ("inflate", "deflate", "alloc")), flush=True)
            res.data["runs"] = runs
            res.write("(partial)")
    rows, lines = [], []
    for name in SETTINGS:
        mine = [r for r in runs if r["setting"] == name]
        med = {k: median([r[k]["cpu_s"] for r in mine]) for k in ("inflate", "deflate", "alloc")}
        rows.append([name, *(f"{med[k]:.2f}" for k in ("inflate", "deflate", "alloc")),
                     f"**{med['inflate'] / med['alloc']:.2f}**"])
        lines.append(f"- {name}: inflating {ns.mib} MiB costs "
                     f"**{med['inflate'] / med['alloc']:.2f}x** the CPU of allocating "
                     f"{ns.mib} MiB in the same guest")
    md = [f"### Inflate cost: {ns.mib} MiB in a {GUEST_MIB} MiB guest, QEMU process CPU "
          f"(medians of {ns.rounds} rounds)", ""]
    md += env_lines(res.data["environment"])
    md += ["", md_table(["guest init_on_alloc", "inflate CPU s", "deflate CPU s",
                         f"alloc_touch {ns.mib} CPU s", "inflate / alloc"], rows), ""]
    md += lines
    res.write("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
