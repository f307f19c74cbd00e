"""End-to-end: two real QEMU 11.1 guests on one supervised multi-guest daemon; guest a's
serving process is SIGKILLed again and again, guest b never notices.

Each guest has its own serving process (docs/operations.md, the process model). Both run
the integrity workload (allocate, fill, free, report). Per cycle a's process is killed
at a random point (kill_cycles: its successor restores the session and serves a's next
report; QEMU logs nothing about vhost-user, the guest no virtio error, integrity finds
every byte intact). Meanwhile b keeps its process (same pid, no restart) and its reports
keep being completed.
"""
from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from balloon_device.host.harness import Guest  # noqa: E402
from balloon_device.host.harness.daemon import Daemon  # noqa: E402
from balloon_device.host.harness.restart import check_quiet, kill_cycles, summary  # noqa: E402

pytestmark = pytest.mark.e2e
CYCLES = int(os.environ.get("VUB_KILL_CYCLES", "4"))
SEED = int(os.environ.get("VUB_KILL_SEED", str(int(time.time()))))


class TwoGuests(Daemon):
    """The daemon for guests a and b; status()/set_target() are guest `focus`'s."""

    focus = "a"

    def __init__(self, workdir, args):
        super().__init__(workdir, args=args, name="a", log_level="info")
        self.control_path = str(Path(workdir) / "control.sock")

    def argv(self):
        return [sys.executable, "-m", "balloon_device.host.cli",
                "--guest", f"a={self.workdir}/a.sock", "--guest", f"b={self.workdir}/b.sock",
                "--log-level", self.log_level, *self.args]

    def guest_status(self, name):
        return self.ctl({"cmd": "status", "guest": name})["status"]

    def status(self):
        return self.guest_status(self.focus)

    def set_target(self, nbytes):
        return self.ctl({"cmd": "target", "bytes": int(nbytes), "guest": self.focus})


def test_killing_one_guests_process_leaves_the_other_alone(provisioned, tmp_path):
    d = TwoGuests(tmp_path, args=["--stats-interval", "1"]).start()
    guests = {}
    failed = True
    try:
        for name in ("a", "b"):
            guests[name] = Guest(name=f"vub-iso-{name}", mem_mib=1024, balloon="vhost-user",
                                 vhost_socket=str(tmp_path / f"{name}.sock"), num_vqs=4,
                                 vq_size=64, accel="tcg", cpu="max",
                                 steps=[("integrity", "integrity 256 100000 2500")])
            guests[name].start()
        for name, g in guests.items():
            g.wait_marker("step-start", timeout=180, name="integrity")
        deadline = time.monotonic() + 90
        while min(d.guest_status(n)["counters"]["report_chains"] for n in guests) == 0:
            assert time.monotonic() < deadline, d.log_text()
            time.sleep(0.2)
        b0 = d.guest_status("b")
        print(f"\nseed {SEED}")
        results = kill_cycles(d, guests["a"], CYCLES, random.Random(SEED), serve_timeout=180)
        s = summary(results)
        print(f"a: {s['cycles']} kills: without service p50 {s['gap_p50_ms']:.0f} ms, max "
              f"{s['gap_max_ms']:.0f} ms; next report p50 {s['next_report_p50_s']:.2f} s")
        b1 = d.guest_status("b")
        print(f"b: pid {b0['process']['pid']} -> {b1['process']['pid']}, report chains "
              f"{b0['counters']['report_chains']} -> {b1['counters']['report_chains']}")
        assert b1["process"]["pid"] == b0["process"]["pid"]
        assert b1["process"]["restarts"] == 0 and b1["connected"]
        assert b1["counters"]["report_chains"] > b0["counters"]["report_chains"]
        assert d.guest_status("a")["process"]["restarts"] == CYCLES
        for g in guests.values():
            check_quiet(g)
            assert g.alive()
        failed = False
    finally:
        for g in guests.values():
            g.close(failed=failed)
        if failed:
            print(d.log_text(200))
        d.stop()
