"""End-to-end: our daemon serving a real Linux guest under real QEMU 11.1.

(a) the guest's virtio_balloon binds to our device and negotiates REPORTING;
(b) memory a guest frees comes back to the host through the daemon, and
    does not when reporting is not offered (control);
(c) inflate/deflate through the daemon's control path;
(d) guest memory integrity while reporting is active;
(e) the daemon exits cleanly when QEMU quits; QEMU fails clearly without it;
(f) --deflate-on-oom: a guest whose balloon holds most of its RAM still runs a
    workload that needs it (the balloon deflates, no OOM kill), and without
    the feature the same workload fails (control).

QEMU and the guest are provisioned by the scripts; when that fails these
tests FAIL (never skip). Run: python -m pytest tests/e2e/test_daemon.py -v -s
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from balloon_device.host.harness import (MIB, Guest, GuestError, alloc_steps, baseline_then_free,  # noqa: E402
                           format_samples)
from balloon_device.host.harness.daemon import Daemon  # noqa: E402
from balloon_device.host.config import parse_size  # noqa: E402

pytestmark = pytest.mark.e2e

GUEST_MIB = 1024
ALLOC_MIB = 800
RECLAIM_SLACK = 250 * MIB     # cgroup usage (QEMU's own memory moves too)
RECLAIM_SHARE = 0.85          # of the guest's allocation, measured on the memfd
RECLAIM_TIMEOUT = 40.0



@pytest.fixture
def daemon(tmp_path, request):
    marker = request.node.get_closest_marker("daemon_args")
    d = Daemon(tmp_path, args=marker.args if marker else ())
    d.start()
    yield d
    rc = d.stop()
    print(f"--- daemon log (tail) ---\n{d.log_text(60)}")  # shown by pytest on failure
    assert rc in (0, None, -15), f"daemon exited with {rc}:\n{d.log_text()}"


def vhost_guest(d, name, steps=(), **kw):
    num_vqs = 3 if "--no-reporting" in d.args else 4
    return Guest(name=name, mem_mib=GUEST_MIB, balloon="vhost-user", vhost_socket=d.socket_path,
                 num_vqs=num_vqs, vq_size=64, accel="tcg", cpu="max", steps=list(steps), **kw)


def _sizes(s):
    return s["cgroup_usage"], s["memfd_allocated"]


def test_driver_binds_and_negotiates_reporting(provisioned, daemon):
    with vhost_guest(daemon, "vub-boot", steps=[("hello", "echo VUB-MARK hello")]) as g:
        g.wait_marker("booted", timeout=60)
        info = g.wait_marker("balloon", timeout=20)
        print(f"\naccel={g.accel} balloon: {info.values}")
        assert info["driver"] == "virtio_balloon", info.line
        feats = info["features"]
        assert feats[5] == "1", f"REPORTING not negotiated: {info.line}"
        assert feats[32] == "1" and feats[1] == "1", info.line
        assert info.num("reporting_order") == 9, info.line
        g.wait_step("hello", timeout=20)
        st = daemon.status()
        print(f"daemon status: {st}")
        assert st["connected"] and "REPORTING" in st["features_acked"]
        assert st["queues"] == ["inflate", "deflate", "stats", "reporting"]


def _reclaim_run(d, name):
    g = vhost_guest(d, name, steps=alloc_steps(ALLOC_MIB))
    g.start()
    try:
        return (g, *baseline_then_free(g))
    except BaseException:
        g.close(failed=True)
        raise


def test_reporting_returns_freed_memory(provisioned, daemon):
    g, base, after, t_free = _reclaim_run(daemon, "vub-reclaim")
    failed = True
    try:
        b_usage, b_memfd = _sizes(base)

        # the peak is what the guest held when its allocation was done (the
        # sample right after alloc_touch exited; reporting waits 2 s)
        peak = after["memfd_allocated"]
        assert peak >= b_memfd + (ALLOC_MIB - 150) * MIB, \
            f"the guest allocation did not show on the host: {after}"
        grown = peak - b_memfd

        def back(s):
            u, m = _sizes(s)
            return (u <= b_usage + RECLAIM_SLACK
                    and peak - m >= RECLAIM_SHARE * grown)

        samples = g.sample_for(RECLAIM_TIMEOUT, interval=0.5, until=back)
        took = time.monotonic() - t_free
        reached = back(samples[-1])
        samples += g.sample_for(6, interval=1.0)
        print("\n" + format_samples([base, after] + samples))
        st = daemon.status()
        c = st["counters"]
        final = samples[-1]["memfd_allocated"]
        print(f"[daemon] {(peak - final) / MIB:.0f} of {grown / MIB:.0f} MiB back "
              f"({(peak - final) / grown:.0%}) {took:.1f} s after the free; steady "
              f"+{(final - b_memfd) / MIB:.1f} MiB memfd; reported {c['bytes_reported'] / MIB:.0f} "
              f"MiB discarded {c['bytes_discarded'] / MIB:.0f} MiB in {c['report_chains']} chains")
        assert reached, (f"not {RECLAIM_SHARE:.0%} of the {grown / MIB:.0f} MiB allocation back "
                         f"within {RECLAIM_TIMEOUT} s")
        assert peak - final >= RECLAIM_SHARE * grown, "memory came back, then went again"
        assert c["bytes_discarded"] >= 500 * MIB and c["malformed_chains"] == 0
        assert c["bytes_discarded"] <= c["bytes_reported"]
        failed = False
    finally:
        g.close(failed=failed)


@pytest.mark.daemon_args("--no-reporting")
def test_without_reporting_memory_stays(provisioned, daemon):
    g, base, after, _ = _reclaim_run(daemon, "vub-noreport")
    failed = True
    try:
        b_usage, b_memfd = _sizes(base)
        samples = g.sample_for(15, interval=1.0)
        print("\n" + format_samples([base, after] + samples))
        for s in [after] + samples:
            assert s["memfd_allocated"] >= b_memfd + (ALLOC_MIB - 150) * MIB, s
        assert "REPORTING" not in daemon.status()["features_acked"]
        failed = False
    finally:
        g.close(failed=failed)


@pytest.mark.daemon_args("--no-reporting")
def test_inflate_deflate_through_control(provisioned, daemon):
    # Without reporting, the freed allocation stays on the host until the
    # balloon takes those pages: host memory then follows the balloon.
    g, base, after, _ = _reclaim_run(daemon, "vub-inflate")
    failed = True
    try:
        target = 512 * MIB
        daemon.set_target(target)
        t0 = time.monotonic()
        st = daemon.wait_actual(target)
        took = time.monotonic() - t0
        inflated = g.sample_memory()
        print(f"\n[inflate] actual={st['actual_bytes'] / MIB:.0f} MiB after {took:.1f} s; memfd "
              f"{after['memfd_allocated'] / MIB:.0f} -> {inflated['memfd_allocated'] / MIB:.0f} MiB; "
              f"counters {st['counters']}")
        assert st["actual_bytes"] == target, "guest did not follow the target"
        assert st["counters"]["inflate_pages"] >= target // 4096
        assert after["memfd_allocated"] - inflated["memfd_allocated"] >= 300 * MIB, \
            "host memory did not follow the inflated balloon"
        daemon.set_target(0)
        st = daemon.wait_actual(0)
        print(f"[deflate] actual={st['actual_bytes']} deflate_pages={st['counters']['deflate_pages']}")
        assert st["actual_bytes"] == 0 and st["counters"]["deflate_pages"] >= target // 4096
        failed = False
    finally:
        g.close(failed=failed)


def test_integrity_while_reporting(provisioned, daemon):
    rounds, size = 4, 256
    with vhost_guest(daemon, "vub-integrity",
                     steps=[("integrity", f"integrity {size} {rounds} 3000")]) as g:
        g.wait_marker("booted", timeout=60)
        g.wait_marker("step-start", timeout=30, name="integrity")
        # boot-time reports already count: take the counter from the step's start
        c0 = daemon.status()["counters"]
        samples = g.sample_for(
            150, interval=1.0,
            until=lambda s: g.find_marker("step-done", name="integrity") is not None)
        done = g.wait_step("integrity", timeout=30, check_rc=False)
        res = g.wait_marker("integrity-done", timeout=5)
        c = daemon.status()["counters"]
        during = c["bytes_discarded"] - c0["bytes_discarded"]
        memfd = [s["memfd_allocated"] for s in samples if s["memfd_allocated"]]
        peak_i = max(range(len(memfd)), key=memfd.__getitem__)
        dip = memfd[peak_i] - min(memfd[peak_i:])
        print(f"\n[integrity] {res.values} rc={done['rc']} discarded during the step "
              f"{during / MIB:.0f} MiB; memfd peak {memfd[peak_i] / MIB:.0f} MiB, "
              f"dip after it {dip / MIB:.0f} MiB")
        assert res["bad_bytes"] == "0" and done["rc"] == "0", res.line
        assert during >= size * MIB, "reporting did not run during the check"
        assert dip >= 100 * MIB, "no memory came back to the host during the check"


def test_daemon_exits_when_qemu_quits(provisioned, daemon):
    with vhost_guest(daemon, "vub-quit") as g:
        g.wait_marker("booted", timeout=60)
        g.wait_marker("balloon", timeout=20)
        g.qmp("quit")
        g.wait_exit(20)
    rc = daemon.wait_exit(15)
    log = daemon.log_text()
    assert rc == 0, f"daemon did not exit cleanly (rc={rc}):\n{log}"
    assert "frontend disconnected" in log


def test_qemu_fails_clearly_without_daemon(provisioned, tmp_path):
    missing = tmp_path / "absent.sock"
    g = Guest(name="vub-nodaemon", mem_mib=256, balloon="vhost-user", vhost_socket=missing,
              accel="tcg", cpu="max")
    with pytest.raises(GuestError) as e:
        g.start()
        try:
            g.wait_marker("booted", timeout=30)
        finally:
            g.close()
    text = str(e.value)
    print(text[-2000:])
    assert str(missing) in text and ("Failed to connect" in text or "No such file" in text)


def test_qemu_args_helper_attaches_a_guest(provisioned, daemon):
    """The arguments `vhost-user-balloon qemu-args` prints really attach a guest."""
    out = subprocess.run([sys.executable, "-m", "balloon_device.host.cli", "qemu-args",
                          "--socket-path", daemon.socket_path, "--memory", f"{GUEST_MIB}M"],
                         capture_output=True, text=True, check=True).stdout.split()
    pairs = list(zip(out[::2], out[1::2]))
    # guest RAM: the harness lays it out itself, with the same ids and options
    ram = [p for p in pairs if p[0] in ("-object", "-machine")]
    assert len(ram) == 2 and ram[1] == ("-machine", "memory-backend=mem"), out
    backend = dict(kv.split("=", 1) for kv in ram[0][1].split(",")[1:])
    assert ram[0][1].startswith("memory-backend-memfd,") and backend["id"] == "mem", out
    assert backend["share"] == "on" and parse_size(backend["size"]) == GUEST_MIB * MIB, out
    extra = [x for p in pairs if p[0] not in ("-object", "-machine") for x in p]
    with Guest(name="vub-qemu-args", mem_mib=GUEST_MIB, balloon=None, extra_args=extra,
               accel="tcg", cpu="max") as g:
        info = g.wait_marker("balloon", timeout=60)
        assert info["driver"] == "virtio_balloon" and info["reporting"] == "1", info.line
        assert daemon.status()["connected"]


OOM_BALLOON = 768 * MIB
OOM_ALLOC_MIB = 600      # more than the guest has once the balloon holds 768 of its 1024 MiB
OOM_WORDS = ("invoked oom-killer", "Out of memory", "oom-kill:")


def _alloc_under_full_balloon(d, name):
    """Inflate the balloon to OOM_BALLOON during a settle step, then let the
    guest touch OOM_ALLOC_MIB. Returns (alloc step marker, daemon status,
    the guest kernel's OOM lines, the balloon marker, the alloc-done or
    alloc-failed marker)."""
    with vhost_guest(d, name, steps=[("settle", "sleep 30"),
                                     ("alloc", f"alloc_touch {OOM_ALLOC_MIB}")]) as g:
        info = g.wait_marker("balloon", timeout=60)
        g.wait_marker("step-start", timeout=30, name="settle")
        d.set_target(OOM_BALLOON)
        st = d.wait_actual(OOM_BALLOON)
        assert st["actual_bytes"] == OOM_BALLOON, f"the balloon did not inflate: {st}"
        assert g.find_marker("step-start", name="alloc") is None, \
            "the allocation started before the balloon was full: the run proves nothing"
        done = g.wait_step("alloc", timeout=240, check_rc=False)
        oom = [ln for ln in g.serial_text().splitlines() if any(w in ln for w in OOM_WORDS)]
        outcome = g.find_marker("alloc-done") or g.find_marker("alloc-failed")
        return done, d.status(), oom, info, outcome


@pytest.mark.daemon_args("--no-reporting", "--deflate-on-oom")
def test_deflate_on_oom_gives_pages_back_to_a_guest_in_need(provisioned, daemon):
    done, st, oom, info, outcome = _alloc_under_full_balloon(daemon, "vub-doom")
    c = st["counters"]
    print(f"\n[deflate-on-oom] alloc rc={done['rc']} actual {st['actual_bytes'] // MIB} MiB "
          f"deflate_pages={c['deflate_pages']} guest OOM lines {len(oom)}")
    assert info["features"][2] == "1", f"DEFLATE_ON_OOM not negotiated: {info.line}"
    assert "DEFLATE_ON_OOM" in st["features_offered"] and "DEFLATE_ON_OOM" in st["features_acked"]
    assert done["rc"] == "0" and outcome.name == "alloc-done", \
        "the guest's allocation failed although the balloon could deflate"
    assert not [ln for ln in oom if "oom-kill:" in ln], f"the guest killed a process: {oom}"
    assert c["deflate_pages"] > 0 and st["actual_bytes"] < OOM_BALLOON, st
    # what the workload needed beyond the guest's free memory came out of the balloon
    assert OOM_BALLOON - st["actual_bytes"] >= 200 * MIB, st


@pytest.mark.daemon_args("--no-reporting")
def test_without_deflate_on_oom_the_guest_kills_its_workload(provisioned, daemon):
    """Control: the same run without the feature fails the workload: the guest
    refuses the mapping (the balloon's pages left its RAM total) or, if it
    got it, its OOM killer ends it."""
    done, st, oom, info, outcome = _alloc_under_full_balloon(daemon, "vub-nodoom")
    print(f"\n[no deflate-on-oom] alloc rc={done['rc']} {outcome.line if outcome else None} "
          f"actual {st['actual_bytes'] // MIB} MiB guest OOM lines {oom[:3]}")
    assert info["features"][2] == "0", info.line
    assert "DEFLATE_ON_OOM" not in st["features_offered"]
    assert done["rc"] != "0", done.line
    assert (outcome is not None and outcome.name == "alloc-failed") or \
        any("oom-kill:" in ln for ln in oom), (done.line, oom)
    assert st["actual_bytes"] == OOM_BALLOON and st["counters"]["deflate_pages"] == 0, st


@pytest.mark.daemon_args("--stats-interval", "1")
def test_stats_keep_coming_after_a_pause_and_resume(provisioned, daemon):
    """QMP stop/cont (virsh suspend/resume, a snapshot): QEMU stops and restarts every
    queue. The guest's statistics must keep coming, and the balloon keep working: the
    host policy decides on them. (Before the fix the device lost the stats buffer it
    held over the stop: stats_age grew for ever.)"""
    g = vhost_guest(daemon, "vub-pause", steps=[("hold", "sleep 600")])
    g.start()
    failed = True
    try:
        g.wait_marker("step-start", name="hold", timeout=180)
        deadline = time.monotonic() + 30
        while (daemon.status().get("stats_age") or 99) > 2:
            assert time.monotonic() < deadline, f"no stats before the pause: {daemon.status()}"
            time.sleep(0.5)
        g.qmp("stop")
        time.sleep(3)
        g.qmp("cont")
        time.sleep(4)                    # four stats intervals
        ages = []
        for _ in range(4):
            ages.append(daemon.status()["stats_age"])
            time.sleep(1)
        print(f"\n[pause] stats age after resume: {ages}")
        assert max(ages) < 3, f"no fresh statistics after the resume: ages {ages}"
        daemon.set_target(64 * MIB)      # and the balloon still follows
        st = daemon.wait_actual(64 * MIB, timeout=60)
        assert st["actual_bytes"] == 64 * MIB, st
        failed = False
    finally:
        g.close(failed=failed)
