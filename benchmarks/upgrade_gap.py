#!/usr/bin/env python3
"""`ctl upgrade` under reporting load: completions lost or duplicated, and the gap.

    python benchmarks/upgrade_gap.py [--upgrades 20] [--kills 20] [--interval 2]
                                     [--baseline 5] [--inflight 4]

No guest. The daemon runs under its built-in supervisor (the default); this script is
the frontend: QEMU's handshake over the daemon's socket (vhostuser.testing's
RemoteFrontend) with a driver's rings in a memfd, and it keeps the reporting queue
busy: --inflight chains of 4 x 2 MiB ranges always posted (each range touched first,
as a guest's freed page would be), each used chain reaped at once and replaced.
Completions are counted by head: a head used while not in flight is a duplicate, a
chain posted and never used by the end is lost.

Phases, one after the other in the same run: --baseline seconds of plain load (the
reference: the normal time between two completions), then --upgrades `ctl upgrade`s
--interval seconds apart, then --kills SIGKILLs of the serving process at the same
pace (the crash path, for comparison). For each upgrade or kill, the gap is the
longest time without a completion that overlaps it (from the last completion before
it to the first one after, taken over the interval that follows it). Printed: lost,
duplicated, gap p50/max per column, and their ratio to the normal inter-completion
gap (p50 and max of the baseline). Writes benchmarks/results/upgrade_gap/.
Nothing is asserted: the figures are printed (docs/reliability.md quotes them).
"""
from __future__ import annotations

import argparse
import os
import select
import signal
import struct
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MIB, Results, env_lines, environment, f, md_table, pct, ratio  # noqa: E402

from balloon_device import features as F  # noqa: E402
from balloon_device.host.harness.daemon import Daemon  # noqa: E402
from vhostuser import messages as m  # noqa: E402
from vhostuser.messages import Request as R  # noqa: E402
from vhostuser.testing.driver import DriverQueue, GuestMemory  # noqa: E402
from vhostuser.testing.frontend import RemoteFrontend  # noqa: E402

QSIZE = 64
RANGE = 2 * MIB
RANGES_PER_CHAIN = 4


class Frontend:
    """QEMU's handshake, then the four balloon queues on a driver in a memfd."""

    def __init__(self, path, mem_mib):
        self.mem = GuestMemory(mem_mib * MIB)
        self.fe = RemoteFrontend(path)
        offered = self.fe.handshake()
        features = offered & ~(1 << 30)
        assert self.fe.ack(R.SET_FEATURES, m.U64.pack(features | (1 << 30))) == 0
        assert self.fe.set_mem_table(
            [(g, s, u, o, self.mem.fd) for g, s, u, o in self.mem.layout]) == 0
        self.q, self.kicks, self.calls = {}, {}, {}
        for index, role in enumerate(F.queue_roles(features)):
            dq = DriverQueue(self.mem, QSIZE)
            kick, call = self.fe.start_queue(index, QSIZE, dq.desc_uva, dq.avail_uva, dq.used_uva)
            self.q[role], self.kicks[role], self.calls[role] = dq, kick, call
        n = (mem_mib * MIB - 4 * MIB) // RANGE
        self.ranges = [self.mem.alloc(RANGE, align=RANGE) for _ in range(n)]
        self.next_range = 0

    def post_report(self):
        dq = self.q["reporting"]
        bufs = []
        for _ in range(RANGES_PER_CHAIN):
            gpa = self.ranges[self.next_range]
            self.next_range = (self.next_range + 1) % len(self.ranges)
            self.mem.write(gpa, b"\x5a")  # the guest used the page before freeing it
            bufs.append((gpa, RANGE))
        head = dq.add([], bufs)
        os.eventfd_write(self.kicks["reporting"], 1)
        return head

    def reap(self):
        """Used chains of the reporting queue, one at a time: (heads used, duplicates).
        A head used while not in flight is counted and skipped, not raised."""
        dq = self.q["reporting"]
        heads, dups = [], 0
        while dq.last_used != dq.used_idx:
            slot = dq.last_used & (dq.size - 1)
            uid, _ = struct.unpack("<II", dq.mem.read(dq.used_gpa + 4 + 8 * slot, 8))
            rec = dq.inflight.pop(uid, None)
            if rec is None:
                dups += 1
            else:
                dq._next[rec.descs[-1]] = dq.free_head
                dq.free_head = rec.head
                dq.num_free += len(rec.descs)
                dq.release(rec)
                heads.append(uid)
            dq.last_used = (dq.last_used + 1) & 0xFFFF
        return heads, dups

    def close(self):
        self.fe.close()
        self.mem.close()


class Load:
    """Keeps `inflight` chains posted; records each completion's time."""

    def __init__(self, front, inflight):
        self.front = front
        self.inflight = inflight
        self.posted = self.used = self.dups = 0
        self.outstanding = set()
        self.times = []
        self.stop = threading.Event()
        self.error = None

    def run(self):
        call = self.front.calls["reporting"]
        try:
            while not self.stop.is_set():
                while len(self.outstanding) < self.inflight:
                    self.outstanding.add(self.front.post_report())
                    self.posted += 1
                select.select([call], [], [], 0.005)
                try:
                    os.eventfd_read(call)
                except BlockingIOError:
                    pass
                self._reap()
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            self.error = e

    def _reap(self):
        heads, dups = self.front.reap()
        now = time.monotonic()
        self.dups += dups
        for h in heads:
            if h in self.outstanding:
                self.outstanding.discard(h)
                self.used += 1
                self.times.append(now)
            else:
                self.dups += 1

    def drain(self, timeout):
        deadline = time.monotonic() + timeout
        while self.outstanding and time.monotonic() < deadline:
            time.sleep(0.01)
            self._reap()


def gaps_between(times, start, end):
    """Inter-completion intervals of completions in [start, end]."""
    ts = sorted({t for t in times if start <= t <= end})  # one reap: one time
    return [b - a for a, b in zip(ts, ts[1:])]


def gap_around(times, t_event, until):
    """The longest time without a completion overlapping the event: from the last
    completion before t_event to the first after it, and every interval up to `until`."""
    before = [t for t in times if t <= t_event]
    after = [t for t in times if t_event < t <= until]
    pts = ([before[-1]] if before else [t_event]) + after
    if len(pts) < 2:
        return until - pts[0]
    return max(b - a for a, b in zip(pts, pts[1:]))


def wait_new_pid(d, old, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            st = d.status()
            if st["process"]["pid"] != old and st["connected"]:
                return st
        except Exception:  # noqa: BLE001 - the control socket is away during the restart
            pass
        time.sleep(0.02)
    raise RuntimeError(f"no new serving process after {timeout}s:\n{d.log_text(40)}")


def events(d, kind, n, interval, log):
    """n upgrades or kills, `interval` s apart: [(t_event, t_serving, restored)]."""
    out = []
    for i in range(n):
        time.sleep(interval / 2)
        st = d.status()
        old = st["process"]["pid"]
        t0 = time.monotonic()
        if kind == "upgrade":
            d.ctl({"cmd": "upgrade"})
        else:
            os.kill(old, signal.SIGKILL)
        st = wait_new_pid(d, old)
        t1 = time.monotonic()
        out.append((t0, t1, bool(st["process"]["restored"])))
        log(f"{kind} {i + 1}/{n}: pid {old} -> {st['process']['pid']}, serving again after "
            f"{(t1 - t0) * 1e3:.0f} ms")
        time.sleep(interval / 2)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--upgrades", type=int, default=20)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--interval", type=float, default=2.0, help="seconds between events")
    ap.add_argument("--baseline", type=float, default=5.0, help="seconds of plain load first")
    ap.add_argument("--inflight", type=int, default=4, help="reporting chains kept posted")
    ap.add_argument("--mem-mib", type=int, default=256)
    ap.add_argument("--out", default=None)
    ns = ap.parse_args(argv)

    res = Results("upgrade_gap", ns.out)
    res.data["environment"] = environment()
    res.data["params"] = vars(ns)
    d = Daemon(args=[], log_level="info").start()
    front = load = None
    try:
        front = Frontend(d.socket_path, ns.mem_mib)
        load = Load(front, ns.inflight)
        th = threading.Thread(target=load.run, daemon=True)
        th.start()
        t_start = time.monotonic()
        time.sleep(ns.baseline)
        t_base = time.monotonic()
        ups = events(d, "upgrade", ns.upgrades, ns.interval, print)
        kills = events(d, "kill", ns.kills, ns.interval, print)
        t_end = time.monotonic()
        load.stop.set()
        th.join(10)
        if load.error:
            raise load.error
        load.drain(30)
        alive = d.alive() and front.fe.alive
    finally:
        if load is not None:
            load.stop.set()
        if front is not None:
            front.close()
        d.stop()

    normal = gaps_between(load.times, t_start + 0.5, t_base)  # between two reaps
    ref50, ref_max = pct(normal, 50), max(normal) if normal else None

    def column(evs):
        gaps = []
        for i, (t0, t1, _) in enumerate(evs):
            until = min(evs[i + 1][0] if i + 1 < len(evs) else t_end, t1 + ns.interval / 2)
            gaps.append(gap_around(load.times, t0, until))
        serve = [t1 - t0 for t0, t1, _ in evs]
        return {"events": len(evs), "restored": sum(r for _, _, r in evs),
                "gap_p50_s": pct(gaps, 50), "gap_max_s": max(gaps) if gaps else None,
                "serving_again_p50_s": pct(serve, 50),
                "serving_again_max_s": max(serve) if serve else None, "gaps_s": gaps}

    cols = {"upgrade": column(ups), "kill": column(kills)}
    lost = len(load.outstanding)
    res.data.update({"posted": load.posted, "used": load.used, "lost": lost,
                     "duplicated": load.dups, "frontend_and_supervisor_alive": alive,
                     "normal_gap_p50_s": ref50, "normal_gap_max_s": ref_max,
                     "normal_reaps": len(normal) + 1, "columns": cols})
    ms = "{:.0f}"
    rows = []
    for name, c in cols.items():
        rows.append(["`ctl upgrade`" if name == "upgrade" else "SIGKILL", c["events"],
                     c["restored"], f(c["serving_again_p50_s"] * 1e3, ms),
                     f(c["gap_p50_s"] * 1e3, ms), f(c["gap_max_s"] * 1e3, ms),
                     f(ratio(c["gap_p50_s"], ref50), "{:.0f}x"),
                     f(ratio(c["gap_max_s"], ref_max), "{:.1f}x")])
    md = "\n".join([
        f"chains posted {load.posted}, used {load.used}, **lost {lost}, duplicated "
        f"{load.dups}**; frontend socket and supervisor alive at the end: {alive}",
        "",
        f"normal inter-completion gap (first {ns.baseline:g} s, {len(normal) + 1} reaps, "
        f"{ns.inflight} chains of {RANGES_PER_CHAIN} x 2 MiB in flight): p50 "
        f"{f(ref50 * 1e3, '{:.2f}')} ms, max {f(ref_max * 1e3, '{:.1f}')} ms",
        "",
        md_table(["event", "count", "session restored", "serving again p50 (ms)",
                  "gap p50 (ms)", "gap max (ms)", "gap p50 / normal p50",
                  "gap max / normal max"], rows),
        "", *env_lines(res.data["environment"])])
    res.write(md)
    return 0 if lost == 0 and load.dups == 0 and alive else 1


if __name__ == "__main__":
    sys.exit(main())
