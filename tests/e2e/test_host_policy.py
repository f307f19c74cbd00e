"""End-to-end: the host memory policy keeps a host (a memory cgroup) under its
limit by inflating idle guests' balloons; without it the limit is hit.

Host: a parent memory cgroup of 2 GiB. Guests: 1 GiB each, free page
reporting OFF (so what a guest frees stays on the host unless the balloon
takes it), each touches 700 MiB then idles. Three of them need ~2.6 GiB:
without the policy a QEMU is OOM-killed; with one multi-guest daemon running
the policy (floor 1 GiB of the cgroup's limit), all three keep running.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.harness import MIB, Guest, MemCgroup  # noqa: E402
from tests.harness.daemon import Daemon  # noqa: E402

pytestmark = pytest.mark.e2e
LIMIT = 2048 * MIB
GUESTS = ("a", "b", "c")



class MultiDaemon(Daemon):
    """One daemon process serving GUESTS from one socket folder."""

    def __init__(self, workdir, args):
        super().__init__(workdir, args=args, name="multi", log_level="info")
        self.control_path = str(Path(workdir) / "control.sock")
        self.socket_path = str(Path(workdir) / "a.sock")

    def argv(self):
        return [sys.executable, "-m", "balloon_device.cli", "--socket-dir", str(self.workdir),
                "--guests", ",".join(GUESTS), "--log-level", self.log_level, *self.args]

    def guest_status(self, name):
        return self.ctl({"cmd": "status", "guest": name})["status"]


def run_three(tmp_path, policy):
    parent = MemCgroup(f"vub-policy-{int(time.time() * 1000)}", limit_bytes=LIMIT).create()
    args = ["--no-reporting", "--stats-interval", "1"]
    if policy:
        args += ["--policy", "--policy-cgroup", str(parent.path), "--policy-floor", "1GiB",
                 "--policy-hysteresis", "256MiB", "--policy-interval", "1",
                 "--policy-psi", "0"]
    d = MultiDaemon(tmp_path, args).start()
    guests, samples, died = [], [], []
    try:
        for name in GUESTS:
            g = Guest(name=f"pol-{name}", mem_mib=1024, balloon="vhost-user",
                      vhost_socket=str(tmp_path / f"{name}.sock"), num_vqs=3, vq_size=64,
                      accel="tcg", cpu="max", cgroup_parent=parent.rel,
                      steps=[("alloc", "alloc_touch 700")])
            g.start()
            guests.append(g)
            try:
                g.wait_step("alloc", timeout=120)
            except Exception:
                pass  # an OOM kill shows as a dead QEMU below
            # let the host settle (and the policy act) before the next launch
            t_end = time.monotonic() + 12
            while time.monotonic() < t_end:
                samples.append((name, time.monotonic(), parent.usage()))
                time.sleep(1)
            died = [x.name for x in guests if not x.alive()]
            if died:
                break
        targets = {}
        if not died:
            for name in GUESTS:
                st = d.guest_status(name)
                targets[name] = st["actual_bytes"] // MIB
        return died, samples, targets, d.log_text(40)
    finally:
        for g in guests:
            g.close()
        d.stop()
        parent.remove()


def test_without_policy_the_host_limit_is_hit(provisioned, tmp_path):
    died, samples, _, _ = run_three(tmp_path, policy=False)
    print("\n" + "\n".join(f"{n} {u / MIB:.0f} MiB" for n, _, u in samples[::3] if u))
    assert died, "three 700 MiB guests fitted into 2 GiB without the policy: the test proves nothing"


def test_policy_keeps_the_host_under_its_limit(provisioned, tmp_path):
    died, samples, targets, log = run_three(tmp_path, policy=True)
    print("\n" + "\n".join(f"{n} {u / MIB:.0f} MiB" for n, _, u in samples[::3] if u))
    print(f"balloons (MiB): {targets}\n{log}")
    assert not died, f"guests {died} were killed although the policy was on"
    assert sum(targets.values()) >= 300, "the policy did not inflate any balloon"
    assert max(u for _, _, u in samples if u) < LIMIT
