#!/usr/bin/env python3
"""Memory of a multi-guest daemon, per process: one process per guest (supervised, the
default) against one process for every guest (--no-supervise), in the same run.

    python benchmarks/unit_memory.py [--guests 3]

Starts the daemon with N guests, connects a socket frontend to each (vhostuser.testing:
a memfd of 64 MiB, the rings, one reported chain), then reads /proc/PID/smaps_rollup
of every process of the daemon. PSS own = PSS without the guest-RAM mappings.
Prints each process and the sums, and the ratio of the sums. No QEMU needed.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, mib, process_tree, proc_memory  # noqa: E402

from balloon_device import features as F  # noqa: E402
from balloon_device.host.control import request  # noqa: E402
from vhostuser import messages as m  # noqa: E402
from vhostuser.messages import Request as R  # noqa: E402
from vhostuser.testing.driver import DriverQueue, GuestMemory  # noqa: E402
from vhostuser.testing.frontend import RemoteFrontend  # noqa: E402

MiB = 1 << 20


def connect(path):
    """A frontend with rings on guest RAM; reports one 2 MiB range and waits for it."""
    mem = GuestMemory(64 * MiB)
    fe = RemoteFrontend(path)
    feats = fe.handshake() & ~(1 << 30)
    fe.ack(R.SET_FEATURES, m.U64.pack(feats | (1 << 30)))
    fe.set_mem_table([(g, s, u, o, mem.fd) for g, s, u, o in mem.layout])
    qs = {}
    for index, role in enumerate(F.queue_roles(feats)):
        dq = DriverQueue(mem, 64)
        kick, _ = fe.start_queue(index, 64, dq.desc_uva, dq.avail_uva, dq.used_uva)
        qs[role] = (dq, kick)
    gpa = mem.alloc(2 * MiB, align=2 * MiB)
    mem.fill(gpa, 2 * MiB, 1)
    dq, kick = qs["reporting"]
    dq.add([], [(gpa, 2 * MiB)])
    os.eventfd_write(kick, 1)
    deadline = time.monotonic() + 30
    while not dq.pop_used():
        if time.monotonic() > deadline:
            raise RuntimeError("the report was not completed")
        time.sleep(0.01)
    return fe, mem


def measure(n, supervise):
    d = Path(tempfile.mkdtemp(prefix="vub-unit-memory-"))
    names = [f"g{i}" for i in range(n)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for k in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        env.pop(k, None)
    args = [sys.executable, "-m", "balloon_device.host.cli", "--socket-dir", str(d),
            "--guests", ",".join(names), "--metrics-port", "0"]
    if not supervise:
        args.append("--no-supervise")
    log = open(d / "daemon.log", "wb")
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    frontends = []
    try:
        for name in names:
            deadline = time.monotonic() + 60
            while True:
                try:
                    st = request(str(d / "control.sock"), {"cmd": "status", "guest": name},
                                 timeout=5)
                    # a guest's process starts when its frontend connects: the daemon is
                    # ready for it once the manager answers (pid, or "unit": "waiting")
                    if st.get("ok") and (st["status"]["process"].get("pid")
                                         or st["status"]["process"].get("unit") == "waiting"):
                        break
                except Exception:  # noqa: BLE001 - not up yet
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError((d / "daemon.log").read_text()[-3000:])
                time.sleep(0.1)
            frontends.append(connect(str(d / f"{name}.sock")))
        time.sleep(2)
        serving = {request(str(d / "control.sock"), {"cmd": "status", "guest": name}
                           )["status"]["process"]["pid"]: name for name in names}
        rows = []
        for pid in process_tree(proc.pid):
            if pid == proc.pid:
                role = "supervisor" if supervise else "daemon (all guests)"
            else:
                role = f"guest {serving[pid]}" if pid in serving else "manager"
            rows.append((role, pid, proc_memory(pid)))
        return rows
    finally:
        for fe, mem in frontends:
            fe.close()
            mem.close()
        proc.terminate()
        proc.wait(30)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--guests", type=int, default=3)
    ns = ap.parse_args()
    sums = {}
    for supervise in (False, True):
        label = ("one process per guest (supervised)" if supervise
                 else "one process (--no-supervise)")
        rows = measure(ns.guests, supervise)
        print(f"\n{label}, {ns.guests} guests:")
        print(f"  {'process':<22} {'pid':>7} {'RSS MiB':>8} {'PSS MiB':>8} {'PSS own':>8}")
        for role, pid, mem in rows:
            print(f"  {role:<22} {pid:>7} {mib(mem.get('rss'), '{:.1f}'):>8} "
                  f"{mib(mem.get('pss'), '{:.1f}'):>8} {mib(mem.get('pss_own'), '{:.1f}'):>8}")
        total = sum(mem.get("pss_own", 0) for _, _, mem in rows)
        sums[supervise] = total
        print(f"  {'sum':<22} {'':>7} {'':>8} "
              f"{mib(sum(mem.get('pss', 0) for _, _, mem in rows), '{:.1f}'):>8} "
              f"{mib(total, '{:.1f}'):>8}")
    print(f"\nPSS own, per-guest processes / one process: {sums[True] / sums[False]:.2f}x "
          f"(+{mib(sums[True] - sums[False], '{:.1f}')} MiB for {ns.guests} guests)")


if __name__ == "__main__":
    main()
