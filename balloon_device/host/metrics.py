"""Prometheus metrics: one custom collector that reads every guest's status at scrape time.

Nothing is counted twice: the device keeps its counters (and the discard latency
histogram below); the collector turns a snapshot of them into metric families.
The HTTP server runs in prometheus_client's thread. That thread only *reads*:
``Guest.status()`` copies the counter dicts (one C-level copy each, under the
GIL) and reads plain attributes, and never calls into the device otherwise.

prometheus_client is imported only when the endpoint is started, so the
daemon runs without it when --metrics-port is not given.
"""

import logging
import socket
import threading

from ..latency import DISCARD_BUCKETS  # noqa: F401  (re-exported for the collector)
from .errors import MetricsError
from .version import version

log = logging.getLogger(__name__)

PREFIX = "vhost_user_balloon_"
# counter name in DeviceStatus.counters -> (metric, help, extra labels)
_COUNTERS = {
    "bytes_reported": ("reported_bytes", "Bytes the guest reported free", {}),
    "bytes_discarded": ("discarded_bytes", "Bytes returned to the host",
                        {"source": "reporting"}),
    "bytes_inflate_discarded": ("discarded_bytes", "Bytes returned to the host",
                                {"source": "inflate"}),
    "skipped_poison": ("skipped_bytes", "Reported or inflated bytes not returned, by reason",
                       {"reason": "poison"}),
    "skipped_inhibited": ("skipped_bytes", "", {"reason": "inhibited"}),
    "skipped_unaligned": ("skipped_bytes", "", {"reason": "unaligned"}),
    "skipped_out_of_range": ("skipped_bytes", "", {"reason": "out_of_range"}),
    "skipped_error": ("skipped_bytes", "", {"reason": "error"}),
    "report_chains": ("report_chains", "Free page reporting chains completed", {}),
    "report_ranges": ("report_ranges", "Free ranges in the reporting chains", {}),
    "malformed_chains": ("malformed_chains", "Chains skipped because the driver laid them out "
                                             "wrongly", {}),
    "inflate_pages": ("inflate_pages", "4 KiB pages the guest put into the balloon", {}),
    "deflate_pages": ("deflate_pages", "4 KiB pages the guest took back from the balloon", {}),
    "stats_updates": ("stats_updates", "Memory statistics updates received", {}),
    "config_changes_sent": ("config_changes", "Config change interrupts sent (new targets)", {}),
}


def _collect(guests, policy=None):
    from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                        HistogramMetricFamily)

    fams = {}

    def fam(kind, name, doc, labels):
        if name not in fams:
            fams[name] = kind(PREFIX + name, doc or name, labels=["guest", *labels])
        return fams[name]

    for name, guest in list(guests.items()):
        st = guest.status()
        dev = st.device
        for key, (metric, doc, extra) in _COUNTERS.items():
            if key in dev.counters:
                fam(CounterMetricFamily, metric, doc, list(extra)).add_metric(
                    [name, *extra.values()], dev.counters[key])
        proto = st.protocol
        errors = {"request": proto.get("errors", 0), "ring": proto.get("ring_errors", 0),
                  "disconnect": st.protocol_errors,
                  "internal": st.internal_errors,
                  "malformed_chain": dev.counters.get("malformed_chains", 0)}
        for kind, value in errors.items():
            fam(CounterMetricFamily, "errors",
                "Errors: refused requests, broken rings, protocol errors that dropped the "
                "frontend, internal errors, malformed chains", ["kind"]).add_metric(
                    [name, kind], value)
        fam(CounterMetricFamily, "sessions", "Frontend connections accepted (reconnects + 1)",
            []).add_metric([name], st.sessions)
        fam(GaugeMetricFamily, "connected", "1 while a frontend (QEMU) is connected",
            []).add_metric([name], 1 if st.connected else 0)
        if st.ram_backed_bytes is not None:
            fam(GaugeMetricFamily, "guest_ram_backed_bytes",
                "Host memory allocated to the guest's RAM files now (memfd/hugetlbfs st_blocks)",
                []).add_metric([name], st.ram_backed_bytes)
        fam(GaugeMetricFamily, "target_bytes", "Balloon target (memory asked from the guest)",
            []).add_metric([name], dev.target_bytes)
        fam(GaugeMetricFamily, "actual_bytes", "Balloon size the guest reports", []).add_metric(
            [name], dev.actual_bytes)
        fam(GaugeMetricFamily, "guest_memory_bytes", "Guest RAM shared with the daemon",
            []).add_metric([name], st.memory_bytes)
        if dev.last_report_age is not None:
            fam(GaugeMetricFamily, "last_report_age_seconds",
                "Seconds since the last free page report", []).add_metric(
                    [name], dev.last_report_age)
        for stat, value in sorted(dev.stats.items()):
            fam(GaugeMetricFamily, "guest_stat",
                "Latest guest memory statistic (bytes for *_memory / disk_caches, else counts)",
                ["stat"]).add_metric([name, stat], value)
        if dev.stats_age is not None:
            fam(GaugeMetricFamily, "guest_stats_age_seconds",
                "Seconds since the guest last sent memory statistics", []).add_metric(
                    [name], dev.stats_age)
        lat = dev.discard_latency
        if lat:
            cum, buckets = 0, []
            for bound, count in zip(lat["buckets"] + ["+Inf"], lat["counts"]):
                cum += count
                buckets.append((str(bound) if bound != "+Inf" else "+Inf", cum))
            fam(HistogramMetricFamily, "discard_seconds",
                "Time spent in one discard call (fallocate/madvise of a chain's ranges)",
                []).add_metric([name], buckets, sum_value=lat["sum"])
    yield from fams.values()
    info = GaugeMetricFamily(PREFIX + "build_info", "The daemon's version (value 1)",
                             labels=["version"])
    info.add_metric([version()], 1)
    yield info
    last = policy.last if policy is not None else None
    if last:
        g = GaugeMetricFamily(PREFIX + "policy_host_available_bytes",
                              "Host memory available as the policy last read it")
        g.add_metric([], last["host_available"])
        yield g
        g = GaugeMetricFamily(PREFIX + "policy_pressure",
                              "1 if the policy saw host memory pressure on its last tick")
        g.add_metric([], 1 if last["pressure"] else 0)
        yield g
        c = CounterMetricFamily(PREFIX + "policy_sweeps",
                                "Sweeps the policy completed (balloon raised and lowered to "
                                "flush a quiet guest's per-CPU free lists)", labels=["guest"])
        for name, n in sorted(last.get("sweeps", {}).items()):
            c.add_metric([name], n)
        yield c
        c = CounterMetricFamily(PREFIX + "policy_fast_reclaims",
                                "Fast reclaims completed (balloon raised by the guest's free "
                                "memory under pressure until it got there)", labels=["guest"])
        for name, n in sorted(last.get("fast_done", {}).items()):
            c.add_metric([name], n)
        yield c
        g = GaugeMetricFamily(PREFIX + "policy_fast_reclaim_target_bytes",
                              "Balloon target of a fast reclaim in progress", labels=["guest"])
        for name, pages in sorted(last.get("fast", {}).items()):
            g.add_metric([name], pages * 4096)
        yield g
        g = GaugeMetricFamily(PREFIX + "policy_stalling",
                              "1 while the guest's QEMU counts as stalling on host memory "
                              "(taskstats): its balloon goes back first", labels=["guest"])
        for name in sorted(last.get("targets", {})):
            g.add_metric([name], 1 if name in last.get("stalling", ()) else 0)
        yield g
        pres = last.get("host_pressure", {})
        g = GaugeMetricFamily(PREFIX + "qemu_memory_stall_ms_per_second",
                              "Milliseconds per second the guest's QEMU waited on host memory "
                              "over the last policy tick (taskstats delay accounting)",
                              labels=["guest", "kind"])
        f = GaugeMetricFamily(PREFIX + "qemu_page_faults_per_second",
                              "Page faults per second of the guest's QEMU over the last "
                              "policy tick", labels=["guest", "kind"])
        for name, p in sorted(pres.items()):
            for kind in ("reclaim", "thrashing", "swapin"):
                g.add_metric([name, kind], p[f"{kind}_ms_per_s"])
            g.add_metric([name, "total"], p["stall_ms_per_s"])
            f.add_metric([name, "major"], p["major_faults_per_s"])
            f.add_metric([name, "minor"], p["minor_faults_per_s"])
        yield g
        yield f


class BalloonCollector:
    """prometheus_client custom collector over a {name: Guest} mapping."""

    def __init__(self, guests, policy=None):
        self.guests = guests
        self.policy = policy

    def collect(self):
        return _collect(self.guests, self.policy)

    def describe(self):
        return []  # no fixed description: families depend on the guests' stats


class MetricsServer:
    """The HTTP endpoint (/metrics) in its own thread; works with any prometheus_client
    that has generate_latest (Debian 12 ships 0.16)."""

    def __init__(self, guests, address="127.0.0.1", port=9000, policy=None):
        try:
            from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry,
                                           ProcessCollector, generate_latest)
        except ImportError as e:
            raise MetricsError("--metrics-port needs the prometheus_client package "
                               "(pip install prometheus_client)") from e
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.registry = registry = CollectorRegistry(auto_describe=False)
        registry.register(BalloonCollector(guests, policy))
        ProcessCollector(registry=registry)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.split("?", 1)[0] not in ("/", "/metrics"):
                    self.send_error(404, "only /metrics here")
                    return
                body = generate_latest(registry)
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            address_family = socket.AF_INET6 if ":" in address else socket.AF_INET

        try:
            self.httpd = Server((address, port), Handler)
        except OSError as e:
            raise MetricsError(f"cannot serve metrics on {address}:{port}: "
                               f"{e.strerror or e}") from e
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics",
                                       daemon=True)
        self.thread.start()
        self.address = address
        self.port = self.httpd.server_port
        log.info("metrics on http://%s:%d/metrics", address, self.port)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
