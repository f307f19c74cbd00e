"""Fairness between the guests of one daemon (issue 13, item 4).

Two guests on one multi-guest daemon, in this process: real Unix sockets, real
memfds, the daemon's own event loop stepped by the benchmark, each guest's side
played by the driver mock (vhostuser.testing). Guest "victim" reports 8 x 2 MiB
of filled memory and waits for the completion; guest "flood" keeps its
1024-entry reporting ring full of one-page reports and kicks after every refill,
as a guest that keeps its avail index ahead would.

Latency of one victim report = the time the daemon's loop spent (sum of its
run_once() calls) between the victim's kick and its used element; the
benchmark's own driver work (refilling, filling memory) is not counted.

Configurations, rotated every round:
  quiet      the flood guest is connected but idle (the reference)
  flood      the flood guest floods; the daemon as it is (64 chains per turn)
  unbudgeted the flood guest floods; QUEUE_BUDGET raised to 1<<20, i.e. the old
             behaviour where one kick pops every available chain

    python benchmarks/fairness.py [--rounds 3] [--samples 200]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

from common import Results, environment, f, md_table, pct, ratio, rotated

from balloon_device import features as F
from balloon_device.host.config import DaemonConfig
from balloon_device.host.multi import Daemon
from vhostuser import handler
from vhostuser import messages as m
from vhostuser.messages import Request as R
from vhostuser.testing.driver import DriverQueue, GuestMemory
from balloon_device.host.harness.frontend import guest_frontend

MIB = 1 << 20
CONFIGS = ["quiet", "flood", "unbudgeted"]


class Rig:
    def __init__(self, daemon, name, size, qsize):
        self.mem = GuestMemory(size)
        self.fe = guest_frontend(daemon, name)
        offered = self.fe.handshake()
        assert self.fe.ack(R.SET_FEATURES, m.U64.pack(offered)) == 0
        assert self.fe.set_mem_table(
            [(g, s, u, o, self.mem.fd) for g, s, u, o in self.mem.layout]) == 0
        features = offered & ~(1 << 30)
        for index, role in enumerate(F.queue_roles(features)):
            dq = DriverQueue(self.mem, qsize if role == "reporting" else 64,
                             event_idx=bool(features & (1 << 29)))
            kick, _ = self.fe.start_queue(index, dq.size, dq.desc_uva, dq.avail_uva,
                                          dq.used_uva)
            if role == "reporting":
                self.q, self.kick = dq, kick

    def close(self):
        self.fe.close()
        self.mem.close()


def run_config(cfg, samples):
    old_budget = handler.QUEUE_BUDGET
    if cfg == "unbudgeted":
        handler.QUEUE_BUDGET = 1 << 20
    tmp = tempfile.mkdtemp(prefix="vub-fair-")
    daemon = Daemon(DaemonConfig(guests=(("victim", f"{tmp}/victim.sock"),
                                         ("flood", f"{tmp}/flood.sock"))))
    victim = Rig(daemon, "victim", 64 * MIB, 64)
    flood = Rig(daemon, "flood", 16 * MIB, 1024)
    page = flood.mem.alloc(4096, align=4096)
    ranges = [victim.mem.alloc(2 * MIB, align=2 * MIB) for _ in range(8)]
    flooding = cfg != "quiet"
    lat, flood_chains = [], 0
    try:
        if flooding:
            while flood.q.num_free:
                flood.q.add([], [(page, 4096)])
            os.eventfd_write(flood.kick, 1)
        for _ in range(samples):
            for g in ranges:
                victim.mem.fill(g, 2 * MIB, 0x5A)
            victim.q.add([], [(g, 2 * MIB) for g in ranges])
            os.eventfd_write(victim.kick, 1)
            spent, turns = 0.0, 0
            while True:
                t0 = time.perf_counter()
                daemon.loop.run_once(timeout=0)
                spent += time.perf_counter() - t0
                turns += 1
                done = len(victim.q.pop_used())
                if flooding:  # refill what was completed, and kick, as a flooding guest
                    got = len(flood.q.pop_used())
                    flood_chains += got
                    for _ in range(got):
                        flood.q.add([], [(page, 4096)])
                    if got:
                        os.eventfd_write(flood.kick, 1)
                if done:
                    break
                if turns > 100000:
                    raise RuntimeError("the victim's report was never completed")
            lat.append(spent)
    finally:
        victim.close()
        flood.close()
        daemon.close()
        handler.QUEUE_BUDGET = old_budget
        os.rmdir(tmp)
    return lat, flood_chains


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--samples", type=int, default=200, help="victim reports per configuration "
                                                            "and round")
    p.add_argument("--out", help="results folder (default benchmarks/results/fairness)")
    ns = p.parse_args()
    res = Results("fairness", ns.out)
    res.data["environment"] = environment()
    res.data["params"] = vars(ns)
    lat = {c: [] for c in CONFIGS}
    chains = {c: 0 for c in CONFIGS}
    for rnd, cfg in rotated(CONFIGS, ns.rounds):
        xs, n = run_config(cfg, ns.samples)
        lat[cfg] += xs
        chains[cfg] += n
        print(f"round {rnd} {cfg}: p50 {pct(xs, 50) * 1e3:.2f} ms, p99 {pct(xs, 99) * 1e3:.2f} ms, "
              f"flood chains completed {n}", flush=True)
    ref50, ref99 = pct(lat["quiet"], 50), pct(lat["quiet"], 99)
    rows = []
    for c in CONFIGS:
        p50, p99 = pct(lat[c], 50), pct(lat[c], 99)
        rows.append([c, len(lat[c]), f(p50 * 1e3), f(p99 * 1e3), f(ratio(p50, ref50)),
                     f(ratio(p99, ref99)), chains[c]])
    res.data["latency_s"] = lat
    res.data["flood_chains"] = chains
    table = md_table(["config", "reports", "p50 ms", "p99 ms", "p50 / quiet", "p99 / quiet",
                      "flood chains completed"], rows)
    res.write("Victim guest's report completion latency (daemon loop time from kick to used "
              "element), 8 x 2 MiB per report\n\n" + table)


if __name__ == "__main__":
    main()
