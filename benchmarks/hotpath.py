#!/usr/bin/env python3
"""Hot path: reporting chains through the real daemon vs a bare C fallocate loop.

    python benchmarks/hotpath.py [--mem-gib 4] [--refill touch|fallocate]

No guest.  This script is the frontend: it starts the daemon as a subprocess
(`python -m balloon_device.host.cli --socket-path ...`), connects to its Unix
socket and speaks vhost-user as QEMU does (features incl. REPORTING and
EVENT_IDX, protocol features with REPLY_ACK, SET_MEM_TABLE with a --mem-gib
GiB memfd mapped MAP_SHARED, the reporting queue (index 3, 64 entries) with
kick and call eventfds).  Then, like Linux's page_reporting, it keeps one
chain in flight: post a chain of device-writable ranges, kick, wait for the
call, reap the used entry, post the next one.  Per-chain latency is post
(kick) to used (call received).

Shapes: 32 x 2 MiB (what Linux sends), 1 x 4 MiB, 32 x 4 KiB (contiguous
4 KiB pieces: the daemon does one fallocate per piece, it does not merge).

Memory state before each batch of chains (--refill): `touch` (default)
writes every page through this process's shared mapping, as a guest does
through QEMU's, so every punch frees allocated pages *and* zaps page-table
entries of a mapping (like the real case); `fallocate` allocates the pages
without mapping them.  Refilling is timed separately and is not part of
any figure (it is the frontend's cost, not the daemon's).  A last run
("holes") posts 32 x 2 MiB chains over memory that is already free: the
punch costs only the syscall, so it shows the per-chain software overhead.

The limit: vub_punch_loop() (C, one fallocate(PUNCH_HOLE|KEEP_SIZE) per
piece) over the same offsets of the same memfd, after the same refill,
interleaved batch by batch with the daemon's.  Figures: chains/s, GiB/s,
daemon CPU s per GiB (utime+stime from /proc/PID/stat), latency p50/p99,
ratio daemon/limit (limit time / daemon time: 1.0 = as fast as the loop).
Writes benchmarks/results/hotpath/.
"""
from __future__ import annotations

import argparse
import array
import ctypes
import os
import select
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (GIB, MIB, Results, cpu_seconds, env_lines, environment, f,  # noqa: E402
                    md_table, pct, proc_memory, pyplot, ratio)

from balloon_device.discard.engine import c_module  # noqa: E402
from balloon_device import features as F  # noqa: E402
from vhostuser.testing.driver import DriverQueue, GuestMemory  # noqa: E402
from balloon_device.host.harness.daemon import Daemon  # noqa: E402
from vhostuser import messages as m  # noqa: E402
from vhostuser.device import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX  # noqa: E402
from vhostuser.messages import ProtocolFeature as PF  # noqa: E402
from vhostuser.messages import Request as R  # noqa: E402

KIB = 1 << 10
PROTOCOL_FEATURES_BIT = 1 << 30
WANT_PROTOCOL = (1 << PF.MQ) | (1 << PF.REPLY_ACK) | (1 << PF.CONFIG) | (1 << PF.RESET_DEVICE)
RING_AREA = 4 * MIB     # the ring lives at the start of guest memory; chains use the rest
SHAPES = {  # name: (pieces per chain, piece bytes, max chains per batch)
    "32x2MiB": (32, 2 * MIB, None),
    "1x4MiB": (1, 4 * MIB, None),
    "32x4KiB": (32, 4 * KIB, 4000),
}


class SocketFrontend:
    """QEMU's side of vhost-user over a real Unix socket (blocking, one request at a time)."""

    def __init__(self, path, timeout=10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.protocol = 0

    def send(self, req, payload=b"", fds=(), need_reply=False):
        data = m.encode(req, payload, m.VERSION | (m.FLAG_NEED_REPLY if need_reply else 0))
        if fds:
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                        array.array("i", fds).tobytes())])
        else:
            self.sock.sendall(data)

    def recv(self, req):
        head = b""
        while len(head) < m.HEADER.size:
            chunk = self.sock.recv(m.HEADER.size - len(head))
            if not chunk:
                raise ConnectionError("daemon closed the connection")
            head += chunk
        r, flags, size = m.HEADER.unpack(head)
        body = b""
        while len(body) < size:
            body += self.sock.recv(size - len(body))
        if r != req or not flags & m.FLAG_REPLY:
            raise RuntimeError(f"unexpected reply {r} flags {flags:#x} to {req}")
        return body

    def get_u64(self, req):
        self.send(req)
        return m.U64.unpack(self.recv(req))[0]

    def request(self, req, payload=b"", fds=()):
        """Send; with REPLY_ACK wait for the ack and check it is 0."""
        ack = bool(self.protocol & (1 << PF.REPLY_ACK))
        self.send(req, payload, fds, need_reply=ack)
        if ack:
            rc = m.U64.unpack(self.recv(req))[0]
            if rc != 0:
                raise RuntimeError(f"{R(req).name} failed: {rc}")

    def close(self):
        self.sock.close()


def setup(fe, mem, dq, qindex):
    feats = fe.get_u64(R.GET_FEATURES)
    if not feats & PROTOCOL_FEATURES_BIT:
        raise RuntimeError("daemon does not offer VHOST_USER_F_PROTOCOL_FEATURES")
    fe.protocol = fe.get_u64(R.GET_PROTOCOL_FEATURES) & WANT_PROTOCOL
    fe.send(R.SET_PROTOCOL_FEATURES, m.U64.pack(fe.protocol))
    nq = fe.get_u64(R.GET_QUEUE_NUM)
    fe.request(R.SET_OWNER)
    want = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | F.STATS_VQ | F.REPORTING | \
        PROTOCOL_FEATURES_BIT
    acked = feats & want
    if not acked & F.REPORTING:
        raise RuntimeError("daemon does not offer REPORTING")
    fe.request(R.SET_FEATURES, m.U64.pack(acked))
    gpa, size, uaddr, off = mem.layout[0]
    fe.request(R.SET_MEM_TABLE, m.MEM_TABLE_HEAD.pack(1, 0) + m.MEM_REGION.pack(gpa, size, uaddr, off),
               [mem.fd])
    fe.request(R.SET_VRING_NUM, m.VRING_STATE.pack(qindex, dq.size))
    fe.request(R.SET_VRING_BASE, m.VRING_STATE.pack(qindex, 0))
    fe.request(R.SET_VRING_ADDR, m.VRING_ADDR.pack(qindex, 0, dq.desc_uva, dq.used_uva,
                                                   dq.avail_uva, 0))
    kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    fe.request(R.SET_VRING_CALL, m.U64.pack(qindex), [call])
    fe.request(R.SET_VRING_KICK, m.U64.pack(qindex), [kick])
    fe.request(R.SET_VRING_ENABLE, m.VRING_STATE.pack(qindex, 1))
    return {"features": acked, "protocol": fe.protocol, "queues": nq, "kick": kick, "call": call,
            "event_idx": bool(acked & VIRTIO_RING_F_EVENT_IDX)}


class Bench:
    def __init__(self, ns):
        self.ns = ns
        size = ns.mem_gib * GIB
        self.mem = GuestMemory(size, guard=False)
        self.size = size
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.mem.mm))
        self.ffi, self.lib = c_module().ffi, c_module().lib
        self.done = self.ffi.new("uint64_t *")
        self.daemon = Daemon(tempfile.mkdtemp(prefix="vub-hotpath-"), log_level="info",
                             args=ns.daemon_args.split() if ns.daemon_args else ())
        self.daemon.start()
        self.serving = self.daemon.serving_pid()
        self.fe = SocketFrontend(self.daemon.socket_path)
        roles = F.queue_roles(F.offered())
        self.qindex = roles.index("reporting")
        self.dq = DriverQueue(self.mem, 64, event_idx=True)
        self.info = setup(self.fe, self.mem, self.dq, self.qindex)
        self.dq.event_idx = self.info["event_idx"]
        self.kick_fd, self.call_fd = self.info["kick"], self.info["call"]
        self.poll = select.poll()
        self.poll.register(self.call_fd, select.POLLIN)
        self.stalls = 0
        self.data_gpa = self.mem.start + RING_AREA
        self.data_off = RING_AREA
        self.data_len = size - RING_AREA

    # -- memory state ------------------------------------------------------------
    def refill(self, off, length, how):
        t = time.perf_counter()
        if how == "touch":
            ctypes.memset(self.addr + off, 0x5A, length)
        elif how == "fallocate":
            os.posix_fallocate(self.mem.fd, off, length)
        return time.perf_counter() - t

    def allocated(self):
        return os.fstat(self.mem.fd).st_blocks * 512

    # -- one chain through the daemon --------------------------------------------
    def post_and_wait(self, ranges):
        dq = self.dq
        dq.add([], ranges)
        if dq.event_idx:
            dq.set_used_event(dq.last_used)
        notify = dq.kick()
        t0 = time.perf_counter_ns()
        if notify:
            os.eventfd_write(self.kick_fd, 1)
        while True:
            if self.poll.poll(2000):
                try:
                    os.eventfd_read(self.call_fd)
                except BlockingIOError:
                    continue
            else:
                self.stalls += 1  # no call within 2 s: kick again (counted)
                os.eventfd_write(self.kick_fd, 1)
                continue
            if dq.used_idx != dq.last_used:
                break
        t1 = time.perf_counter_ns()
        used = dq.pop_used()
        assert len(used) == 1, used
        return t1 - t0

    def slots(self, n, piece):
        return self.data_len // (n * piece)

    def daemon_batch(self, n, pieces, piece, chains, refill):
        """`chains` chains of n pieces from the data area (wrapping around when
        there are more chains than fit); returns per-chain ns etc."""
        slots = self.slots(n, piece)
        span = min(chains, slots) * n * piece
        refill_s = self.refill(self.data_off, span, refill)
        before = self.allocated()
        lat = []
        cpu0 = cpu_seconds(self.serving)
        t0 = time.perf_counter()
        for k in range(chains):
            base = self.data_gpa + (k % slots) * n * piece
            lat.append(self.post_and_wait([(base + i * piece, piece) for i in range(n)]))
        wall = time.perf_counter() - t0
        cpu = cpu_seconds(self.serving) - cpu0
        freed = before - self.allocated()
        return {"lat_ns": lat, "wall_s": wall, "cpu_s": cpu, "freed": freed,
                "refill_s": refill_s, "bytes": chains * n * piece}

    def limit_batch(self, n, pieces, piece, chains, refill):
        slots = self.slots(n, piece)
        span = min(chains, slots) * n * piece
        refill_s = self.refill(self.data_off, span, refill)
        before = self.allocated()
        lat = []
        cpu0 = time.thread_time()
        t0 = time.perf_counter()
        for k in range(chains):
            off = self.data_off + (k % slots) * n * piece
            t = time.perf_counter_ns()
            rc = self.lib.vub_punch_loop(self.mem.fd, off, piece, n, self.done)
            lat.append(time.perf_counter_ns() - t)
            if rc != 0:
                raise OSError(-rc, "vub_punch_loop")
        wall = time.perf_counter() - t0
        cpu = time.thread_time() - cpu0
        freed = before - self.allocated()
        return {"lat_ns": lat, "wall_s": wall, "cpu_s": cpu, "freed": freed,
                "refill_s": refill_s, "bytes": chains * n * piece}

    def close(self):
        st = self.daemon.status() if self.daemon.alive() else None
        mem = proc_memory(self.daemon.pid) if self.daemon.alive() else None
        self.fe.close()
        rc = self.daemon.wait_exit(10)
        if rc is None:
            self.daemon.stop()
        for fd in (self.kick_fd, self.call_fd):
            os.close(fd)
        self.addr = None
        try:
            self.mem.close()
        except BufferError:
            pass  # the ctypes view still pins the mmap; the process exits anyway
        return st, mem


def summarize(batches, chain_bytes):
    lat = [x for b in batches for x in b["lat_ns"]]
    nbytes = sum(b["bytes"] for b in batches)
    wall = sum(b["wall_s"] for b in batches)
    cpu = sum(b["cpu_s"] for b in batches)
    freed = sum(b["freed"] for b in batches)
    busy = sum(lat) / 1e9
    return {
        "chains": len(lat), "bytes": nbytes, "freed_bytes": freed,
        "p50_us": pct(lat, 50) / 1e3, "p99_us": pct(lat, 99) / 1e3,
        "mean_us": busy / len(lat) * 1e6,
        "chains_per_s": len(lat) / wall, "gib_per_s_wall": nbytes / GIB / wall,
        "gib_per_s_busy": nbytes / GIB / busy,
        "gib_per_s_p50": chain_bytes / GIB / (pct(lat, 50) / 1e9),
        "cpu_s": cpu, "cpu_s_per_gib": cpu / (nbytes / GIB) if nbytes else None,
        "cpu_us_per_chain": cpu / len(lat) * 1e6,
        "wall_s": wall, "refill_s": sum(b["refill_s"] for b in batches),
        "lat_us_sample": [round(x / 1e3, 1) for x in lat[:: max(1, len(lat) // 400)]],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mem-gib", type=int, default=4)
    ap.add_argument("--refill", default="touch", choices=("touch", "fallocate"))
    ap.add_argument("--batches", type=int, default=4,
                    help="batches per shape and side (each batch covers the memfd once)")
    ap.add_argument("--holes-chains", type=int, default=1000)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--daemon-args", default="", help="extra daemon arguments")
    ap.add_argument("--out", help="results folder (default benchmarks/results/hotpath)")
    ns = ap.parse_args()
    try:
        c_module()
    except ImportError as e:
        sys.exit(str(e))
    res = Results("hotpath", ns.out)
    res.data["environment"] = environment()
    res.data["params"] = vars(ns)
    b = Bench(ns)
    res.data["negotiated"] = {"features": F.names(b.info["features"]),
                              "protocol": b.info["protocol"], "queue_index": b.qindex}
    print(f"daemon pid {b.daemon.pid}; {ns.mem_gib} GiB memfd; reporting queue {b.qindex}; "
          f"features {' '.join(F.names(b.info['features']))}; refill={ns.refill}", flush=True)
    out = {}
    try:
        runs = [(name, *SHAPES[name], ns.refill) for name in ns.shapes.split(",") if name]
        runs.append(("32x2MiB-holes", 32, 2 * MIB, None, "none"))
        for name, n, piece, cap, refill in runs:
            chain_bytes = n * piece
            chains = b.slots(n, piece)
            batches = ns.batches
            if refill == "none":
                chains, batches = ns.holes_chains, 1
                b.lib.vub_punch_loop(b.mem.fd, b.data_off, b.data_len, 1, b.done)  # all free
            if cap:
                chains = min(chains, cap)
            # warm-up (not counted): a few chains each way
            b.daemon_batch(n, n, piece, min(chains, 8), refill if refill != "none" else None)
            b.limit_batch(n, n, piece, min(chains, 8), refill if refill != "none" else None)
            dm, lm = [], []
            for _ in range(batches):
                dm.append(b.daemon_batch(n, n, piece, chains, refill if refill != "none" else None))
                lm.append(b.limit_batch(n, n, piece, chains, refill if refill != "none" else None))
            sd, sl = summarize(dm, chain_bytes), summarize(lm, chain_bytes)
            out[name] = {"pieces": n, "piece_bytes": piece, "refill": refill, "daemon": sd,
                         "limit": sl,
                         "ratio_p50": ratio(sl["p50_us"], sd["p50_us"]),
                         "ratio_mean": ratio(sl["mean_us"], sd["mean_us"]),
                         "ratio_p99": ratio(sl["p99_us"], sd["p99_us"])}
            print(f"{name:14s} daemon p50 {sd['p50_us']:8.1f} us p99 {sd['p99_us']:8.1f} us "
                  f"{sd['chains_per_s']:8.0f} chains/s {sd['gib_per_s_busy']:6.2f} GiB/s "
                  f"cpu {f(sd['cpu_s_per_gib'], '{:.3f}')} s/GiB | limit p50 {sl['p50_us']:8.1f} us "
                  f"p99 {sl['p99_us']:8.1f} us {sl['gib_per_s_busy']:6.2f} GiB/s | ratio p50 "
                  f"{f(out[name]['ratio_p50'], '{:.3f}')} mean {f(out[name]['ratio_mean'], '{:.3f}')}"
                  f"; freed {sd['freed_bytes'] / GIB:.1f}/{sd['bytes'] / GIB:.1f} GiB", flush=True)
    finally:
        st, mem = b.close()
    res.data["shapes"] = out
    res.data["stalls"] = b.stalls
    res.data["daemon_status_at_end"] = st
    res.data["daemon_memory_at_end"] = mem
    plot(res, out)

    rows = []
    for name, o in out.items():
        for who in ("daemon", "limit"):
            s = o[who]
            rows.append([name + (" (memory already free)" if o["refill"] == "none" else ""),
                         "daemon" if who == "daemon" else "C fallocate loop", s["chains"],
                         f"{s['chains_per_s']:.0f}", f"{s['gib_per_s_busy']:.2f}",
                         f"{s['gib_per_s_wall']:.2f}",
                         f(s["cpu_s_per_gib"], "{:.3f}"), f"{s['cpu_us_per_chain']:.0f}",
                         f"{s['p50_us']:.1f}", f"{s['p99_us']:.1f}",
                         f(o["ratio_p50"], "{:.3f}") if who == "daemon" else "",
                         f(o["ratio_mean"], "{:.3f}") if who == "daemon" else ""])
    md = [f"### Hot path: reporting chains through the daemon vs the C fallocate loop "
          f"({ns.mem_gib} GiB memfd, refill={ns.refill})", ""]
    md += env_lines(res.data["environment"])
    md += ["", md_table(["shape", "who", "chains", "chains/s (wall)", "GiB/s (busy)",
                         "GiB/s (wall)", "CPU s/GiB", "CPU us/chain", "p50 us", "p99 us",
                         "ratio p50 (limit/daemon)", "ratio mean"], rows), ""]
    md.append("Latency: post (kick) to used (call) as seen by the frontend, one chain in "
              "flight (as Linux does). GiB/s (busy) = bytes / sum of chain latencies; GiB/s "
              "(wall) and chains/s include the frontend's own per-chain work (building the "
              "chain in Python, reaping it), not the refill. Daemon CPU = utime+stime of the "
              "daemon process over the batches (10 ms ticks); the loop's CPU is the calling "
              "thread's CPU time. Ratio: "
              "1.0 = the daemon is as fast as the bare loop; target >= 0.95.")
    if b.stalls:
        md.append(f"\n{b.stalls} waits for a call timed out after 2 s and were re-kicked.")
    md.append("")
    md.append("![hotpath latency](hotpath.png)")
    res.write("\n".join(md))
    return 0


def plot(res, out):
    plt = pyplot()
    fig, axes = plt.subplots(1, len(out), figsize=(2.6 * len(out), 3.2), squeeze=False)
    for ax, (name, o) in zip(axes[0], out.items()):
        for who, color in (("daemon", "tab:blue"), ("limit", "tab:orange")):
            xs = sorted(o[who]["lat_us_sample"])
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.plot(xs, ys, color=color, label="daemon" if who == "daemon" else "C loop")
        ax.set_xscale("log")
        from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(name + (" (free)" if o["refill"] == "none" else ""), fontsize=8)
        ax.set_xlabel("chain latency, us")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("fraction of chains")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Per-chain latency CDF: daemon (post->used) vs bare fallocate loop", fontsize=9)
    fig.tight_layout()
    res.png(fig, "hotpath.png")


if __name__ == "__main__":
    sys.exit(main())
