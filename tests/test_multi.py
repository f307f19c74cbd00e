"""Many guests, one daemon (balloon_device.host.multi): real Unix sockets, one shared
event loop stepped by the test; each guest's frontend plays QEMU's side.

What these prove: a guest whose frontend breaks the protocol, or whose callback
raises, is dropped alone and the other guests keep serving (handshake, config,
free page reporting with measured release); a dropped guest can reconnect; the
control socket answers per guest and for all guests.
"""

import os
import socket
import struct

import pytest

from balloon_device import features as F
from balloon_device.host.config import DaemonConfig
from balloon_device.host.control import request
from balloon_device.errors import ConfigError
from balloon_device.host.multi import Daemon, parse_guest_arg, socket_dir_guests
from vhostuser.testing.driver import DriverQueue, GuestMemory
from vhostuser.testing.frontend import Frontend
from vhostuser import messages as m
from vhostuser.messages import Request as R

MiB = 1 << 20
QSIZE = 64


class SocketFrontend(Frontend):
    """tests/frontend.Frontend over a real connection to one guest of a Daemon."""

    def __init__(self, daemon, name):
        self.daemon = daemon
        self.guest = daemon.guests[name]
        self.server = self.guest.server
        self.device = self.guest.device
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(self.guest.socket_path)
        self.backend_sock = None
        self.eventfds = []
        self.pump()

    def pump(self, rounds=3):
        for _ in range(rounds):
            self.daemon.loop.run_once(timeout=0)

    def close(self):
        for fd in self.eventfds:
            os.close(fd)
        self.eventfds = []
        if self.backend_sock:
            self.backend_sock.close()
        self.sock.close()
        self.pump()


class GuestRig:
    """A guest (memfd + driver queues) attached to one guest of a Daemon."""

    def __init__(self, daemon, name, size=64 * MiB):
        self.mem = GuestMemory(size)
        self.fe = SocketFrontend(daemon, name)
        offered = self.fe.handshake()
        self.features = offered & ~(1 << 30)
        assert self.fe.ack(R.SET_FEATURES, m.U64.pack(offered)) == 0
        assert self.fe.set_mem_table(
            [(g, s, u, o, self.mem.fd) for g, s, u, o in self.mem.layout]) == 0
        self.q, self.kicks = {}, {}
        for index, role in enumerate(F.queue_roles(self.features)):
            dq = DriverQueue(self.mem, QSIZE, event_idx=bool(self.features & (1 << 29)))
            kick, _ = self.fe.start_queue(index, QSIZE, dq.desc_uva, dq.avail_uva, dq.used_uva)
            self.q[role], self.kicks[role] = dq, kick

    def report(self, nbytes):
        """Fill nbytes of guest memory, report it free; returns the bytes released."""
        gpa = self.mem.alloc(nbytes, align=2 * MiB)
        self.mem.fill(gpa, nbytes, 0x5A)
        before = os.fstat(self.mem.fd).st_blocks * 512
        self.q["reporting"].add([], [(gpa, nbytes)])
        self.fe.kick(self.kicks["reporting"])
        assert len(self.q["reporting"].pop_used()) == 1
        released = before - os.fstat(self.mem.fd).st_blocks * 512
        self.mem.free(gpa)
        return released

    def close(self):
        self.fe.close()
        self.mem.close()


def make_daemon(tmp_path, names=("a", "b"), **kw):
    cfg = DaemonConfig(guests=tuple((n, str(tmp_path / f"{n}.sock")) for n in names), **kw)
    return Daemon(cfg)


@pytest.fixture
def daemon(tmp_path):
    d = make_daemon(tmp_path)
    yield d
    d.close()


def test_garbage_on_one_guest_leaves_the_other_serving(daemon):
    a, b = GuestRig(daemon, "a"), GuestRig(daemon, "b")
    try:
        assert a.report(2 * MiB) == 2 * MiB
        a.fe.send_raw(b"\xff" * 12)  # header with a bad version: protocol error
        a.fe.pump()
        assert not a.fe.alive and b.fe.alive
        assert daemon.guests["a"].status().protocol_errors == 1
        assert not daemon.loop._stopping
        # b is untouched: config space, targets and reporting all still work
        assert b.report(4 * MiB) == 4 * MiB
        assert daemon.guests["b"].set_target(1024)
        assert b.fe.backend_sock.recv(64)[:4] == struct.pack("<I", m.BackendRequest.CONFIG_CHANGE_MSG)
        assert struct.unpack("<I", b.fe.get_config(0, 4))[0] == 1024
        assert daemon.guests["b"].status().protocol_errors == 0
    finally:
        a.close()
        b.close()


def test_dropped_guest_reconnects(daemon):
    a = GuestRig(daemon, "a")
    a.fe.send_raw(b"\x01\x00\x00\x00\x01\x00\x00\x00\xff\xff\xff\x7f")  # absurd size
    a.fe.pump()
    assert not a.fe.alive
    a.close()
    again = GuestRig(daemon, "a")
    try:
        assert again.report(2 * MiB) == 2 * MiB
        assert daemon.guests["a"].status().sessions == 2
    finally:
        again.close()


def test_exception_in_one_guest_is_contained(daemon):
    a, b = GuestRig(daemon, "a"), GuestRig(daemon, "b")
    try:
        def boom(msg):
            raise RuntimeError("simulated bug")
        daemon.guests["a"].server.backend.handle = boom
        a.fe.send(R.GET_FEATURES)
        assert not a.fe.alive and b.fe.alive
        assert daemon.guests["a"].status().internal_errors == 1
        assert b.report(2 * MiB) == 2 * MiB
        assert daemon.guests["b"].status().internal_errors == 0
    finally:
        a.close()
        b.close()


def test_disconnect_never_stops_a_multi_guest_loop(daemon):
    a = GuestRig(daemon, "a")
    a.close()
    assert not daemon.loop._stopping
    assert daemon.guests["a"].server.listener.is_listening


def test_control_socket_per_guest_and_all(tmp_path):
    d = make_daemon(tmp_path, control_socket=str(tmp_path / "ctl.sock"))
    try:
        import threading
        stop = threading.Event()

        def run():
            while not stop.is_set():
                d.loop.run_once(timeout=0.02)
        t = threading.Thread(target=run)
        t.start()
        try:
            path = str(tmp_path / "ctl.sock")
            everyone = request(path, {"cmd": "list"})
            assert [g["name"] for g in everyone["guests"]] == ["a", "b"]
            assert set(request(path, {"cmd": "status"})["guests"]) == {"a", "b"}
            one = request(path, {"cmd": "status", "guest": "b"})["status"]
            assert one["name"] == "b" and one["socket"].endswith("b.sock")
            refused = request(path, {"cmd": "target", "bytes": 1 << 20})
            assert not refused["ok"] and "add \"guest\"" in refused["error"]
            ok = request(path, {"cmd": "target", "bytes": 1 << 20, "guest": "a"})
            assert ok["ok"] and ok["target_pages"] == 256
            assert d.guests["a"].device.target_pages == 256
            assert d.guests["b"].device.target_pages == 0
            assert not request(path, {"cmd": "status", "guest": "zz"})["ok"]
        finally:
            stop.set()
            t.join()
    finally:
        d.close()


def test_single_guest_is_named_after_its_socket(tmp_path):
    cfg = DaemonConfig(socket_path=str(tmp_path / "web1.sock"))
    assert cfg.guest_specs == [("web1", str(tmp_path / "web1.sock"), None)]
    assert cfg.control_path == str(tmp_path / "web1.sock") + ".ctl"
    d = Daemon(cfg)
    try:
        assert list(d.guests) == ["web1"] and not d.multi
        assert d.guests["web1"].server.keep_listening is False  # exits after QEMU leaves
    finally:
        d.close()


def test_guest_arguments():
    assert parse_guest_arg("vm1=/run/x/vm1.sock") == ("vm1", "/run/x/vm1.sock")
    with pytest.raises(ConfigError):
        parse_guest_arg("/run/x/vm1.sock")
    assert socket_dir_guests("/run/v", "a, b") == [("a", "/run/v/a.sock"), ("b", "/run/v/b.sock")]


@pytest.mark.parametrize("kw, words", [
    (dict(guests=(("a", "/tmp/x.sock"), ("a", "/tmp/y.sock"))), "own name"),
    (dict(guests=(("a", "/tmp/x.sock"), ("b", "/tmp/x.sock"))), "own socket"),
    (dict(guests=(("a b", "/tmp/x.sock"),)), "guest name"),
    (dict(guests=(("a", "/tmp/x.sock"),), socket_path="/tmp/z.sock"), "one way"),
    (dict(guests=(("a", "/nonexistent/dir/a.sock"),)), "does not exist"),
])
def test_multi_guest_config_errors(kw, words):
    with pytest.raises(ConfigError, match=words):
        DaemonConfig(**kw)


def test_single_guest_daemon_lets_bugs_propagate(tmp_path):
    """Isolation is for several guests; one guest keeps the plain Server's behaviour."""
    d = Daemon(DaemonConfig(socket_path=str(tmp_path / "one.sock")))
    try:
        fe = SocketFrontend(d, "one")

        def boom(msg):
            raise RuntimeError("simulated bug")
        d.guests["one"].server.backend.handle = boom
        fe.send_raw(m.encode(R.GET_FEATURES, b"", m.VERSION))
        with pytest.raises(RuntimeError, match="simulated bug"):
            fe.pump()
        fe.close()
    finally:
        d.close()
