#!/usr/bin/env python3
"""Punch-hole throughput and chain latency: raw syscall loop vs DiscardEngine.

    python scripts/bench_discard.py                 # 2 GiB memfd, ~15 s
    python scripts/bench_discard.py --size-gib 4
    python scripts/bench_discard.py --table         # mode-versus-backing table

What it measures, over a memfd of --size-gib GiB mapped MAP_SHARED through
vhostuser.memory.Region (as the daemon maps guest RAM):

  raw loop     vub_punch_loop(): one fallocate(PUNCH_HOLE) per piece, in C,
               over the whole memfd, pieces of 2 MiB and of 4 MiB.
  chains       32 x 2 MiB pieces (one Linux free-page-reporting chain):
               raw = vub_punch_loop(fd, off, 2 MiB, 32); engine =
               DiscardEngine.discard(32 segments) (one vub_discard_segs
               call: split, trim, discard); python = the ctypes twin.
               p50/p99 latency.

Pages are allocated before every pass with fallocate() (not mapped in
this process), like guest RAM that QEMU touched and this daemon never did.
"--touched" faults them into the daemon's mapping instead (memset), which
adds the page-table teardown to every punch.
"""

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from balloon_device.discard import DiscardEngine  # noqa: E402
from balloon_device.discard.engine import c_module  # noqa: E402
from balloon_device.testing import allocated_bytes  # noqa: E402
from vhostuser import implementation  # noqa: E402
from vhostuser.vring import SEG  # noqa: E402
from vhostuser.memory import MemoryTable, Region  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
PIECE = 2 * MiB
CHAIN = 32


def fill(fd, region, size, touched):
    if touched:
        ctypes.memset(region.hva, 0x5a, size)
    else:
        os.posix_fallocate(fd, 0, size)
    assert allocated_bytes(fd) == size


def raw_loop(fd, size, piece):
    ffi, lib = c_module().ffi, c_module().lib
    done = ffi.new("uint64_t *")
    t = time.perf_counter_ns()
    rc = lib.vub_punch_loop(fd, 0, piece, size // piece, done)
    dt = time.perf_counter_ns() - t
    assert rc == 0 and done[0] == size // piece, (rc, done[0])
    return dt


def chains_raw(fd, size):
    ffi, lib = c_module().ffi, c_module().lib
    done = ffi.new("uint64_t *")
    out = []
    for off in range(0, size, CHAIN * PIECE):
        t = time.perf_counter_ns()
        rc = lib.vub_punch_loop(fd, off, PIECE, CHAIN, done)
        out.append(time.perf_counter_ns() - t)
        assert rc == 0
    return out


def chains_engine(table, size, engine):
    out = []
    for off in range(0, size, CHAIN * PIECE):
        # one device-writable 2 MiB buffer per segment, as a reporting chain
        raw = b"".join(SEG.pack(off + i * PIECE, PIECE, 1) for i in range(CHAIN))
        t = time.perf_counter_ns()
        res = engine.discard(table, raw)
        out.append(time.perf_counter_ns() - t)
        assert res.discarded == CHAIN * PIECE and not res.errors, res
    return out


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def gibs(nbytes, ns):
    return nbytes / GiB / (ns / 1e9)


def per_page(nbytes, ns):
    return ns / (nbytes / 4096)


def run(size, passes, touched):
    fd = os.memfd_create("vub-bench")
    os.ftruncate(fd, size)
    table = MemoryTable()
    table.add(Region(0, size, 0x7000_0000_0000, 0, os.dup(fd)))
    region = table.regions[0]
    with implementation.selected(True):
        engine_c = DiscardEngine("auto")
    with implementation.selected(False):
        engine_py = DiscardEngine("auto")
    engine_c.check(table)
    what = "touched (mapped)" if touched else "allocated, unmapped"
    print(f"memfd {size // GiB} GiB, pages {what}, kernel {os.uname().release}")
    try:
        print("\nraw C loop (vub_punch_loop), whole memfd:")
        for piece in (2 * MiB, 4 * MiB):
            best = None
            for _ in range(passes):
                fill(fd, region, size, touched)
                dt = raw_loop(fd, size, piece)
                best = dt if best is None else min(best, dt)
            print(f"  {piece // MiB} MiB pieces: {gibs(size, best):6.2f} GiB/s  "
                  f"{per_page(size, best):6.1f} ns/4KiB page  "
                  f"({best / (size // piece) / 1000:.1f} us/piece, best of {passes})")

        lat = {"raw": [], "engine": [], "python": []}
        for _ in range(passes):
            fill(fd, region, size, touched)
            lat["raw"] += chains_raw(fd, size)
            fill(fd, region, size, touched)
            lat["engine"] += chains_engine(table, size, engine_c)
        fill(fd, region, size, touched)
        lat["python"] += chains_engine(table, size, engine_py)

        nbytes = CHAIN * PIECE
        print(f"\n{CHAIN} x 2 MiB chain ({nbytes // MiB} MiB) latency:")
        for name, label in (("raw", "raw C loop      "),
                            ("engine", "DiscardEngine(C)"),
                            ("python", "DiscardEngine(py)")):
            xs = lat[name]
            p50, p99 = pct(xs, 50), pct(xs, 99)
            print(f"  {label}: p50 {p50 / 1000:8.1f} us  p99 {p99 / 1000:8.1f} us  "
                  f"{gibs(nbytes, p50):6.2f} GiB/s  {per_page(nbytes, p50):6.1f} ns/page  "
                  f"(n={len(xs)})")
        r50 = pct(lat["engine"], 50) / pct(lat["raw"], 50)
        r99 = pct(lat["engine"], 99) / pct(lat["raw"], 99)
        overhead = statistics.median(lat["engine"]) - statistics.median(lat["raw"])
        print(f"  ratio engine/raw: p50 {r50:.3f}  p99 {r99:.3f}  "
              f"(engine overhead ~{overhead / 1000:.1f} us per chain)")
        rp = pct(lat["python"], 50) / pct(lat["raw"], 50)
        print(f"  ratio python-twin/raw: p50 {rp:.3f}")

        # The memfd is all holes now: punching again costs the syscall entry
        # only, so these numbers are the per-chain software overhead.
        reps = 300
        over = {"raw": [], "engine": [], "python": []}
        small = min(size, reps * CHAIN * PIECE)
        for _ in range(max(1, reps * CHAIN * PIECE // small)):
            over["raw"] += chains_raw(fd, small)
            over["engine"] += chains_engine(table, small, engine_c)
            over["python"] += chains_engine(table, small, engine_py)
        print(f"\nsame {CHAIN}-piece chains over holes (pure overhead, n={len(over['raw'])}):")
        for name, label in (("raw", "raw C loop      "),
                            ("engine", "DiscardEngine(C)"),
                            ("python", "DiscardEngine(py)")):
            xs = over[name]
            print(f"  {label}: p50 {pct(xs, 50) / 1000:7.1f} us  "
                  f"p99 {pct(xs, 99) / 1000:7.1f} us")
    finally:
        table.clear()
        os.close(fd)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=int, default=2, choices=(1, 2, 3, 4))
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--touched", action="store_true",
                    help="fault pages into this process's mapping before punching")
    ap.add_argument("--table", action="store_true",
                    help="measure and print the mode-versus-backing table")
    args = ap.parse_args()
    if args.table:
        return subprocess.call(
            [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
             os.path.join(ROOT, "tests", "test_discard_table.py")], cwd=ROOT)
    try:
        c_module()
    except ImportError as e:
        sys.exit(str(e))
    run(args.size_gib * GiB, args.passes, args.touched)
    return 0


if __name__ == "__main__":
    sys.exit(main())
