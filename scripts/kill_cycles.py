#!/usr/bin/env python3
"""SIGKILL the serving process N times under a real QEMU 11.1 guest and record the results.

    python scripts/kill_cycles.py [--cycles 100] [--seed S] [--out FILE.json] [--upgrade]

One 1 GiB TCG guest runs the integrity workload (256 MiB allocated, verified and freed
per round); the daemon runs under its built-in supervisor with --stats-interval 1.
Per cycle: wait 0.5-6 s (random), SIGKILL the serving process (every third cycle the
balloon target moves first, so inflate/deflate and CONFIG_CHANGE_MSG are under way),
then check (balloon_device/host/harness/restart.py): the successor restores the
session, the guest's next report is completed and discards memory, QEMU's log has no
vhost-user line, the guest's console no virtio error, integrity 0 bad bytes. Prints the
time without service (kill -> successor serving) and until the next report, p50 and max.
--upgrade: `ctl upgrade` instead of SIGKILL (the same checks).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from balloon_device.host.harness import Guest  # noqa: E402
from balloon_device.host.harness.daemon import Daemon  # noqa: E402
from balloon_device.host.harness.restart import check_quiet, kill_cycles, summary  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cycles", type=int, default=100)
    p.add_argument("--seed", type=int, default=int(time.time()))
    p.add_argument("--out", help="write every cycle's figures here (JSON)")
    p.add_argument("--upgrade", action="store_true", help="ctl upgrade instead of SIGKILL")
    ns = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vub-kill-"))
    d = Daemon(work, args=["--stats-interval", "1"], log_level="info").start()
    g = Guest(name="vub-kill", mem_mib=1024, balloon="vhost-user", vhost_socket=d.socket_path,
              num_vqs=4, vq_size=64, accel="tcg", cpu="max",
              steps=[("integrity", "integrity 256 1000000 2500")])
    t0 = time.monotonic()
    ok = False
    try:
        g.start()
        g.wait_marker("step-start", timeout=120, name="integrity")
        while d.status()["counters"]["report_chains"] == 0:
            time.sleep(0.1)
        print(f"seed {ns.seed}; daemon log {d.log_path}", flush=True)
        results = kill_cycles(d, g, ns.cycles, random.Random(ns.seed),
                              log=lambda s: print(s, flush=True),
                              how="upgrade" if ns.upgrade else "kill")
        rounds = check_quiet(g)
        st = d.status()
        s = summary(results)
        s.update(seed=ns.seed, how="upgrade" if ns.upgrade else "kill", integrity_rounds=rounds, restarts=st["process"]["restarts"],
                 qemu_alive=g.alive(), minutes=(time.monotonic() - t0) / 60,
                 report_chains=st["counters"]["report_chains"],
                 bytes_discarded_mib=st["counters"]["bytes_discarded"] >> 20)
        print(json.dumps(s, indent=2))
        if ns.out:
            Path(ns.out).write_text(json.dumps({"summary": s, "cycles": results}, indent=1))
        ok = True
    finally:
        g.close(failed=not ok)
        if not ok:
            print(d.log_text(100))
        d.stop()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
