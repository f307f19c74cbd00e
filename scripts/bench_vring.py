#!/usr/bin/env python3
"""Micro-benchmark of the split virtqueue: chains popped + completed per
second through VirtQueue, on the C hot path and on the Python twin.

The ring (size 256) is filled once with chains whose heads sit in the
matching avail slots; each round the "driver" only moves avail idx on by
256, so the figures measure the device side (pop, Segment/Chain objects,
push, need_signal once per round) and not the driver mock.

    python scripts/bench_vring.py [--seconds 1.0]
"""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from vhostuser import implementation  # noqa: E402
from vhostuser.testing.driver import MiB, DriverQueue, GuestMemory  # noqa: E402

SIZE = 256


def setup(mem, segs, use_c, event_idx):
    dq = DriverQueue(mem, SIZE, event_idx=event_idx)
    indirect = segs > 1
    heads = []
    for _ in range(SIZE):
        outs = [(mem.start + 0x100000, 4096)] * (segs // 2)
        ins = [(mem.start + 0x200000, 2 << 20)] * (segs - segs // 2)
        heads.append(dq.add(outs, ins, indirect=indirect, publish=False))
    # make avail slot k hold a head so that every round can replay the ring
    with implementation.selected(use_c):   # C or the Python twin
        vq = dq.make_vq()
    return dq, vq


def run(segs, use_c, seconds, event_idx=True):
    with GuestMemory(64 * MiB) as mem:
        dq, vq = setup(mem, segs, use_c, event_idx)
        table = mem.table
        idx = dq.start_idx
        n = 0
        t0 = time.perf_counter()
        while True:
            idx = (idx + SIZE) & 0xFFFF
            dq.publish(idx)
            pop, push = vq.pop, vq.push
            while True:
                c = pop(table)
                if c is None:
                    break
                assert len(c.segments) == segs
                push(c.head, 0)
                n += 1
            vq.need_signal()
            el = time.perf_counter() - t0
            if el >= seconds:
                return n / el


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=1.0)
    args = ap.parse_args()
    print(f"{'chain':>14} {'C chains/s':>12} {'Python chains/s':>16} {'ratio':>7}")
    for segs in (1, 32):
        c = run(segs, True, args.seconds)
        p = run(segs, False, args.seconds)
        label = f"{segs} seg" + ("s indirect" if segs > 1 else " direct")
        print(f"{label:>14} {c:12,.0f} {p:16,.0f} {c / p:6.1f}x")


if __name__ == "__main__":
    main()
