"""Prometheus endpoint: scraped over HTTP on 127.0.0.1 (ephemeral port) from a
daemon serving two guests; values come from the devices at scrape time."""

import os
import threading
import urllib.request

import pytest

from balloon_device.latency import LatencyHistogram
from test_multi import GuestRig, make_daemon

# a hard dependency: when it is missing this import FAILS the module (no skip)
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

MiB = 1 << 20


def scrape(daemon):
    url = f"http://127.0.0.1:{daemon.metrics.port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name, **labels):
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def daemon(tmp_path):
    d = make_daemon(tmp_path, metrics_port=0)
    yield d
    d.close()


def test_histogram_buckets():
    h = LatencyHistogram(buckets=(0.001, 0.01))
    for s in (0.0005, 0.001, 0.005, 2.0):
        h.observe(s)
    snap = h.snapshot()
    assert snap["counts"] == [2, 1, 1]  # <= 1 ms (inclusive), <= 10 ms, +Inf
    assert snap["sum"] == pytest.approx(2.0065)


def test_scrape_per_guest(daemon):
    a = GuestRig(daemon, "a")
    try:
        assert a.report(6 * MiB) == 6 * MiB
        a.report(2 * MiB)
        daemon.guests["a"].set_target(2560)
        a.fe.pump()
        s = scrape(daemon)
        P = "vhost_user_balloon_"
        assert value(s, P + "reported_bytes_total", guest="a") == 8 * MiB
        assert value(s, P + "discarded_bytes_total", guest="a", source="reporting") == 8 * MiB
        assert value(s, P + "reported_bytes_total", guest="b") == 0
        assert value(s, P + "report_chains_total", guest="a") == 2
        assert value(s, P + "discard_seconds_count", guest="a") == 2
        assert value(s, P + "discard_seconds_bucket", guest="a", le="+Inf") == 2
        assert value(s, P + "discard_seconds_count", guest="b") == 0
        assert value(s, P + "target_bytes", guest="a") == 10 * MiB
        assert value(s, P + "connected", guest="a") == 1
        assert value(s, P + "connected", guest="b") == 0
        assert value(s, P + "sessions_total", guest="a") == 1
        assert value(s, P + "guest_memory_bytes", guest="a") == 64 * MiB
        backed = os.fstat(a.mem.fd).st_blocks * 512      # the rig's memfd, as the host sees it
        assert 0 < value(s, P + "guest_ram_backed_bytes", guest="a") == backed
        assert (P + "guest_ram_backed_bytes", (("guest", "b"),)) not in s   # no memory table
        assert value(s, P + "skipped_bytes_total", guest="a", reason="poison") == 0
        assert value(s, P + "errors_total", guest="a", kind="disconnect") == 0
        a.fe.send_raw(b"\xff" * 12)  # protocol error: counted as a disconnect error
        a.fe.pump()
        s = scrape(daemon)
        assert value(s, P + "errors_total", guest="a", kind="disconnect") == 1
        assert value(s, P + "connected", guest="a") == 0
    finally:
        a.close()


def test_guest_stats_are_exported(daemon):
    guest = daemon.guests["b"]
    guest.device.latest_stats = {"available_memory": 123 << 20, "free_memory": 100 << 20}
    s = scrape(daemon)
    assert value(s, "vhost_user_balloon_guest_stat", guest="b", stat="available_memory") == 123 << 20
    assert ("vhost_user_balloon_guest_stat", (("guest", "a"), ("stat", "free_memory"))) not in s


def test_scraping_while_the_loop_works(daemon):
    """The HTTP thread reads snapshots while the loop thread keeps reporting."""
    a = GuestRig(daemon, "a")
    errors, seen = [], []
    stop = threading.Event()
    first = threading.Event()

    def reported():
        return value(scrape(daemon), "vhost_user_balloon_reported_bytes_total", guest="a")

    def scraper():
        while not stop.is_set():
            try:
                seen.append(reported())
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)
                return
            finally:
                first.set()
    t = threading.Thread(target=scraper)
    t.start()
    try:
        assert first.wait(10), "the scraper never ran"
        for _ in range(40):
            a.report(2 * MiB)
    finally:
        stop.set()
        t.join()
    try:
        assert not errors
        seen.append(reported())   # after the last report
        assert seen[0] == 0 and seen[-1] == 40 * 2 * MiB, (seen[0], seen[-1])
        assert seen == sorted(seen)  # counters never go backwards
    finally:
        a.close()


def test_port_in_use_is_a_clear_error(tmp_path):
    import socket
    from balloon_device.host.metrics import MetricsError
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        with pytest.raises(MetricsError, match="cannot serve metrics on 127.0.0.1"):
            make_daemon(tmp_path, metrics_port=busy.getsockname()[1])
        # nothing was left behind: the guests' sockets were closed again
        assert not (tmp_path / "a.sock").exists()
    finally:
        busy.close()


def test_build_info_carries_the_version(daemon):
    from balloon_device.host.version import version
    s = scrape(daemon)
    assert value(s, "vhost_user_balloon_build_info", version=version()) == 1
    assert [k for k in s if k[0] == "vhost_user_balloon_build_info"] == [
        ("vhost_user_balloon_build_info", (("version", version()),))]


def test_qemu_pressure_from_taskstats_is_exported(tmp_path):
    """The frontend's pid (SO_PEERCRED: here this test process) goes to taskstats on each
    policy tick; the rates show in the metrics and in ctl status. Real taskstats: needs
    CAP_NET_ADMIN (CI runs as root)."""
    from balloon_device.host.control import ControlServer
    from balloon_device.host.policy import HostMemory, PolicyConfig
    d = make_daemon(tmp_path, metrics_port=0, policy=PolicyConfig(interval=60))
    d.policy.read_host = lambda: HostMemory(64 << 30)
    a = GuestRig(d, "a")
    try:
        assert d.guests["a"].status().frontend_pid == os.getpid()
        assert d.guests["b"].status().frontend_pid is None
        d.policy.tick()
        d.policy.tick()                              # rates need two samples
        last = d.policy.last
        assert last["taskstats_error"] is None
        assert last["host_pressure"]["a"]["pid"] == os.getpid()
        assert "b" not in last["host_pressure"]      # not connected: no pid
        s = scrape(d)
        P = "vhost_user_balloon_"
        assert value(s, P + "qemu_memory_stall_ms_per_second", guest="a", kind="total") >= 0
        assert value(s, P + "qemu_page_faults_per_second", guest="a", kind="minor") >= 0
        assert value(s, P + "policy_stalling", guest="a") == 0
        ctl = ControlServer.__new__(ControlServer)   # the status command alone, no socket
        ctl.guests, ctl.policy = d.guests, d.policy
        st = ctl._status(d.guests["a"])
        assert st["frontend_pid"] == os.getpid()
        assert st["policy"]["host_pressure"]["pid"] == os.getpid()
        assert st["policy"]["stalling"] is False and st["policy"]["fast_reclaims"] == 0
    finally:
        a.close()
        d.close()
