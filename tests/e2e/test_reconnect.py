"""End-to-end: daemon crashes and QEMU crashes.

QEMU 11.1's generic vhost-user device cannot survive a backend restart:
with chardev reconnect-ms it fails to start (realize does not wait for the
connection: "Failed to set msg fds"), and when the backend comes back it
aborts in vhost_dev_start ("Assertion `hdev->vhost_ops' failed"), because
vhost-user-base does not re-initialise its vhost_dev on reconnect. So what
we can prove here is: a SIGKILLed daemon never takes the guest down nor
corrupts it, the socket path it leaves behind does not stop a restart, and
a QEMU killed under the daemon leaves the daemon clean and serving.

The harness starts the daemon under its built-in supervisor (the default), and
d.kill() kills that supervisor: the serving process dies with it (PR_SET_PDEATHSIG),
every fd closes and QEMU sees the disconnect, which is the case tested here.
SIGKILL of the serving process alone goes unnoticed: tests/e2e/test_restart.py.

VUB_CRASH_CYCLES sets the number of daemon kill/restart cycles (default 3).
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from balloon_device.host.harness import MIB, Guest  # noqa: E402
from balloon_device.host.harness.daemon import Daemon  # noqa: E402

pytestmark = pytest.mark.e2e
CYCLES = int(os.environ.get("VUB_CRASH_CYCLES", "3"))



def wait_reports(d, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if d.status()["counters"]["report_chains"] > 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"no report reached the daemon in {timeout}s:\n{d.log_text()}")


def test_daemon_killed_during_reporting(provisioned, tmp_path):
    """Per cycle: a guest runs the integrity checker under reporting; the
    daemon is SIGKILLed right after reports started flowing. The guest keeps
    running and its checker keeps finding every byte intact; a new daemon
    starts on the path the dead one left behind and serves the next guest."""
    for cycle in range(CYCLES):
        d = Daemon(tmp_path, log_level="info").start()
        g = Guest(name=f"vub-crash{cycle}", mem_mib=1024, balloon="vhost-user",
                  vhost_socket=d.socket_path, num_vqs=4, vq_size=64, accel="tcg", cpu="max",
                  steps=[("integrity", "integrity 256 6 1200")])
        failed = True
        try:
            g.start()
            g.wait_marker("step-start", timeout=60, name="integrity")
            wait_reports(d)
            discarded = d.status()["counters"]["bytes_discarded"]
            d.kill(signal.SIGKILL)
            killed_at = len(g.markers())
            done = g.wait_step("integrity", timeout=120, check_rc=False)
            res = g.wait_marker("integrity-done", timeout=5)
            after = [m for m in g.markers()[killed_at:] if m.name == "integrity-round"]
            print(f"\n[cycle {cycle}] killed after {discarded / MIB:.0f} MiB discarded; "
                  f"{len(after)} rounds after the kill; {res.values}")
            assert g.alive(), "QEMU died with the daemon"
            assert res["bad_bytes"] == "0" and done["rc"] == "0", res.line
            assert after, "the guest made no progress after the daemon died"
            failed = False
        finally:
            g.close(failed=failed)
            d.stop()
        assert os.path.exists(d.socket_path), "a SIGKILLed daemon cannot remove its socket"


def test_qemu_killed_under_daemon(provisioned, tmp_path):
    d = Daemon(tmp_path, args=["--keep-listening"], log_level="info").start()
    try:
        for _ in range(2):
            g = Guest(name="vub-qkill", mem_mib=512, balloon="vhost-user",
                      vhost_socket=d.socket_path, num_vqs=4, vq_size=64, accel="tcg", cpu="max")
            g.start()
            try:
                g.wait_marker("balloon", timeout=60)
                assert d.status()["connected"]
                os.kill(g.pid, signal.SIGKILL)
                g.wait_exit(10)
            finally:
                g.close()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and d.status()["connected"]:
                time.sleep(0.1)
            st = d.status()
            assert not st["connected"] and d.alive(), d.log_text()
        fds = len(os.listdir(f"/proc/{d.status()['process']['pid']}/fd"))
        assert fds < 20, f"daemon holds {fds} fds after its frontends died"
        # its supervisor (d.pid) drops its copies as the fd store removals come in
        deadline = time.monotonic() + 10
        while (held := len(os.listdir(f"/proc/{d.pid}/fd"))) >= 20:
            assert time.monotonic() < deadline, f"supervisor holds {held} fds"
            time.sleep(0.1)
    finally:
        d.stop()
