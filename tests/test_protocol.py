"""The vhost-user protocol layer, driven by a socketpair frontend: every
request valid and malformed (sizes, fds, indices, order)."""

import os
import socket
import stat
import struct

import pytest

from balloon_device.device import BalloonDevice
from vhostuser.testing import sealed_memfd
from vhostuser.testing.driver import DriverQueue, GuestMemory
from vhostuser.testing.frontend import ALL_PROTOCOL, Frontend
from vhostuser import messages as m
from vhostuser.connection import Listener
from vhostuser.errors import SetupError
from vhostuser.handler import MAX_MEM_SLOTS, SUPPORTED_PROTOCOL_FEATURES
from vhostuser.messages import ProtocolFeature as PF
from vhostuser.messages import Request as R

MiB = 1 << 20


def open_fds():
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def fe():
    f = Frontend(BalloonDevice())
    yield f
    f.close()


@pytest.fixture
def memfd():
    fd = sealed_memfd("guest", 16 * MiB)
    yield fd
    os.close(fd)


def up(fe, memfd):
    fe.handshake()
    assert fe.set_mem_table([(0, 16 * MiB, 0x7F0000000000, 0, memfd)]) == 0


def test_handshake_like_qemu(fe):
    features = fe.handshake()
    assert features & (1 << 30), "VHOST_USER_F_PROTOCOL_FEATURES must be offered"
    assert features & (1 << 32) and features & (1 << 5) and features & (1 << 1)
    assert fe.nqueues == 4  # inflate, deflate, stats, reporting
    for bit in (PF.MQ, PF.REPLY_ACK, PF.CONFIG, PF.BACKEND_REQ, PF.CONFIGURE_MEM_SLOTS,
                PF.RESET_DEVICE, PF.INFLIGHT_SHMFD):
        assert SUPPORTED_PROTOCOL_FEATURES & (1 << bit)
    assert fe.ack(R.SET_FEATURES, m.U64.pack(features)) == 0
    assert fe.alive


def test_max_mem_slots(fe):
    fe.handshake()
    assert fe.call_u64(R.GET_MAX_MEM_SLOTS) == MAX_MEM_SLOTS


def test_set_features_refuses_unoffered_bits(fe):
    features = fe.handshake()
    assert fe.ack(R.SET_FEATURES, m.U64.pack(features | (1 << 3))) == 1  # FREE_PAGE_HINT
    assert fe.alive
    fe.send(R.SET_FEATURES, m.U64.pack(1 << 63))  # no reply channel: disconnect
    assert not fe.alive


def test_set_protocol_features_refuses_unoffered(fe):
    fe.call_u64(R.GET_FEATURES)
    fe.send(R.SET_PROTOCOL_FEATURES, m.U64.pack(1 << PF.LOG_SHMFD))
    assert not fe.alive


@pytest.mark.parametrize("flags", [0x0, 0x2, 0x1 | m.FLAG_REPLY, 0x1 | (1 << 4), 0x1 | (1 << 31)])
def test_bad_header_flags_disconnect(fe, flags):
    fe.send_raw(m.HEADER.pack(R.GET_FEATURES, flags, 0))
    fe.pump()
    assert not fe.alive


def test_oversized_message_disconnects(fe):
    fe.send_raw(m.HEADER.pack(R.SET_CONFIG, 1, m.MAX_PAYLOAD + 1))
    fe.pump()
    assert not fe.alive


def test_truncated_message_disconnects(fe):
    fe.send_raw(m.HEADER.pack(R.SET_FEATURES, 1, 8) + b"\0\0")
    fe.sock.shutdown(socket.SHUT_WR)
    fe.pump()
    assert not fe.alive


def test_unknown_request_gets_error_ack_or_disconnect(fe):
    fe.handshake()
    hdr, body, _ = fe.call(99, b"", need_reply=True)
    assert hdr.request == 99 and struct.unpack("<Q", body)[0] == 1
    assert fe.alive
    fe.send(R.SET_LOG_BASE, b"\0" * 16)  # not negotiated, no reply channel
    assert not fe.alive


# request -> a payload of the wrong size
WRONG_SIZES = [
    (R.GET_FEATURES, b"\0" * 8), (R.SET_FEATURES, b"\0" * 4), (R.SET_OWNER, b"\0"),
    (R.GET_PROTOCOL_FEATURES, b"\0" * 8), (R.SET_PROTOCOL_FEATURES, b"\0" * 9),
    (R.GET_QUEUE_NUM, b"\0" * 8), (R.SET_VRING_NUM, b"\0" * 4), (R.SET_VRING_BASE, b"\0" * 12),
    (R.GET_VRING_BASE, b"\0" * 4), (R.SET_VRING_ADDR, b"\0" * 32), (R.SET_VRING_ENABLE, b"\0" * 16),
    (R.SET_VRING_CALL, b"\0" * 4), (R.SET_MEM_TABLE, b"\0" * 4), (R.ADD_MEM_REG, b"\0" * 32),
    (R.REM_MEM_REG, b"\0" * 48), (R.GET_CONFIG, b"\0" * 8), (R.SET_CONFIG, m.CONFIG_HEAD.pack(0, 8, 0)),
    (R.GET_MAX_MEM_SLOTS, b"\0"), (R.RESET_DEVICE, b"\0" * 8), (R.GET_INFLIGHT_FD, b"\0" * 7),
]


@pytest.mark.parametrize("req,payload", WRONG_SIZES, ids=[r.name for r, _ in WRONG_SIZES])
def test_wrong_payload_size_disconnects(fe, req, payload, caplog):
    fe.handshake(protocol=SUPPORTED_PROTOCOL_FEATURES)
    fe.send(req, payload, need_reply=True)
    assert not fe.alive, f"{req.name} with a {len(payload)}-byte payload was accepted"
    assert any(f"{req.name}: payload is {len(payload)} bytes" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_fd_on_message_that_takes_none_is_refused_and_closed(fe):
    fe.handshake()
    before = open_fds()
    r, w = os.pipe()
    fe.send(R.GET_FEATURES, b"", [r])
    os.close(r)
    os.close(w)
    assert not fe.alive
    # the fd the backend received was closed too
    assert open_fds() <= before


def test_kick_without_fd_and_without_nofd_flag(fe):
    fe.handshake()
    fe.send(R.SET_VRING_KICK, m.U64.pack(0))
    assert not fe.alive


def test_vring_fd_with_reserved_bits(fe):
    fe.handshake()
    efd = os.eventfd(0)
    fe.send(R.SET_VRING_CALL, m.U64.pack(1 << 9), [efd])
    os.close(efd)
    assert not fe.alive


def test_queue_index_out_of_range(fe):
    fe.handshake()
    assert fe.ack(R.SET_VRING_NUM, m.VRING_STATE.pack(4, 64)) == 1
    assert fe.ack(R.SET_VRING_NUM, m.VRING_STATE.pack(0xFFFFFFFF, 64)) == 1
    efd = os.eventfd(0)
    assert fe.ack(R.SET_VRING_CALL, m.U64.pack(200), [efd]) == 1
    os.close(efd)
    assert fe.alive
    fe.send(R.GET_VRING_BASE, m.VRING_STATE.pack(7, 0))  # own reply: cannot be refused politely
    assert not fe.alive


@pytest.mark.parametrize("num", [0, 3, 100, 65536, 1 << 20])
def test_bad_vring_num(fe, num):
    fe.handshake()
    assert fe.ack(R.SET_VRING_NUM, m.VRING_STATE.pack(0, num)) == 1


def test_bad_vring_base_and_enable(fe):
    fe.handshake()
    assert fe.ack(R.SET_VRING_BASE, m.VRING_STATE.pack(0, 0x10000)) == 1
    assert fe.ack(R.SET_VRING_ENABLE, m.VRING_STATE.pack(0, 2)) == 1
    assert fe.ack(R.SET_VRING_ENABLE, m.VRING_STATE.pack(0, 1)) == 0


def test_kick_before_ring_setup_is_refused(fe):
    fe.handshake()
    efd = os.eventfd(0)
    assert fe.ack(R.SET_VRING_KICK, m.U64.pack(0), [efd]) == 1
    os.close(efd)


def test_ring_outside_memory_is_refused(fe, memfd):
    up(fe, memfd)
    assert fe.ack(R.SET_VRING_NUM, m.VRING_STATE.pack(0, 64)) == 0
    assert fe.ack(R.SET_VRING_ADDR, m.VRING_ADDR.pack(0, 0, 0x1000, 0x3000, 0x2000, 0)) == 0
    efd = os.eventfd(0)
    assert fe.ack(R.SET_VRING_KICK, m.U64.pack(0), [efd]) == 1  # uaddr 0x1000 is not mapped
    os.close(efd)


def test_mem_table_valid_and_malformed(fe, memfd):
    fe.handshake()
    assert fe.set_mem_table([(0, 16 * MiB, 0x7F0000000000, 0, memfd)]) == 0
    assert fe.server.backend.memory.regions[0].size == 16 * MiB
    # region longer than its file
    assert fe.set_mem_table([(0, 32 * MiB, 0x7F0000000000, 0, memfd)]) == 1
    # overlapping regions
    assert fe.set_mem_table([(0, 8 * MiB, 0x7F0000000000, 0, memfd),
                             (4 * MiB, 8 * MiB, 0x7F1000000000, 0, memfd)]) == 1
    # wrapping region
    assert fe.set_mem_table([((1 << 64) - 4096, 8192, 0x7F0000000000, 0, memfd)]) == 1
    assert fe.alive
    # fd count differs from region count
    payload = m.MEM_TABLE_HEAD.pack(2, 0) + m.MEM_REGION.pack(0, MiB, 0, 0) * 2
    fe.send(R.SET_MEM_TABLE, payload, [memfd], need_reply=True)
    assert not fe.alive


def test_mem_table_zero_regions_disconnects(fe):
    fe.handshake()
    fe.send(R.SET_MEM_TABLE, m.MEM_TABLE_HEAD.pack(0, 0), need_reply=True)
    assert not fe.alive


def test_add_and_remove_mem_reg(fe, memfd):
    fe.handshake()
    reg = m.MEM_REG_SINGLE.pack(0) + m.MEM_REGION.pack(0, 8 * MiB, 0x7F0000000000, 0)
    reg2 = m.MEM_REG_SINGLE.pack(0) + m.MEM_REGION.pack(8 * MiB, 8 * MiB, 0x7F0000800000, 8 * MiB)
    assert fe.ack(R.ADD_MEM_REG, reg, [memfd]) == 0
    assert fe.ack(R.ADD_MEM_REG, reg2, [memfd]) == 0
    assert fe.ack(R.ADD_MEM_REG, reg2, [memfd]) == 1  # overlaps
    mem = fe.server.backend.memory
    assert len(mem) == 2 and mem.translate(8 * MiB + 5, 1)
    assert fe.ack(R.REM_MEM_REG, reg, [memfd]) == 0
    assert len(mem) == 1
    assert fe.ack(R.REM_MEM_REG, reg, [memfd]) == 1  # no longer there
    fe.send(R.ADD_MEM_REG, reg, need_reply=True)  # fd missing
    assert not fe.alive


class OneRegionDevice(BalloonDevice):
    """Accepts tables of one region only."""

    def check_memory(self, regions):
        if len(regions) > 1:
            raise ValueError("one region only")


def test_refused_table_is_never_installed(memfd):
    f = Frontend(OneRegionDevice())
    try:
        f.handshake()
        mem = f.server.backend.memory
        assert f.set_mem_table([(0, 8 * MiB, 0x7F0000000000, 0, memfd)]) == 0
        first = list(mem.regions)
        assert f.set_mem_table([(0, 4 * MiB, 0x7F0000000000, 0, memfd),
                                (8 * MiB, 4 * MiB, 0x7F0000800000, 8 * MiB, memfd)]) == 1
        assert list(mem.regions) == first and mem.translate(8 * MiB - 1, 1)
        reg = m.MEM_REG_SINGLE.pack(0) + m.MEM_REGION.pack(8 * MiB, 8 * MiB, 0x7F0000800000, 8 * MiB)
        assert f.ack(R.ADD_MEM_REG, reg, [memfd]) == 1
        assert list(mem.regions) == first
        assert f.alive
    finally:
        f.close()


def test_table_the_discard_mode_cannot_free_is_refused_before_install(memfd):
    f = Frontend(BalloonDevice(discard_mode="dontneed"))
    try:
        f.handshake()
        assert f.set_mem_table([(0, 8 * MiB, 0x7F0000000000, 0, memfd)]) == 1
        assert len(f.server.backend.memory) == 0
    finally:
        f.close()


def test_add_mem_reg_needs_feature(memfd):
    f = Frontend(BalloonDevice())
    try:
        f.handshake(protocol=1 << PF.REPLY_ACK)
        reg = m.MEM_REG_SINGLE.pack(0) + m.MEM_REGION.pack(0, MiB, 0x7F0000000000, 0)
        assert f.ack(R.ADD_MEM_REG, reg, [memfd]) == 1
    finally:
        f.close()


def test_config_read_write(fe):
    fe.handshake()
    feats = fe.features
    assert fe.ack(R.SET_FEATURES, m.U64.pack(feats)) == 0
    assert fe.get_config() == bytes(16)
    fe.device.set_target(256)
    assert fe.backend_sock.recv(64)[:4] == struct.pack("<I", m.BackendRequest.CONFIG_CHANGE_MSG)
    # QEMU writes all 16 bytes with a stale num_pages (0): only actual/poison are taken
    data = struct.pack("<IIII", 0, 100, 0, 0xAA)
    hdr, body, _ = fe.call(R.SET_CONFIG, m.encode_config(0, 0, data), need_reply=True)
    assert struct.unpack("<Q", body)[0] == 0
    assert struct.unpack("<IIII", fe.get_config()) == (256, 100, 0, 0xAA)
    assert fe.get_config(4, 4) == struct.pack("<I", 100)
    assert fe.get_config(12, 8) is None  # past the end: zero-length reply
    fe.send(R.GET_CONFIG, m.encode_config(0, 0, bytes(300)), need_reply=True)
    assert not fe.alive  # over the config size cap


def test_set_config_out_of_range(fe):
    fe.handshake()
    hdr, body, _ = fe.call(R.SET_CONFIG, m.encode_config(14, 0, b"\0" * 4), need_reply=True)
    assert struct.unpack("<Q", body)[0] == 1


def test_config_needs_protocol_feature(memfd):
    f = Frontend(BalloonDevice())
    try:
        f.handshake(protocol=1 << PF.REPLY_ACK)
        assert f.get_config() is None
    finally:
        f.close()


def test_inflight_fd(fe):
    fe.handshake(protocol=SUPPORTED_PROTOCOL_FEATURES)
    hdr, body, fds = fe.call(R.GET_INFLIGHT_FD, m.INFLIGHT.pack(0, 0, 4, 64), need_reply=True)
    size, offset, nq, qs = m.INFLIGHT.unpack(body)
    assert len(fds) == 1 and size >= 4 * (16 + 16 * 64) and (nq, qs) == (4, 64)
    assert os.fstat(fds[0]).st_size >= size
    # give it back, as QEMU does after a backend restart
    assert fe.ack(R.SET_INFLIGHT_FD, m.INFLIGHT.pack(size, 0, 4, 64), fds) == 0
    # an area that claims more than its fd holds
    small = os.memfd_create("small")
    assert fe.ack(R.SET_INFLIGHT_FD, m.INFLIGHT.pack(1 << 20, 0, 4, 64), [small]) == 1
    os.close(small)
    os.close(fds[0])
    fe.send(R.GET_INFLIGHT_FD, m.INFLIGHT.pack(0, 0, 9, 64), need_reply=True)
    assert not fe.alive  # own reply: refused by disconnecting


def _running_queue(f, mem):
    """SET_FEATURES + the memory table + queue 0 started; returns the backend."""
    assert f.ack(R.SET_FEATURES, m.U64.pack(f.features)) == 0
    assert f.set_mem_table([(g, s, u, o, mem.fd) for g, s, u, o in mem.layout]) == 0
    dq = DriverQueue(mem, 64)
    f.start_queue(0, 64, dq.desc_uva, dq.avail_uva, dq.used_uva)
    backend = f.server.backend
    assert backend.started[0] and backend.queues[0].kick_fd is not None
    assert f.device.acked == f.features & ~(1 << 30)
    return backend


@pytest.mark.parametrize("req", [R.RESET_DEVICE, R.RESET_OWNER])
def test_reset_device_and_owner(fe, req):
    """A reset stops the rings, closes their fds, forgets the features (backend
    and device) and the session goes on: the queue can be set up again."""
    fe.handshake()
    with GuestMemory(16 * MiB) as mem:
        backend = _running_queue(fe, mem)
        assert fe.ack(req) == 0
        assert fe.alive
        q = backend.queues[0]
        assert not backend.started[0]
        assert (q.kick_fd, q.call_fd, q.err_fd) == (None, None, None)
        assert backend.acked_features is None and fe.device.acked == 0
        _running_queue(fe, mem)


def test_reset_device_needs_its_protocol_feature(fe):
    fe.handshake(protocol=ALL_PROTOCOL & ~(1 << PF.RESET_DEVICE))
    assert fe.ack(R.RESET_DEVICE) == 1


def test_backend_req_fd_must_be_a_socket(fe):
    fe.handshake(backend_channel=False)
    r, w = os.pipe()
    assert fe.ack(R.SET_BACKEND_REQ_FD, b"", [r]) == 1
    os.close(r)
    os.close(w)


def test_no_fd_leak_after_session():
    before = open_fds()
    mem = GuestMemory(16 * MiB)
    f = Frontend(BalloonDevice())
    f.handshake()
    _running_queue(f, mem)          # memory regions, kick and call fds
    efd = os.eventfd(0)
    assert f.ack(R.SET_VRING_ERR, m.U64.pack(0), [efd]) == 0
    os.close(efd)
    assert open_fds() > before + 4
    f.close()
    mem.close()
    assert open_fds() == before


def test_listener_path_rules(tmp_path):
    path = tmp_path / "s.sock"
    lst = Listener.at_path(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with pytest.raises(SetupError, match="in use"):
        Listener.at_path(path)
    lst.sock.close()  # crash: the path stays behind
    assert path.exists()
    again = Listener.at_path(path)  # stale socket is replaced
    again.close()
    assert not path.exists()
    plain = tmp_path / "file"
    plain.write_text("x")
    with pytest.raises(SetupError, match="not a socket"):
        Listener.at_path(plain)


def test_second_frontend_is_refused(tmp_path):
    from vhostuser.loop import Server
    path = str(tmp_path / "s.sock")
    server = Server(BalloonDevice(), Listener.at_path(path))
    a = socket.socket(socket.AF_UNIX)
    a.connect(path)
    server.loop.run_once(timeout=0.1)
    b = socket.socket(socket.AF_UNIX)
    b.connect(path)
    server.loop.run_once(timeout=0.1)
    b.settimeout(2)
    assert b.recv(1) == b""  # closed by the daemon
    a.sendall(m.encode(R.GET_FEATURES))
    server.loop.run_once(timeout=0.1)
    a.settimeout(2)
    assert len(a.recv(64)) == 20
    a.close()
    b.close()
    server.loop.run_once(timeout=0.1)
    server.close()
    server.loop.close()


def _not_eventfds(tmp_path):
    """fds a frontend might send as kick/call/err that are not eventfds."""
    f = tmp_path / "file"
    f.write_bytes(b"x")
    r, w = os.pipe()
    a, b = socket.socketpair()
    fds = {"/dev/null": os.open("/dev/null", os.O_RDWR), "pipe": r,
           "file": os.open(f, os.O_RDONLY), "socket": a.detach(),
           "timerfd-like": os.open(str(tmp_path), os.O_RDONLY)}
    os.close(w)
    b.close()
    return fds


@pytest.mark.parametrize("req", [R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR])
def test_vring_fds_must_be_eventfds(fe, tmp_path, req):
    fe.handshake()
    fds = _not_eventfds(tmp_path)
    try:
        for name, fd in fds.items():
            before = open_fds()
            hdr, body, _ = fe.call(req, m.U64.pack(1), [fd], need_reply=True)
            assert struct.unpack("<Q", body)[0] == 1, name
            assert fe.alive, name
            assert open_fds() == before, f"{name}: refused fd not closed"
        from vhostuser.handler import EVENTFD, fd_kind
        q = fe.server.backend.queues[1]
        for attr in ("kick_fd", "call_fd", "err_fd"):  # none taken; handshake ones kept
            fd = getattr(q, attr)
            assert fd is None or fd_kind(fd) == EVENTFD, attr
    finally:
        for fd in fds.values():
            os.close(fd)
    efd = os.eventfd(0)
    assert fe.ack(req, m.U64.pack(2), [efd]) in (0, 1)  # KICK may refuse: ring not set up
    os.close(efd)


def test_a_bad_kick_fd_does_not_end_a_keep_listening_daemon(tmp_path):
    """/dev/null is not an eventfd (epoll refuses it): refused with an error reply, and
    the single-guest --keep-listening daemon keeps serving."""
    from balloon_device.host.config import DaemonConfig
    from balloon_device.host.multi import Daemon
    d = Daemon(DaemonConfig(socket_path=str(tmp_path / "one.sock"), keep_listening=True))
    try:
        fe = Frontend.__new__(Frontend)
        fe.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        fe.sock.settimeout(5)
        fe.sock.connect(str(tmp_path / "one.sock"))
        fe.server, fe.backend_sock, fe.eventfds = d.guests["one"].server, None, []
        fe.pump = lambda rounds=3: [d.loop.run_once(timeout=0) for _ in range(rounds)]
        fe.pump()
        fe.handshake()
        fd = os.open("/dev/null", os.O_RDWR)
        assert fe.ack(R.SET_VRING_NUM, m.VRING_STATE.pack(0, 64)) == 0
        mem = sealed_memfd("g", 1 * MiB)
        assert fe.set_mem_table([(0, 1 * MiB, 0x10000, 0, mem)]) == 0
        os.close(mem)
        assert fe.ack(R.SET_VRING_ADDR, m.VRING_ADDR.pack(0, 0, 0x10000, 0x12000, 0x11000, 0)) == 0
        fe.send(R.SET_VRING_KICK, m.U64.pack(0), [fd], need_reply=True)  # pumps the loop
        os.close(fd)
        hdr, body, _ = fe.recv()
        assert struct.unpack("<Q", body)[0] == 1
        assert fe.alive and not d.loop._stopping
        assert fe.call_u64(R.GET_FEATURES)  # still answered
        for efd in fe.eventfds:
            os.close(efd)
        fe.sock.close()
        fe.pump()
    finally:
        d.close()


def test_an_unwritable_call_fd_never_raises_out_of_signal():
    """The stats timer and the policy signal the guest outside any message handler: a
    call fd that cannot be written is logged, never raised."""
    from vhostuser.testing.driver import DriverQueue, GuestMemory
    with GuestMemory(4 * MiB) as mem:
        dq = DriverQueue(mem, 8)
        vq = dq.make_vq()
        r, w = os.pipe()
        vq.call_fd = r            # read end: write() fails with EBADF
        try:
            dq.add([b"x" * 16], [])
            chain = vq.pop(mem.table)
            vq.push(chain.head, 0)
            assert vq.signal() is True
            assert vq.signal_errors == 1
        finally:
            os.close(r)
            os.close(w)


def test_memfds_that_can_shrink_are_refused(fe):
    """A memfd its owner can truncate after SET_MEM_TABLE would make the daemon's next
    access SIGBUS: only memfds sealed against shrinking (as QEMU seals them) are taken."""
    fe.handshake()
    unsealed = os.memfd_create("guest")
    os.ftruncate(unsealed, 16 * MiB)
    grow_only = os.memfd_create("guest", os.MFD_ALLOW_SEALING)
    os.ftruncate(grow_only, 16 * MiB)
    import fcntl
    fcntl.fcntl(grow_only, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW)
    try:
        for fd in (unsealed, grow_only):
            before = open_fds()
            assert fe.set_mem_table([(0, 16 * MiB, 0x7F0000000000, 0, fd)]) == 1
            payload = m.MEM_REG_SINGLE.pack(0) + m.MEM_REGION.pack(0, 16 * MiB, 0x7F0000000000, 0)
            assert fe.ack(R.ADD_MEM_REG, payload, [fd]) == 1
            assert open_fds() == before
            assert len(fe.server.backend.memory) == 0
        sealed = sealed_memfd("guest", 16 * MiB)
        assert fe.set_mem_table([(0, 16 * MiB, 0x7F0000000000, 0, sealed)]) == 0
        os.close(sealed)
        assert len(fe.server.backend.memory) == 1
    finally:
        os.close(unsealed)
        os.close(grow_only)


def test_files_are_mapped_only_if_they_hold_the_region(fe, tmp_path):
    """Files (hugetlbfs, /dev/shm, regular) cannot be sealed: their size is checked."""
    fe.handshake()
    path = tmp_path / "ram"
    with open(path, "wb") as f:
        f.truncate(8 * MiB)
    fd = os.open(path, os.O_RDWR)
    try:
        assert fe.set_mem_table([(0, 16 * MiB, 0x7F0000000000, 0, fd)]) == 1
        assert fe.set_mem_table([(0, 8 * MiB, 0x7F0000000000, 4096, fd)]) == 1
        assert fe.set_mem_table([(0, 8 * MiB, 0x7F0000000000, 0, fd)]) == 0
    finally:
        os.close(fd)
