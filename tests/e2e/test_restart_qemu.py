"""End-to-end: SIGKILL the serving process under a real QEMU 11.1 guest; nobody notices.

The daemon runs under its built-in supervisor (the default), which keeps every fd
QEMU gave (docs/operations.md, restarts). Per cycle the serving process is killed
at a random point while the guest's integrity workload allocates and frees memory
(reports flow; every third cycle the balloon target moves, so inflate, deflate and
CONFIG_CHANGE_MSG are under way too, and stats are asked for every second). After
each kill: the successor restores the session, the guest's next report is
completed and discards memory, QEMU logs nothing about vhost-user, the guest logs
no virtio error, and the integrity checker finds every byte intact. At the end the
memory the guest freed comes back to the host.

VUB_KILL_CYCLES sets the number of cycles (default 5); scripts/kill_cycles.py runs
100 and writes the numbers quoted in docs/reliability.md.
"""
from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from balloon_device.host.harness import MIB, Guest  # noqa: E402
from balloon_device.host.harness.daemon import Daemon  # noqa: E402
from balloon_device.host.harness.restart import check_quiet, kill_cycles, summary  # noqa: E402

pytestmark = pytest.mark.e2e
CYCLES = int(os.environ.get("VUB_KILL_CYCLES", "5"))
SEED = int(os.environ.get("VUB_KILL_SEED", str(int(time.time()))))


def test_sigkill_of_the_serving_process_goes_unnoticed(provisioned, tmp_path):
    d = Daemon(tmp_path, args=["--stats-interval", "1"], log_level="info").start()
    g = Guest(name="vub-restart", mem_mib=1024, balloon="vhost-user", vhost_socket=d.socket_path,
              num_vqs=4, vq_size=64, accel="tcg", cpu="max",
              steps=[("integrity", "integrity 256 100000 2500")])
    failed = True
    try:
        supervisor = d.pid
        g.start()
        g.wait_marker("step-start", timeout=120, name="integrity")
        deadline = time.monotonic() + 60
        while d.status()["counters"]["report_chains"] == 0:
            assert time.monotonic() < deadline, d.log_text()
            time.sleep(0.1)
        print(f"\nseed {SEED}")
        results = kill_cycles(d, g, CYCLES, random.Random(SEED))
        s = summary(results)
        print(f"{s['cycles']} kills: without service p50 {s['gap_p50_ms']:.0f} ms, max "
              f"{s['gap_max_ms']:.0f} ms; next report p50 {s['next_report_p50_s']:.2f} s, "
              f"max {s['next_report_max_s']:.2f} s")
        assert d.pid == supervisor and d.alive()
        st = d.status()
        assert st["process"]["restarts"] == CYCLES and st["connected"]
        # the freed memory still comes back: a round's 256 MiB goes into the memfd and
        # out again once the guest frees and reports it
        high, drop = 0.0, None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            now = g.memfd_allocated() / MIB
            high = max(high, now)
            if now < high - 128:
                drop = (high, now)
                break
            time.sleep(0.25)
        assert drop, f"the guest-RAM memfd never dropped by 128 MiB (highest {high:.0f} MiB)"
        print(f"memfd {drop[0]:.0f} -> {drop[1]:.0f} MiB after the kills")
        rounds = check_quiet(g)
        assert rounds > CYCLES // 2, "the guest's workload made too little progress"
        assert g.alive()
        failed = False
    finally:
        g.close(failed=failed)
        if failed:
            print(d.log_text(200))
        d.stop()
