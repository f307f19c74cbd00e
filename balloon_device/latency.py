"""Discard latency histogram: plain counts the device keeps; the host side
exports them (Prometheus, status)."""

import bisect

# discard calls take ~10 us (one 2 MiB punch) to tens of ms (a 256 MiB pass)
DISCARD_BUCKETS = (0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                   0.025, 0.05, 0.1, 0.25, 1.0)


class LatencyHistogram:
    """Fixed buckets, plain counts; observe() runs in the event loop thread only."""

    def __init__(self, buckets=DISCARD_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, seconds):
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.sum += seconds

    def snapshot(self):
        return {"buckets": list(self.buckets), "counts": list(self.counts), "sum": self.sum}
