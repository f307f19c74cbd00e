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
SIGKILL of the serving process alone goes unnoticed: tests/e2e/test_restart_qemu.py.

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



def wait_reporting_pass(d, since, timeout=60):
    """Wait until reporting chains are arriving now: two polls in a row (50 ms
    apart) each see report_chains grow past `since`. Returns the counters and
    the monotonic time of the last poll."""
    deadline = time.monotonic() + timeout
    last = d.status()["counters"]["report_chains"]
    while time.monotonic() < deadline:
        time.sleep(0.05)
        c = d.status()["counters"]
        grew = c["report_chains"] > last
        if grew and last > since:
            return c, time.monotonic()
        last = c["report_chains"]
    raise AssertionError(f"no reporting pass reached the daemon in {timeout}s:\n{d.log_text()}")


def test_daemon_killed_during_reporting(provisioned, tmp_path):
    """Per cycle: a guest runs the integrity checker under reporting; the
    daemon is SIGKILLed right after reports started flowing. The guest keeps
    running and its checker keeps finding every byte intact; a new daemon
    starts on the path the dead one left behind and serves the next guest."""
    for cycle in range(CYCLES):
        d = Daemon(tmp_path, log_level="info").start()
        g = Guest(name=f"vub-crash{cycle}", mem_mib=1024, balloon="vhost-user",
                  vhost_socket=d.socket_path, num_vqs=4, vq_size=64, accel="tcg", cpu="max",
                  steps=[("settle", "sleep 6"), ("integrity", "integrity 256 6 1200")])
        failed = True
        try:
            g.start()
            # boot-time reports are over by the end of the settle step; the
            # chains counted after the integrity step started are the churn's
            g.wait_marker("step-start", timeout=90, name="integrity")
            since = d.status()["counters"]["report_chains"]
            c, seen = wait_reporting_pass(d, since)
            d.kill(signal.SIGKILL)
            lag = time.monotonic() - seen
            discarded = c["bytes_discarded"]
            killed_at = len(g.markers())
            done = g.wait_step("integrity", timeout=120, check_rc=False)
            res = g.wait_marker("integrity-done", timeout=5)
            after = [m for m in g.markers()[killed_at:] if m.name == "integrity-round"]
            print(f"\n[cycle {cycle}] killed {lag * 1000:.0f} ms after a reporting chain "
                  f"arrived ({c['report_chains'] - since} chains in this step), "
                  f"{discarded / MIB:.0f} MiB discarded; "
                  f"{len(after)} rounds after the kill; {res.values}")
            assert c["report_chains"] > since, "the kill was not during reporting"
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
        base_fds = sorted(os.listdir(f"/proc/{d.pid}/fd"), key=int)  # the supervisor's
        serving = d.status()["process"]["pid"]
        base_serving = sorted(os.listdir(f"/proc/{serving}/fd"), key=int)
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
        # (a control connection of the status calls above may still be closing: wait a bit)
        deadline = time.monotonic() + 5
        while (len(fds := sorted(os.listdir(f"/proc/{serving}/fd"), key=int)) > len(base_serving)
               and time.monotonic() < deadline):
            time.sleep(0.1)
        print(f"\nserving process fds: {len(base_serving)} before the guests, {len(fds)} after")
        def what(pid, names):
            out = []
            for n in names:
                try:
                    out.append(f"{n}->{os.readlink(f'/proc/{pid}/fd/{n}')}")
                except OSError:
                    out.append(f"{n}->?")
            return out
        assert len(fds) <= len(base_serving), \
            f"daemon holds {what(serving, fds)} after its frontends died, {base_serving} before"
        # its supervisor (d.pid) drops its copies as the fd store removals come in
        deadline = time.monotonic() + 10
        while len(held := os.listdir(f"/proc/{d.pid}/fd")) > len(base_fds):
            assert time.monotonic() < deadline, \
                f"supervisor holds {sorted(held, key=int)}, {base_fds} before the guests"
            time.sleep(0.1)
    finally:
        d.stop()
