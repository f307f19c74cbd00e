"""Reference end-to-end tests with QEMU's built-in virtio-balloon.

They prove that the harness (QEMU provisioning, guest image, markers, QMP,
cgroups, memory samplers) works, and give the numbers our vhost-user daemon
is compared against.  Run: python3 -m pytest tests/e2e/test_reference.py -v -s

QEMU and the guest are provisioned by scripts/provision_qemu.sh and
scripts/build_guest.sh; when that fails the tests FAIL (never skip).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from balloon_device.host.harness import (MIB, Guest, GuestError, MemCgroup, alloc_steps,  # noqa: E402
                           baseline_then_free, format_samples, pid_alive)

pytestmark = pytest.mark.e2e

GUEST_MIB = 1024
ALLOC_MIB = 800
RECLAIM_SLACK = 250 * MIB      # "back to baseline" tolerance
RECLAIM_TIMEOUT = 40.0         # seconds after the allocation is freed
NOREPORT_WATCH = 15.0



def _sizes(s):
    return s["cgroup_usage"], s["memfd_allocated"]


def test_boot_balloon_reporting(provisioned):
    """(a) The guest boots, virtio_balloon binds, REPORTING (bit 5) is
    negotiated, the page reporting order is published, QMP works, and
    everything is cleaned up afterwards."""
    with Guest(name="ref-boot", mem_mib=GUEST_MIB, balloon="builtin", accel="tcg", cpu="max",
               steps=[("hello", "echo VUB-MARK hello who=guest")]) as g:
        booted = g.wait_marker("booted", timeout=60)
        boot_s = g.elapsed()
        info = g.wait_marker("balloon", timeout=20)
        print(f"\naccel={g.accel} boot {boot_s:.1f} s (guest uptime {booted['t']} s) "
              f"kernel={booted['kernel']}")
        print(f"balloon: {info.values}")
        assert info["driver"] == "virtio_balloon", info.line
        feats = info["features"]
        assert len(feats) >= 33 and set(feats) <= {"0", "1"}, info.line
        assert feats[5] == "1", f"REPORTING (bit 5) not negotiated: {info.line}"
        assert feats[32] == "1", f"VERSION_1 not negotiated: {info.line}"
        assert info["reporting"] == "1"
        order = info.num("reporting_order")
        assert isinstance(order, int) and 0 < order <= 10, f"no page_reporting_order: {info.line}"
        print(f"page_reporting_order={order}")
        assert abs(int(booted["mem_total_kb"]) - GUEST_MIB * 1024) < 128 * 1024

        g.wait_marker("hello", timeout=20, who="guest")
        g.wait_step("hello", timeout=20)
        g.wait_marker("idle", timeout=20)
        assert g.qmp("query-balloon") == {"actual": GUEST_MIB * MIB}
        assert g.qmp("query-status")["status"] == "running"
        s = g.sample_memory()
        print(f"memory: {s}")
        assert s["cgroup_usage"] and s["memfd_allocated"] and s["rss"]
        assert g.pid in g.cgroup.procs()
        pid, cg, wd = g.pid, g.cgroup.path, g.workdir
    assert not pid_alive(pid), "QEMU still running after the guest was closed"
    assert not cg.exists(), f"cgroup {cg} left behind"
    assert not wd.exists(), f"work dir {wd} left behind"


def test_cleanup_on_failure(provisioned):
    """An exception inside the with-block still kills QEMU and removes the
    cgroup (logs are kept for diagnosis); a marker timeout raises GuestError."""
    parent = MemCgroup(f"vub-ref-parent-{int(time.time())}")
    seen = {}
    with pytest.raises(GuestError):
        with Guest(name="ref-fail", mem_mib=256, balloon=None, accel="tcg",
                   cgroup_parent=parent.rel, mem_limit=1024 * MIB) as g:
            g.wait_marker("booted", timeout=60)
            seen.update(pid=g.pid, cg=g.cgroup.path, wd=g.workdir)
            assert g.cgroup.path.parent == parent.path
            assert int((g.cgroup.path / "memory.limit_in_bytes").read_text()) == 1024 * MIB
            g.wait_marker("never-printed", timeout=1)
    try:
        assert not pid_alive(seen["pid"])
        assert not seen["cg"].exists()
        assert (seen["wd"] / "serial.log").exists(), "serial log not kept on failure"
        assert "VUB-MARK booted" in (seen["wd"] / "serial.log").read_text()
    finally:
        parent.remove()
        import shutil
        shutil.rmtree(seen.get("wd", "/nonexistent"), ignore_errors=True)


def _alloc_then_idle(mode: str):
    """Boot a 1 GiB guest, take a baseline, let it touch and free ALLOC_MIB;
    return (guest, baseline sample, sample right after the free)."""
    g = Guest(name=f"ref-{mode}", mem_mib=GUEST_MIB, balloon=mode, accel="tcg", cpu="max",
              steps=alloc_steps(ALLOC_MIB))
    g.start()
    try:
        base, after, _ = baseline_then_free(g, alloc_timeout=90)
        print(f"\n[{mode}] accel={g.accel} baseline usage={base['cgroup_usage'] / MIB:.1f} MiB "
              f"memfd={base['memfd_allocated'] / MIB:.1f} MiB; right after free "
              f"usage={after['cgroup_usage'] / MIB:.1f} MiB memfd={after['memfd_allocated'] / MIB:.1f} MiB")
        return g, base, after
    except BaseException:
        g.close(failed=True)
        raise


def test_builtin_reporting_reclaims(provisioned):
    """(b) With free-page-reporting=on, freed guest memory goes back to the
    host: cgroup usage and the memfd's allocated size return to within
    250 MiB of the baseline within 40 s."""
    g, base, after = _alloc_then_idle("builtin")
    failed = True
    try:
        b_usage, b_memfd = _sizes(base)
        # the allocation really happened (unless reporting already started)
        peak = max(after["memfd_allocated"], b_memfd)
        t0 = time.monotonic()

        def back(s):
            u, m = _sizes(s)
            return u <= b_usage + RECLAIM_SLACK and m <= b_memfd + RECLAIM_SLACK

        samples = g.sample_for(RECLAIM_TIMEOUT, interval=1.0, until=back)
        took = time.monotonic() - t0
        reached = back(samples[-1])
        if reached:
            # follow the curve until it is flat, to report the steady state
            last = [samples[-1]["memfd_allocated"]]
            samples += g.sample_for(10, interval=1.0, until=lambda s: (
                last.append(s["memfd_allocated"]) or last[-1] == last[-2]))
        print(format_samples([base, after] + samples))
        print(f"[builtin] within {RECLAIM_SLACK // MIB} MiB of baseline {took:.1f} s after the free; "
              f"steady state baseline+{(samples[-1]['cgroup_usage'] - b_usage) / MIB:.1f} MiB (usage), "
              f"+{(samples[-1]['memfd_allocated'] - b_memfd) / MIB:.1f} MiB (memfd)")
        assert peak >= b_memfd + (ALLOC_MIB - 150) * MIB or max(
            s["memfd_allocated"] for s in samples) >= b_memfd + 300 * MIB, \
            "guest allocation did not show up on the host"
        assert reached, f"not reclaimed within {RECLAIM_TIMEOUT} s"
        failed = False
    finally:
        g.close(failed=failed)


def test_builtin_noreport_keeps_memory(provisioned):
    """(b') Without reporting the freed guest memory stays allocated on the
    host for at least 15 s."""
    g, base, after = _alloc_then_idle("builtin-noreport")
    failed = True
    try:
        b_usage, b_memfd = _sizes(base)
        samples = g.sample_for(NOREPORT_WATCH, interval=1.0)
        print(format_samples([base, after] + samples))
        floor = (ALLOC_MIB - 150) * MIB
        for s in [after] + samples:
            u, m = _sizes(s)
            assert m >= b_memfd + floor, f"memfd shrank without reporting: {s}"
            assert u >= b_usage + floor, f"cgroup usage shrank without reporting: {s}"
        failed = False
    finally:
        g.close(failed=failed)


def test_builtin_reporting_integrity(provisioned):
    """Guest memory keeps its contents while free page reporting discards
    freed pages between rounds (and reporting really happens meanwhile)."""
    rounds, size = 4, 256
    with Guest(name="ref-integrity", mem_mib=GUEST_MIB, balloon="builtin", accel="tcg",
               steps=[("integrity", f"integrity {size} {rounds} 3000")]) as g:
        g.wait_marker("booted", timeout=60)
        g.wait_marker("step-start", timeout=30, name="integrity")
        samples = g.sample_for(
            90, interval=0.5,
            until=lambda s: g.find_marker("step-done", name="integrity") is not None)
        done = g.wait_step("integrity", timeout=30, check_rc=False)
        res = g.wait_marker("integrity-done", timeout=5)
        print("\n" + format_samples(samples[::2]))
        print(f"[integrity] {res.values} step rc={done['rc']}")
        assert res["bad_bytes"] == "0" and done["rc"] == "0", res.line
        assert res.num("rounds") == rounds
        memfd = [s["memfd_allocated"] for s in samples if s["memfd_allocated"]]
        peak_i = max(range(len(memfd)), key=memfd.__getitem__)
        dip = memfd[peak_i] - min(memfd[peak_i:])
        print(f"[integrity] memfd peak {memfd[peak_i] / MIB:.1f} MiB, dip after peak {dip / MIB:.1f} MiB")
        assert dip >= 100 * MIB, "no free page reporting seen during the integrity run"
