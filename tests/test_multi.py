"""Many guests, one daemon (balloon_device.host.multi): real Unix sockets, one shared
event loop stepped by the test; each guest's frontend plays QEMU's side.

What these prove: a guest whose frontend breaks the protocol, or whose callback
raises, is dropped alone and the other guests keep serving (handshake, config,
free page reporting with measured release); a dropped guest can reconnect; the
control socket answers per guest and for all guests.
"""

import os
import struct

import pytest

from balloon_device import features as F
from balloon_device.host.config import DaemonConfig
from balloon_device.host.control import request
from balloon_device.errors import ConfigError
from balloon_device.host.multi import Daemon, parse_guest_arg, socket_dir_guests
from vhostuser.testing.driver import DriverQueue, GuestMemory
from balloon_device.host.harness.frontend import guest_frontend
from vhostuser import messages as m
from vhostuser.messages import Request as R

MiB = 1 << 20
QSIZE = 64


class GuestRig:
    """A guest (memfd + driver queues) attached to one guest of a Daemon."""

    def __init__(self, daemon, name, size=64 * MiB, qsize=QSIZE):
        self.mem = GuestMemory(size)
        self.fe = guest_frontend(daemon, name)
        offered = self.fe.handshake()
        self.features = offered & ~(1 << 30)
        assert self.fe.ack(R.SET_FEATURES, m.U64.pack(offered)) == 0
        assert self.fe.set_mem_table(
            [(g, s, u, o, self.mem.fd) for g, s, u, o in self.mem.layout]) == 0
        self.q, self.kicks = {}, {}
        for index, role in enumerate(F.queue_roles(self.features)):
            dq = DriverQueue(self.mem, qsize, event_idx=bool(self.features & (1 << 29)))
            kick, _ = self.fe.start_queue(index, qsize, dq.desc_uva, dq.avail_uva, dq.used_uva)
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
        fe = guest_frontend(d, "one")

        def boom(msg):
            raise RuntimeError("simulated bug")
        d.guests["one"].server.backend.handle = boom
        fe.send_raw(m.encode(R.GET_FEATURES, b"", m.VERSION))
        with pytest.raises(RuntimeError, match="simulated bug"):
            fe.pump()
        fe.close()
    finally:
        d.close()


def test_half_a_header_does_not_stall_the_other_guests(daemon, monkeypatch):
    """A frontend that stops inside a message waits alone: the shared loop keeps
    answering the other guests, and the stalled one is dropped after RECV_TIMEOUT."""
    a, b = GuestRig(daemon, "a"), GuestRig(daemon, "b")
    try:
        a.fe.send_raw(m.encode(R.GET_FEATURES, b"", m.VERSION)[:6])  # half a header
        a.fe.pump()
        # b is answered while a is still connected, i.e. long before a's 5 s are up
        assert b.report(2 * MiB) == 2 * MiB
        assert struct.unpack("<I", b.fe.get_config(0, 4))[0] == 0
        assert a.fe.alive and b.fe.alive
        # the rest of a's message arrives: it is assembled and answered
        a.fe.send_raw(m.encode(R.GET_FEATURES, b"", m.VERSION)[6:])
        a.fe.pump()
        hdr, payload, _ = a.fe.recv()
        assert hdr.request == R.GET_FEATURES and len(payload) == 8
        assert a.report(2 * MiB) == 2 * MiB
    finally:
        a.close()
        b.close()


def test_fds_sent_with_the_first_part_stay_with_their_message(daemon):
    a = GuestRig(daemon, "a")
    try:
        efd = os.eventfd(0, os.EFD_NONBLOCK)
        a.fe.eventfds.append(efd)
        msg = m.encode(R.SET_VRING_CALL, m.U64.pack(1), m.VERSION | m.FLAG_NEED_REPLY)
        a.fe.send_raw(msg[:5], [efd])
        a.fe.pump()
        a.fe.send_raw(msg[5:])
        a.fe.pump()
        hdr, body, _ = a.fe.recv()
        assert hdr.request == R.SET_VRING_CALL and struct.unpack("<Q", body)[0] == 0
        q = daemon.guests["a"].server.backend.queues[1]
        assert os.path.samestat(os.fstat(q.call_fd), os.fstat(efd))
    finally:
        a.close()


def test_a_stalled_frontend_is_dropped_after_the_timeout(daemon, monkeypatch):
    import vhostuser.loop as loop_mod
    monkeypatch.setattr(loop_mod, "RECV_TIMEOUT", 0.2)
    a, b = GuestRig(daemon, "a"), GuestRig(daemon, "b")
    try:
        a.fe.send_raw(m.encode(R.GET_FEATURES, b"", m.VERSION)[:6])
        a.fe.pump()
        assert a.fe.alive
        for _ in range(50):
            daemon.loop.run_once(timeout=0.05)
            if not a.fe.alive:
                break
        assert not a.fe.alive and b.fe.alive
        assert daemon.guests["a"].status().protocol_errors == 1
        assert b.report(2 * MiB) == 2 * MiB
    finally:
        a.close()
        b.close()


def test_a_flooding_guest_cannot_starve_another(daemon):
    """Guest a keeps its reporting ring full (it refills what the device completes);
    guest b's one report is completed within a few turns of the loop, while a is
    still being served, and a loses nothing."""
    from vhostuser import handler
    QUEUE_BUDGET = getattr(handler, "QUEUE_BUDGET", 64)
    a, b = GuestRig(daemon, "a", qsize=1024), GuestRig(daemon, "b")
    try:
        qa, qb = a.q["reporting"], b.q["reporting"]
        page = a.mem.alloc(4096, align=4096)
        added = 1000
        for _ in range(added):
            qa.add([], [(page, 4096)])
        os.eventfd_write(a.kicks["reporting"], 1)
        gb = b.mem.alloc(2 * MiB, align=2 * MiB)
        qb.add([], [(gb, 2 * MiB)])
        os.eventfd_write(b.kicks["reporting"], 1)
        a_done, turns, b_done = 0, 0, False
        while not b_done:
            daemon.loop.run_once(timeout=0)
            turns += 1
            got = len(qa.pop_used())
            a_done += got
            for _ in range(got):  # keep the avail index ahead: refill what was used
                qa.add([], [(page, 4096)])
            added += got
            b_done = len(qb.pop_used()) == 1
            assert turns < 10, "guest b starved"
        assert 0 < a_done <= 2 * QUEUE_BUDGET, "guest a was served without a budget"
        # a goes on being served, turn after turn, without a new kick, and loses nothing
        for _ in range(added // QUEUE_BUDGET + 5):
            daemon.loop.run_once(timeout=0)
            a_done += len(qa.pop_used())
        assert a_done == added
        assert daemon.guests["a"].status().device.counters["report_chains"] == added
    finally:
        a.close()
        b.close()


def test_ctl_target_is_bounded_by_guest_ram(tmp_path):
    """A target can take at most the guest's RAM minus what it keeps (here 64 MiB of RAM,
    it keeps half); larger ones are refused with the numbers; with --policy the reply
    says that the policy may replace a manual target."""
    import json
    from balloon_device.host.policy import PolicyConfig
    d = make_daemon(tmp_path, control_socket=str(tmp_path / "ctl.sock"), policy=PolicyConfig())
    a = GuestRig(d, "a", size=64 * MiB)
    try:
        def target(nbytes):
            return d.control.dispatch(json.dumps({"cmd": "target", "guest": "a", "bytes": nbytes}))
        for too_much in (64 * MiB, 33 * MiB, 1 << 40):
            r = target(too_much)
            assert not r["ok"], too_much
            assert "64 MiB of RAM" in r["error"] and "largest target is 32 MiB" in r["error"]
        assert d.guests["a"].device.target_pages == 0
        r = target(32 * MiB)
        assert r["ok"] and r["target_pages"] == 32 * MiB >> 12
        assert "--policy" in r["policy"]
        assert "note" not in r
        # a guest with no frontend yet: accepted, with a note, and lowered once RAM is known
        r = target(1 << 40)
        assert not r["ok"]
        r = d.control.dispatch(json.dumps({"cmd": "target", "guest": "b", "bytes": 1 << 30}))
        assert r["ok"] and "not known yet" in r["note"]
        b = GuestRig(d, "b", size=64 * MiB)
        try:
            assert d.guests["b"].device.target_pages == 32 * MiB >> 12
        finally:
            b.close()
    finally:
        a.close()
        d.close()


def test_watch_stats_calls_back_with_the_guest_name():
    from balloon_device.device import BalloonDevice
    from balloon_device.host.multi import Guest, current_guest
    heard = []
    g = Guest("vm1", BalloonDevice())
    g.watch_stats(lambda name: heard.append((name, current_guest.get())))
    g.device.on_stats()
    assert heard == [("vm1", "vm1")]      # in the guest's logging context
