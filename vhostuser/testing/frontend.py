"""A socketpair vhost-user frontend that plays QEMU's side of the protocol.

The backend Server runs in this process and is stepped explicitly
(``pump``), so tests are deterministic: send a message, pump, read the
reply.
"""

import array
import os
import socket
import struct

from vhostuser import messages as m
from vhostuser.connection import Listener
from vhostuser.loop import Server
from vhostuser.messages import ProtocolFeature as PF
from vhostuser.messages import Request as R

ALL_PROTOCOL = ((1 << PF.MQ) | (1 << PF.REPLY_ACK) | (1 << PF.BACKEND_REQ) | (1 << PF.CONFIG)
                | (1 << PF.RESET_DEVICE) | (1 << PF.CONFIGURE_MEM_SLOTS))


class Frontend:
    def __init__(self, device):
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.server = Server(device, Listener(theirs))
        self.device = device
        self.backend_sock = None
        self.eventfds = []

    # ---- raw I/O -------------------------------------------------------------
    def pump(self, rounds=3):
        for _ in range(rounds):
            self.server.loop.run_once(timeout=0)

    def send_raw(self, data, fds=()):
        if fds:
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                        array.array("i", fds).tobytes())])
        else:
            self.sock.sendall(data)

    def send(self, req, payload=b"", fds=(), need_reply=False):
        flags = m.VERSION | (m.FLAG_NEED_REPLY if need_reply else 0)
        self.send_raw(m.encode(req, payload, flags), fds)
        self.pump()

    def recv(self):
        """One reply: (header, payload, fds)."""
        data, anc, _, _ = self.sock.recvmsg(m.HEADER.size, socket.CMSG_SPACE(8 * 4))
        fds = []
        for level, kind, raw in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", raw[:len(raw) - len(raw) % 4]))
        req, flags, size = m.HEADER.unpack(data)
        payload = b""
        while len(payload) < size:
            payload += self.sock.recv(size - len(payload))
        return m.Header(req, flags, size), payload, fds

    def call(self, req, payload=b"", fds=(), need_reply=False):
        self.send(req, payload, fds, need_reply)
        return self.recv()

    def call_u64(self, req):
        hdr, payload, _ = self.call(req)
        assert hdr.request == req and hdr.flags == m.VERSION | m.FLAG_REPLY
        return struct.unpack("<Q", payload)[0]

    def ack(self, req, payload=b"", fds=()):
        """Send with NEED_REPLY; return the u64 ack value."""
        hdr, body, _ = self.call(req, payload, fds, need_reply=True)
        assert hdr.request == req, (hdr, req)
        return struct.unpack("<Q", body)[0]

    @property
    def alive(self):
        return self.server.conn is not None

    # ---- QEMU's handshake ----------------------------------------------------
    def handshake(self, protocol=ALL_PROTOCOL, backend_channel=True):
        """What QEMU 11.1 sends when it creates the device."""
        self.features = self.call_u64(R.GET_FEATURES)
        offered = self.call_u64(R.GET_PROTOCOL_FEATURES)
        self.protocol = protocol & offered
        self.send(R.SET_PROTOCOL_FEATURES, m.U64.pack(self.protocol))
        self.nqueues = self.call_u64(R.GET_QUEUE_NUM)
        self.send(R.SET_OWNER)
        if self.protocol & (1 << PF.CONFIGURE_MEM_SLOTS):
            self.call_u64(R.GET_MAX_MEM_SLOTS)
        if backend_channel and self.protocol & (1 << PF.BACKEND_REQ):
            ours, theirs = socket.socketpair()
            assert self.ack(R.SET_BACKEND_REQ_FD, b"", [theirs.fileno()]) == 0
            theirs.close()
            ours.settimeout(5)
            self.backend_sock = ours
        for i in range(self.nqueues):
            for req in (R.SET_VRING_CALL, R.SET_VRING_ERR):
                efd = os.eventfd(0, os.EFD_NONBLOCK)
                self.eventfds.append(efd)
                assert self.ack(req, m.U64.pack(i), [efd]) == 0
        return self.features

    def set_mem_table(self, regions):
        """regions: [(gpa, size, uaddr, mmap_offset, fd)]; returns the ack."""
        payload = m.MEM_TABLE_HEAD.pack(len(regions), 0) + b"".join(
            m.MEM_REGION.pack(g, s, u, o) for g, s, u, o, _ in regions)
        return self.ack(R.SET_MEM_TABLE, payload, [r[4] for r in regions])

    def start_queue(self, index, size, desc_uva, avail_uva, used_uva, base=0):
        """SET_VRING_NUM/BASE/ADDR/KICK/CALL then ENABLE; returns (kick, call) eventfds."""
        assert self.ack(R.SET_VRING_NUM, m.VRING_STATE.pack(index, size)) == 0
        assert self.ack(R.SET_VRING_BASE, m.VRING_STATE.pack(index, base)) == 0
        assert self.ack(R.SET_VRING_ADDR, m.VRING_ADDR.pack(
            index, 0, desc_uva, used_uva, avail_uva, 0)) == 0
        kick = os.eventfd(0, os.EFD_NONBLOCK)
        call = os.eventfd(0, os.EFD_NONBLOCK)
        self.eventfds += [kick, call]
        assert self.ack(R.SET_VRING_KICK, m.U64.pack(index), [kick]) == 0
        assert self.ack(R.SET_VRING_CALL, m.U64.pack(index), [call]) == 0
        assert self.ack(R.SET_VRING_ENABLE, m.VRING_STATE.pack(index, 1)) == 0
        return kick, call

    def kick(self, kick_fd):
        os.eventfd_write(kick_fd, 1)
        self.pump()

    def get_config(self, offset=0, size=16):
        hdr, payload, _ = self.call(R.GET_CONFIG, m.encode_config(offset, 0, bytes(size)),
                                    need_reply=True)
        return payload[m.CONFIG_HEAD.size:] if hdr.size else None

    def close_connection(self):
        """Close our end: the eventfds we made, the backend channel, the socket."""
        for fd in self.eventfds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.eventfds = []
        if self.backend_sock:
            self.backend_sock.close()
        self.sock.close()
        self.pump()

    def close(self):
        self.close_connection()
        self.server.close()
        self.server.loop.close()


class SocketFrontend(Frontend):
    """The same frontend over a real connection to a listening Server that
    runs on `loop` (e.g. one guest of a multi-guest daemon).  close() leaves
    the server and the loop to their owner."""

    def __init__(self, server, socket_path, loop):
        self.server = server
        self.device = server.device
        self.loop = loop
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(socket_path)
        self.backend_sock = None
        self.eventfds = []
        self.pump()

    def pump(self, rounds=3):
        for _ in range(rounds):
            self.loop.run_once(timeout=0)

    def close(self):
        self.close_connection()   # the server and the loop belong to their owner


class RemoteFrontend(Frontend):
    """The same frontend, connected to a backend in another process at `path`."""

    def __init__(self, path, timeout=20):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.server = None
        self.device = None
        self.backend_sock = None
        self.eventfds = []

    def pump(self, rounds=3):
        """The backend runs on its own."""

    def close(self):
        self.close_connection()   # pump() is a no-op: the backend runs on its own

    @property
    def alive(self):
        import select
        p = select.poll()
        p.register(self.sock.fileno(), select.POLLRDHUP)
        return not p.poll(0)
