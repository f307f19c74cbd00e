#!/usr/bin/env python3
"""Long fuzzing run of a malicious guest driver against the balloon device.

    python scripts/fuzz_guest.py --chains 1000000 [--seed N] [--minutes M]

Plays tests/fuzz/guest_gen.py: a hostile driver writes raw descriptors,
indirect tables, PFN arrays, avail entries and avail indices on the four
balloon queues (inflate, deflate, stats, reporting) of a guarded memfd
guest; after every handle_queue call the oracle checks that every discarded
page was designated by the guest, that no other byte changed, that no more
memory was released than discarded, that only VringError escaped and that
the call returned within the CPU bound.  A fresh guest every --steps steps
alternates the C and Python hot paths, one or two regions, with and without
EVENT_IDX.  "chains" counts the chains the device popped (well-formed and
malformed).  Prints chains fuzzed, steps, ring errors, corrupted bytes (must
be 0), the slowest call and the peak RSS; exit status 0 only if no oracle
violation happened.
"""

import argparse
import logging
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from fuzz.guest_gen import ROLES, HostileGuest, OracleViolation, hostile_actions  # noqa: E402
from fuzz.source import RandomSource  # noqa: E402
from vhostuser import implementation  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chains", type=int, default=100000)
    p.add_argument("--minutes", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--steps", type=int, default=200, help="steps per guest")
    p.add_argument("--qsize", type=int, default=64)
    ns = p.parse_args()
    logging.disable(logging.WARNING)  # the device logs every malformed chain
    seed = ns.seed if ns.seed is not None else int.from_bytes(os.urandom(4), "little")
    src = RandomSource(seed)
    print(f"seed {seed}", flush=True)
    totals = dict(chains=0, steps=0, guests=0, ring_errors=0, corrupted=0, violations=0)
    max_call = 0.0
    t0 = last = time.monotonic()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    while totals["chains"] < ns.chains:
        if ns.minutes is not None and time.monotonic() - t0 > ns.minutes * 60:
            print("time limit reached", flush=True)
            break
        k = totals["guests"]
        with implementation.selected(k % 2 == 0):   # C, then the Python twins
            g = HostileGuest(two_regions=k % 3 == 1, event_idx=k % 4 >= 2, qsize=ns.qsize)
        popped = [0]
        for vq in g.vq:
            real = vq.pop

            def counting(memory, real=real):
                c = real(memory)
                if c is not None:
                    popped[0] += 1
                return c
            vq.pop = counting
        try:
            for _ in range(ns.steps):
                q = src.int(0, len(ROLES) - 1)
                hostile_actions(src, g, q)
                g.step(q)
        except OracleViolation as e:
            totals["violations"] += 1
            print(f"VIOLATION (guest {k}, seed {seed}): {e}", flush=True)
        finally:
            totals["chains"] += popped[0]
            totals["steps"] += g.steps
            totals["ring_errors"] += g.ring_errors
            totals["corrupted"] += g.corrupted
            totals["guests"] += 1
            max_call = max(max_call, g.max_call)
            g.close()
        now = time.monotonic()
        if now - last > 30:
            last = now
            print(f"  {totals['chains']} chains, {totals['steps']} steps, "
                  f"{totals['chains'] / (now - t0):.0f} chains/s", flush=True)
    elapsed = time.monotonic() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"chains fuzzed:    {totals['chains']}")
    print(f"steps:            {totals['steps']} (handle_queue calls) on {totals['guests']} guests")
    print(f"ring errors:      {totals['ring_errors']} (queue stopped, then reset by the driver)")
    print(f"corrupted bytes:  {totals['corrupted']}")
    print(f"violations:       {totals['violations']}")
    print(f"slowest call:     {max_call * 1000:.1f} ms")
    print(f"peak RSS:         {rss // 1024} MiB (at start {rss0 // 1024} MiB)")
    print(f"elapsed:          {elapsed:.0f} s; seed {seed}")
    return 1 if totals["violations"] or totals["corrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
