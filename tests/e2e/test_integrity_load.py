"""End-to-end: guest memory integrity under continuous free page reporting
plus repeated inflate/deflate through the daemon.

The guest's integrity checker fills, verifies and frees 256 MiB per round
(and keeps a held buffer it re-verifies every round) while the host
alternates the balloon target between 256 MiB and 0. Oracle: zero
corrupted bytes, reporting and the balloon really ran.

VUB_SOAK_GIB sets the churn (default 2 GiB in CI; the documented long run
uses 10: `VUB_SOAK_GIB=10 python -m pytest tests/e2e/test_integrity_load.py -s`).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from balloon_device.host.harness import MIB, Guest  # noqa: E402
from balloon_device.host.harness.daemon import Daemon  # noqa: E402

pytestmark = pytest.mark.e2e
SOAK_GIB = float(os.environ.get("VUB_SOAK_GIB", "2"))
ROUND_MIB = 256
BALLOON = 256 * MIB


def test_integrity_under_reporting_and_balloon_churn(provisioned, tmp_path):
    rounds = max(2, int(SOAK_GIB * 1024 // ROUND_MIB))
    d = Daemon(tmp_path, log_level="info").start()
    try:
        with Guest(name="vub-soak", mem_mib=1024, balloon="vhost-user",
                   vhost_socket=d.socket_path, num_vqs=4, vq_size=64, accel="tcg", cpu="max",
                   steps=[("settle", "sleep 8"),
                          ("integrity", f"integrity {ROUND_MIB} {rounds} 1200")]) as g:
            # the settle step lets the boot-time reports finish (the kernel
            # reports 2 s after its driver binds): the counter's delta from the
            # integrity step's start is what the churn reported
            g.wait_marker("step-start", timeout=90, name="integrity")
            c0 = d.status()["counters"]
            t0 = time.monotonic()
            cycles = 0
            while g.find_marker("step-done", name="integrity") is None:
                assert g.alive(), "QEMU died"
                assert time.monotonic() - t0 < 60 + rounds * 30, "the checker does not finish"
                d.set_target(BALLOON)
                inflated = d.wait_actual(BALLOON)["actual_bytes"] == BALLOON
                d.set_target(0)
                deflated = d.wait_actual(0)["actual_bytes"] == 0
                if inflated and deflated:
                    cycles += 1
            done = g.wait_step("integrity", timeout=30, check_rc=False)
            res = g.wait_marker("integrity-done", timeout=5)
            c = d.status()["counters"]
            during = c["bytes_discarded"] - c0["bytes_discarded"]
            print(f"\n[soak] boot-time reports {c0['bytes_discarded'] / MIB:.0f} MiB; "
                  f"discarded during the step {during / MIB:.0f} MiB; "
                  f"{res.values}: churned {rounds * ROUND_MIB / 1024:.1f} GiB, "
                  f"{cycles} inflate/deflate cycles of {BALLOON // MIB} MiB, reported "
                  f"{c['bytes_reported'] / MIB:.0f} MiB, discarded {c['bytes_discarded'] / MIB:.0f} "
                  f"MiB + {c['bytes_inflate_discarded'] / MIB:.0f} MiB by inflation, "
                  f"{time.monotonic() - t0:.0f} s")
            assert res["bad_bytes"] == "0" and res["bad_pages"] == "0", res.line
            assert done["rc"] == "0", done.line
            assert res.num("rounds") == rounds
            assert cycles >= 1, "no inflate/deflate cycle completed during the run"
            assert during >= ROUND_MIB * MIB, "reporting did not run during the churn"
            assert c0["bytes_inflate_discarded"] == 0
            assert c["bytes_inflate_discarded"] >= BALLOON, "no inflation freed memory"
            assert c["malformed_chains"] == 0 and c["skipped_error"] == 0
    finally:
        d.stop()
