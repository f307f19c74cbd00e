"""A correct QEMU-like session over a real Unix socket that reports free memory.

Used by tests/test_sandbox.py (the daemon must still free memory under
seccomp and after dropping privileges) and to record the daemon's system
calls (scripts in docs/reliability.md).
"""

import array
import os
import select
import socket
import time

from vhostuser.testing.driver import DriverQueue, GuestMemory
from vhostuser import messages as m
from vhostuser.handler import SUPPORTED_PROTOCOL_FEATURES
from vhostuser.messages import Request as R

MiB = 1 << 20


class RealFrontend:
    def __init__(self, path, timeout=10):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.fds = []

    def _recv_exact(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("daemon closed the connection")
            buf += chunk
        return buf

    def call(self, req, payload=b"", fds=(), need_reply=True, reply=True):
        flags = m.VERSION | (m.FLAG_NEED_REPLY if need_reply else 0)
        data = m.encode(req, payload, flags)
        if fds:
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                        array.array("i", fds).tobytes())])
        else:
            self.sock.sendall(data)
        if not reply:
            return None
        hdr = self._recv_exact(12)
        r, f, size = m.HEADER.unpack(hdr)
        assert r == req and f == m.VERSION | m.FLAG_REPLY, (r, f)
        return self._recv_exact(size)

    def u64(self, req, payload=b"", fds=()):
        return m.U64.unpack(self.call(req, payload, fds))[0]

    def close(self):
        self.sock.close()
        for fd in self.fds:
            os.close(fd)


def report_once(path, mem_size=32 * MiB, report=4 * MiB, timeout=10, between=None):
    """Handshake, one reporting chain of `report` bytes; returns bytes released (memfd blocks).
    `timeout` bounds each reply and the chain (a socket-activated daemon starts first).
    between: called after that chain was completed (e.g. kill the daemon); then a second
    chain goes down the same session and its release is added."""
    mem = GuestMemory(mem_size, guard=False)
    fe = RealFrontend(path, timeout)
    try:
        features = fe.u64(R.GET_FEATURES)
        fe.u64(R.GET_PROTOCOL_FEATURES)
        fe.call(R.SET_PROTOCOL_FEATURES, m.U64.pack(SUPPORTED_PROTOCOL_FEATURES), need_reply=False,
                reply=False)
        nq = fe.u64(R.GET_QUEUE_NUM)
        assert fe.u64(R.SET_OWNER) == 0
        a, b = socket.socketpair()
        assert fe.u64(R.SET_BACKEND_REQ_FD, b"", [b.fileno()]) == 0
        b.close()
        fe.fds.append(a.detach())
        assert fe.u64(R.SET_FEATURES, m.U64.pack(features)) == 0
        payload = m.MEM_TABLE_HEAD.pack(1, 0) + b"".join(
            m.MEM_REGION.pack(g, s, u, o) for g, s, u, o in mem.layout)
        assert fe.u64(R.SET_MEM_TABLE, payload, [mem.fd]) == 0
        queues = []
        for i in range(nq):
            dq = DriverQueue(mem, 64, event_idx=bool(features & (1 << 29)))
            kick = os.eventfd(0, os.EFD_NONBLOCK)
            call = os.eventfd(0, os.EFD_NONBLOCK)
            fe.fds += [kick, call]
            for req, p, f in ((R.SET_VRING_NUM, m.VRING_STATE.pack(i, 64), ()),
                              (R.SET_VRING_BASE, m.VRING_STATE.pack(i, 0), ()),
                              (R.SET_VRING_ADDR, m.VRING_ADDR.pack(i, 0, dq.desc_uva, dq.used_uva,
                                                                   dq.avail_uva, 0), ()),
                              (R.SET_VRING_KICK, m.U64.pack(i), (kick,)),
                              (R.SET_VRING_CALL, m.U64.pack(i), (call,)),
                              (R.SET_VRING_ENABLE, m.VRING_STATE.pack(i, 1), ())):
                assert fe.u64(req, p, f) == 0, req
            queues.append((dq, kick, call))
        cfg = fe.call(R.GET_CONFIG, m.encode_config(0, 0, bytes(16)))
        assert len(cfg) == 12 + 16
        rq, kick, call = queues[-1]  # reporting is the last queue
        gpa = mem.alloc(report, align=2 * MiB)
        mem.fill(gpa, report, 0xA5)
        before = os.fstat(mem.fd).st_blocks * 512
        rq.add([], [(gpa, report)])
        rq.kick()
        os.eventfd_write(kick, 1)
        deadline = time.monotonic() + timeout
        while rq.used_idx == 0:
            if time.monotonic() > deadline:
                raise TimeoutError("the daemon did not complete the reporting chain")
            select.select([call], [], [], 0.05)
        released = before - os.fstat(mem.fd).st_blocks * 512
        if between is not None:
            between()
            gpa = mem.alloc(report, align=2 * MiB)
            mem.fill(gpa, report, 0xA5)
            before = os.fstat(mem.fd).st_blocks * 512
            rq.add([], [(gpa, report)])
            rq.kick()
            os.eventfd_write(kick, 1)
            deadline = time.monotonic() + timeout
            while rq.used_idx != 2:
                if time.monotonic() > deadline:
                    raise TimeoutError("the chain after `between` was not completed")
                select.select([call], [], [], 0.05)
            released += before - os.fstat(mem.fd).st_blocks * 512
            cfg = fe.call(R.GET_CONFIG, m.encode_config(0, 0, bytes(16)))
            assert len(cfg) == 12 + 16
        # inflight fd and a clean stop, as QEMU does at shutdown
        fe.call(R.GET_INFLIGHT_FD, m.INFLIGHT.pack(0, 0, nq, 64), reply=False)
        r, f, size = m.HEADER.unpack(fe._recv_exact(12))
        fe._recv_exact(size)
        for i in range(nq):
            fe.call(R.GET_VRING_BASE, m.VRING_STATE.pack(i, 0))
        return released
    finally:
        fe.close()
        mem.close()
