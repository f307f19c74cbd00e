"""End-to-end: the contrib/systemd units, unchanged, under a real systemd PID 1.

scripts/build_systemd_guest.sh packs a Debian bookworm rootfs (systemd 252,
the wheel of this checkout, the units, tests/e2e/systemd_vm/check.py) as an
initramfs; it boots under QEMU (TCG) with systemd as PID 1, the check drives
the units with systemctl and real vhost-user sessions and prints one
``VUB-MARK systemd-step`` marker per step, then powers off.  Steps:
readiness (Type=notify: "activating" until READY=1, with a control service
that never sends it), serving under the hardening options (memory released,
uid, no capabilities, seccomp), restart after SIGKILL, socket activation, the
multi-guest unit past WatchdogSec=30s (pinging, NRestarts=0, guests a and b,
metrics), its watchdog restarting it when hung (SIGSTOP), ``systemd-analyze
security`` scores, a clean stop.

Fails (never skips) when the image cannot be built or QEMU is missing.
Run: python -m pytest tests/e2e/test_systemd.py -v -s
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from balloon_device.host.harness import Guest, GuestError, HarnessError, build_systemd_guest  # noqa: E402

pytestmark = pytest.mark.e2e

STEPS = ["multi_start", "notify_control", "template_ready", "template_serve",
         "restart_on_sigkill", "session_survives_sigkill", "socket_activation", "multi_serve", "multi_watchdog",
         "multi_watchdog_fires",
         "security:vhost-user-balloon@t1.service",
         "security:vhost-user-balloon-activated@s1.service",
         "security:vhost-user-balloon.service", "clean_stop"]
BOOT_TIMEOUT = 600      # TCG on a loaded 2-core host; a normal run takes ~1 min


def build_image():
    """(vmlinuz, initramfs) from scripts/build_systemd_guest.sh (cached)."""
    t0 = time.monotonic()
    try:
        kernel, initrd = build_systemd_guest()
    except HarnessError as e:
        pytest.fail(str(e), pytrace=False)
    print(f"\nsystemd image: {initrd} ({initrd.stat().st_size >> 20} MiB), "
          f"built/checked in {time.monotonic() - t0:.1f} s")
    return kernel, initrd


@pytest.mark.timeout(2400)
def test_units_under_real_systemd(provisioned):
    qemu, _ = provisioned
    kernel, initrd = build_image()
    with Guest(name="systemd", qemu=qemu, kernel=kernel, initrd=initrd, mem_mib=1536, smp=2,
               balloon=None, use_qmp=False, end="poweroff",
               append="rdinit=/sbin/init") as g:
        try:
            boot = g.wait_marker("systemd-boot", timeout=BOOT_TIMEOUT)
            done = g.wait_marker("systemd-done", timeout=BOOT_TIMEOUT)
        except GuestError as e:
            pytest.fail(f"the systemd VM did not finish its check:\n{e}", pytrace=False)
        t_done = g.elapsed()
        g.wait_exit(timeout=120)        # the check powers the VM off
        marks = g.markers()
        log = "\n".join(ln for ln in g.serial_text().splitlines()
                        if "VUB-LOG" in ln or "VUB-MARK" in ln)

    print(f"boot: PID 1 {boot['pid1']}, systemd {boot['version']}, check started at "
          f"{boot['uptime']} s uptime; check done {t_done:.0f} s after QEMU start")
    steps = {m["name"]: m for m in marks if m.name == "systemd-step"}
    for name in STEPS:
        m = steps.get(name)
        extra = " ".join(f"{k}={v}" for k, v in m.values.items()
                         if k not in ("name", "result")) if m else ""
        print(f"  {name:50s} {m['result'] if m else 'MISSING':7s} {extra}")
    for m in marks:
        if m.name == "systemd-security":
            print(f"  systemd-analyze security {m['unit']}: {m['score']} {m['level']}")

    assert boot["pid1"] == "systemd", boot.line
    bad = [n for n in STEPS if n not in steps or steps[n]["result"] != "PASS"]
    assert not bad, f"steps not passed: {bad}\n{log[-12000:]}"
    assert set(steps) == set(STEPS), f"unexpected steps {set(steps) - set(STEPS)}"
    assert done.num("fail") == 0 and done.num("pass") == len(STEPS), done.line
    released = {f"{n}.{k}": int(v) for n, m in steps.items() for k, v in m.values.items()
                if k.startswith("released")}
    assert len(released) == 11, released
    assert released.pop("session_survives_sigkill.released") == 8 << 20  # two chains
    assert set(released.values()) == {4 << 20}, released
