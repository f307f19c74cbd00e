#!/usr/bin/env python3
"""Conformance matrix: ours vs QEMU's built-in balloon, cell by cell.

    bash scripts/conformance.sh                       # the full matrix
    bash scripts/conformance.sh --cells kernel-6.12,pc,hugetlb-memfd
    bash scripts/conformance.sh --list

Each cell runs the reclaim scenario (1 GiB guest allocates 800 MiB, frees it;
how much comes back on the host and how fast: t50 / t90) and the integrity
scenario (churn under reporting plus inflate/deflate; corrupted bytes) on our
daemon and on virtio-balloon-pci in the same run, one guest at a time.  Prints
the matrix, writes the raw figures to benchmarks/results/conformance/ and the
table to docs/conformance.md (--doc PATH, --no-doc).  Exit status 1 when a cell
fails (see balloon_device.host.harness.conformance.verdict).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from balloon_device.host.harness import cache_dir, find_guest, find_qemu  # noqa: E402
from balloon_device.host.harness import conformance as C  # noqa: E402

MIB = 1 << 20
RESULTS = ROOT / "benchmarks" / "results" / "conformance"
DOC = ROOT / "docs" / "conformance.md"

# Measured limits outside the project, shown under the table when their cell
# shows them.  Keyed by cell name.
NOTES: dict = {}


def versions(cells):
    """QEMU and guest kernel versions the cells use (provisions them)."""
    out = {"qemu": {}, "kernel": {}}
    for name in cells:
        cfg = C.parse_cell(name)
        if cfg.qemu not in out["qemu"]:
            q = find_qemu(suite=cfg.qemu)
            v = subprocess.run([q, "--version"], capture_output=True, text=True).stdout
            out["qemu"][cfg.qemu] = v.splitlines()[0].replace("QEMU emulator version ", "")
        if cfg.kernel not in out["kernel"]:
            find_guest(kernel=cfg.kernel)
            d = cache_dir() / ("guest" if cfg.kernel == "bookworm" else f"guest-{cfg.kernel}")
            out["kernel"][cfg.kernel] = (d / "kernel-version").read_text().strip()
    return out


def git_commit():
    try:
        c = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "balloon_device",
                                "vhostuser", "c_ext", "scripts"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        return c + (" (+ uncommitted changes)" if dirty else "")
    except OSError:
        return "?"


def mib(x):
    return "n/a" if x is None else f"{x / MIB:.0f}"


def sec(x):
    return "never" if x is None else f"{x:.1f}"


def pair(res, sc, key, fmt):
    o, b = res[sc].get("ours"), res[sc].get("builtin")
    return f"{fmt(o[key]) if o else '-'} / {fmt(b[key]) if b else '-'}"


def returned(r):
    if not r:
        return "-"
    frac = r["returned_frac"]
    return f"{mib(r['returned'])} ({'n/a' if frac is None else f'{frac:.0%}'})"


def discards(r):
    c = (r or {}).get("counters") or {}
    if not c:
        return "-"
    return f"{c['bytes_discarded'] // MIB} / {c['bytes_inflate_discarded'] // MIB}"


def row(res):
    ro, rb = res["reclaim"].get("ours"), res["reclaim"].get("builtin")
    io, ib = res["integrity"].get("ours"), res["integrity"].get("builtin")
    ratio = C.t90_ratio(res)
    integ = (f"{io['bad_bytes'] if io else '-'} / {ib['bad_bytes'] if ib else '-'} "
             f"({io['cycles'] if io else '-'}/{ib['cycles'] if ib else '-'} cycles)")
    feats = f"{ro['features'] if ro else '-'} / {rb['features'] if rb else '-'}"
    verdict = "**pass**" if res["verdict"] == "pass" else "**FAIL**: " + "; ".join(res["reasons"])
    return [f"`{res['cell']}`", res["config"], feats,
            f"{mib(ro['freed']) if ro else '-'} / {mib(rb['freed']) if rb else '-'}",
            f"{returned(ro)} / {returned(rb)}",
            pair(res, "reclaim", "t50", sec), pair(res, "reclaim", "t90", sec),
            "n/a" if ratio is None else f"{ratio:.2f}",
            integ, f"{discards(ro)}; {discards(io)}", verdict]


HEADERS = ["cell", "configuration", "features ours / built-in", "freed MiB ours / built-in",
           "returned MiB ours / built-in", "t50 s ours / built-in", "t90 s ours / built-in",
           "t90 ratio", "corrupted bytes ours / built-in (balloon cycles)",
           "our discards MiB report / inflate (reclaim; integrity)", "verdict"]


def table(results):
    out = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join(" --- " for _ in HEADERS) + "|"]
    out += ["| " + " | ".join(str(c) for c in row(r)) + " |" for r in results]
    return "\n".join(out)


def text_table(results):
    """Compact table for the terminal."""
    hdr = (f"{'cell':22s} {'freed o/b':>11s} {'returned o/b %':>15s} {'t50 o/b':>11s} "
           f"{'t90 o/b':>11s} {'ratio':>6s} {'bad o/b':>8s}  verdict")
    lines = [hdr, "-" * len(hdr)]
    for r in results:
        ro, rb = r["reclaim"].get("ours"), r["reclaim"].get("builtin")
        io, ib = r["integrity"].get("ours"), r["integrity"].get("builtin")

        def pc(x):
            return "-" if not x or x["returned_frac"] is None else f"{x['returned_frac']:.0%}"
        ratio = C.t90_ratio(r)
        lines.append(
            f"{r['cell']:22s} {mib(ro['freed']) if ro else '-':>5s}/{mib(rb['freed']) if rb else '-':<5s} "
            f"{pc(ro):>7s}/{pc(rb):<7s} {pair(r, 'reclaim', 't50', sec):>11s} "
            f"{pair(r, 'reclaim', 't90', sec):>11s} {'n/a' if ratio is None else f'{ratio:.2f}':>6s} "
            f"{io['bad_bytes'] if io else '-'}/{ib['bad_bytes'] if ib else '-':<5}  "
            f"{r['verdict']} {'; '.join(r['reasons'])}")
    return "\n".join(lines)


QEMU_BALLOON = "https://gitlab.com/qemu-project/qemu/-/blob/master/hw/virtio/virtio-balloon.c"
LINUX_BALLOON = "https://github.com/torvalds/linux/blob/master/drivers/virtio/virtio_balloon.c"
LINUX_POISON = "https://github.com/torvalds/linux/blob/master/mm/page_poison.c"

CELLS_TEXT = [
    "## The cells",
    "",
    "- `base`: QEMU 11.1 (trixie-backports), Debian bookworm 6.1 cloud kernel, q35, "
    "`memory-backend-memfd`, 1 vCPU: what the end-to-end tests run.",
    "- `kernel-6.12`, `kernel-7.3`: Debian trixie's and trixie-backports' cloud kernels "
    "(`scripts/build_guest.sh --kernel trixie|trixie-backports`; 7.x comes as "
    "`linux-binary-*` + `linux-modules-*`, virtio core built in).",
    "- `pc`: the i440fx machine instead of q35.",
    "- `hugetlb-memfd`: `memory-backend-memfd,hugetlb=on,hugetlbsize=2M`; `hugetlbfs-file`: "
    "`memory-backend-file` in a private hugetlbfs mount (mounted for the cell, unmounted "
    "after). Both reserve 528 huge pages through `/proc/sys/vm/nr_hugepages` for the cell "
    "and give them back. Huge pages are not charged to memory cgroups: the figures are the "
    "files' allocated sizes. The built-in frees huge pages too (its reports are 2 MiB "
    "aligned, QEMU discards them with `fallocate`).",
    "- `two-regions`: 512 MiB boot RAM plus a cold-plugged 512 MiB `pc-dimm` (its own memfd), "
    "onlined by the guest (`memhp_default_state=online`); our daemon gets two regions "
    "(GPA 0 and 4 GiB, two fds) through `ADD_MEM_REG`.",
    "- `smp4`: 4 vCPUs (MTTCG on the 2 host cores).",
    "- `page-poison`: `page_poison=1` on Debian's **generic** 6.1 kernel (6.1.0-57-amd64, "
    "the same version as the base): the cloud kernels (6.1, 6.12, 7.x) are built without "
    f"`CONFIG_PAGE_POISONING`, so `page_poison=1` does nothing there ([mm/page_poison.c]"
    f"({LINUX_POISON}) is only built with it) and the guest keeps PAGE_POISON off "
    f"([virtballoon_validate]({LINUX_BALLOON})). The guest writes the poison pattern to "
    "every free page from boot, so all of its RAM is backed before the allocation: nothing "
    "can come back on the host (freed n/a) and nothing may be discarded: ours skips every "
    "report and inflation (`skipped_poison`), as the built-in does "
    f"([virtio_balloon_handle_report]({QEMU_BALLOON}) skips when `poison_val` is set).",
    "- `init-on-free`: `init_on_free=1` (the guest zeroes freed pages, PAGE_POISON with "
    "poison value 0: discards allowed). The boot zeroes all free memory, so this cell idles "
    "20 s before allocating for a settled baseline.",
    "- `order0`: `page_reporting.page_reporting_order=0`: 4 KiB reports (32 per chain).",
    "- `qemu-sid`: sid's QEMU (`scripts/provision_qemu.sh --qemu sid`, a private sid tree). "
    "In 2026-12 sid and trixie-backports carry the same upstream QEMU, 11.1.3; only the "
    "Debian revision differs.",
    "",
]


def write_doc(path, results, env, command):
    lines = [
        "# Conformance matrix",
        "",
        "Our daemon (vhost-user-test-device-pci) against QEMU's built-in "
        "virtio-balloon-pci (free-page-reporting=on), in the same run, one guest at a time, "
        "for each cell: the base configuration (QEMU 11.1 trixie-backports, Debian 6.1 "
        "cloud kernel, q35, memfd guest RAM, 1 vCPU) with one dimension changed. Generated by "
        "`scripts/conformance.sh`; do not edit by hand.",
        "",
        f"- date: {env['date']}; host kernel {env['host_kernel']}, {env['cpus']} CPUs, "
        f"accelerator TCG; code: commit {env['commit']}",
        "- QEMU: " + "; ".join(f"{k}: {v}" for k, v in env["versions"]["qemu"].items()),
        "- guest kernels: " + "; ".join(f"{k}: {v}" for k, v in env["versions"]["kernel"].items()),
        f"- command: `{command}` ({env['seconds'] / 60:.0f} min)",
        "",
        f"Reclaim ({env['reclaim_rounds']} run(s) per balloon, the order reversed each round; "
        "medians): a 1 GiB guest allocates and touches 800 MiB and frees it; the host samples "
        "the allocated size of the guest-RAM files (memfd / hugetlbfs, `st_blocks`) every "
        "100 ms. freed = level at the free - level before the allocation; returned = level at "
        "the free - level at the end; t50 / t90 = seconds from the guest's free until 50% / "
        "90% of the freed memory is back (\"never\": not within the watch window). Integrity: "
        "the guest checker churns 256 MiB per round for 6 rounds (fill, verify, free, so it is "
        "reported) while the host inflates and deflates a 256 MiB balloon; corrupted bytes "
        "and completed balloon cycles. Features: the virtio features the guest driver "
        "negotiated (bit 4 PAGE_POISON, bit 5 REPORTING).",
        "",
        f"A cell passes when ours returns >= {C.MIN_RETURNED:.0%} of the freed memory, reaches "
        f"90% within {C.MAX_T90_RATIO:.2f}x of the built-in's t90 (where the built-in gets "
        "there), and has 0 corrupted bytes and no kernel complaint; on a guest that poisons "
        "free pages (`page_poison=1`) it must discard nothing and corrupt nothing.",
        "",
        table(results),
        "",
    ] + CELLS_TEXT
    notes = [(r["cell"], NOTES[r["cell"]]) for r in results if r["cell"] in NOTES]
    if notes:
        lines += ["## Notes", ""]
        lines += [f"- `{c}`: {n}" for c, n in notes]
        lines.append("")
    Path(path).write_text("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", default=",".join(C.MATRIX),
                    help="comma-separated cells; a cell is 'base' or values joined by '+'")
    ap.add_argument("--list", action="store_true", help="list cells and values, then exit")
    ap.add_argument("--rounds", type=int, default=6, help="integrity rounds of 256 MiB")
    ap.add_argument("--reclaim-rounds", type=int, default=2,
                    help="reclaim runs per balloon (order reversed each round; medians)")
    ap.add_argument("--scenarios", default="reclaim,integrity",
                    help="for quick looks: reclaim and/or integrity (a cell needs both to pass)")
    ap.add_argument("--doc", default=str(DOC), help="Markdown file for the table")
    ap.add_argument("--no-doc", action="store_true", help="do not write the Markdown file")
    ap.add_argument("--out", default=str(RESULTS), help="folder for result.json")
    ap.add_argument("--render", metavar="RESULT_JSON",
                    help="rewrite the Markdown table from a result.json of an earlier run "
                         "(its measured figures and command, the notes of this script)")
    ns = ap.parse_args()
    if ns.render:
        data = json.loads(Path(ns.render).read_text())
        write_doc(ns.doc, data["cells"], data["environment"], data["command"])
        print(text_table(data["cells"]))
        print(f"\nconformance: table written to {ns.doc}")
        return 0
    if ns.list:
        print("matrix:", " ".join(C.MATRIX))
        for v, ch in C.VALUES.items():
            print(f"  {v:16s} {ch}")
        return 0
    cells = [c for c in ns.cells.split(",") if c]
    try:
        for c in cells:
            C.parse_cell(c)
    except C.CellError as e:
        ap.error(str(e))
    if os.geteuid() != 0:
        sys.exit("conformance: run as root (memory cgroups, huge pages, hugetlbfs mounts)")
    command = "bash scripts/conformance.sh" + "".join(
        " " + shlex.quote(a) for a in sys.argv[1:])
    t0 = time.monotonic()
    env = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "host_kernel": platform.release(), "cpus": os.cpu_count(), "commit": git_commit(),
           "reclaim_rounds": ns.reclaim_rounds}
    print(f"conformance: {len(cells)} cells: {', '.join(cells)}", flush=True)
    env["versions"] = versions(cells)
    print(f"conformance: versions {env['versions']}", flush=True)
    results = []
    for i, name in enumerate(cells, 1):
        print(f"[{i}/{len(cells)}] {name}: {C.parse_cell(name).describe()}", flush=True)
        try:
            r = C.run_cell(name, rounds=ns.rounds, log=lambda m: print(m, flush=True),
                           scenarios=tuple(x for x in ns.scenarios.split(",") if x),
                           reclaim_rounds=ns.reclaim_rounds)
        except Exception as e:  # noqa: BLE001 - a broken cell is a failed cell, keep going
            r = {"cell": name, "config": C.parse_cell(name).describe(), "reclaim": {},
                 "integrity": {}, "verdict": "FAIL",
                 "reasons": [f"error: {str(e).splitlines()[0][:300]}"], "error": str(e)[-3000:]}
            print(f"  ERROR {e}", flush=True)
        print(f"  -> {r['verdict']} {'; '.join(r['reasons'])}", flush=True)
        results.append(r)
    env["seconds"] = time.monotonic() - t0
    print()
    print(text_table(results))
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps({"environment": env, "command": command,
                                                 "cells": results}, indent=1, default=str))
    if not ns.no_doc:
        write_doc(ns.doc, results, env, command)
        print(f"\nconformance: table written to {ns.doc}")
    return 0 if all(r["verdict"] == "pass" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
