"""Restarts nobody notices: the fd store, the state memfd, the built-in supervisor.

The daemon runs under its supervisor in a subprocess; the test plays QEMU over a
real socket (RemoteFrontend) with a driver's rings in a memfd, SIGKILLs the serving
process at chosen points and checks the frontend's view: the socket never closes,
each request gets exactly one reply, each chain is completed exactly once.
"""

import os
import signal
import socket
import struct
import sys
import time
from pathlib import Path

import pytest

from balloon_device import features as F
from balloon_device.host import fdstore
from balloon_device.host.control import request as control_request
from balloon_device.host.errors import ControlError
from balloon_device.host.state import StateError, StateFile
from vhostuser import messages as m
from vhostuser.messages import Request as R
from vhostuser.testing.driver import DriverQueue, GuestMemory
from vhostuser.testing.frontend import RemoteFrontend

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
QSIZE = 64


# ---- units -------------------------------------------------------------------

def test_state_file_keeps_the_last_whole_write():
    st = StateFile.create()
    try:
        assert st.read() is None
        st.write({"a": 1})
        st.write({"a": 2, "b": [1, 2]})
        again = StateFile(os.dup(st.fd))
        assert again.read() == {"a": 2, "b": [1, 2]}
        # a torn slot write (kill in the middle) leaves the header on the other slot
        os.pwrite(st.fd, b"garbage", 4096 + (1 - st.slot) * (1 << 20))
        assert again.read() == {"a": 2, "b": [1, 2]}
        # a damaged active slot is detected, not parsed
        os.pwrite(st.fd, b"X", 4096 + st.slot * (1 << 20))
        with pytest.raises(StateError):
            again.read()
        again.close()
    finally:
        st.close()


def test_progress_record_moves_only_the_state_it_follows():
    st = StateFile.create()
    try:
        st.write({"pending": {"msg": "x", "stage": "handled"}})
        st.write_progress("consumed")
        assert StateFile(os.dup(st.fd)).read()["pending"]["stage"] == "consumed"
        st.write_progress(None)
        assert StateFile(os.dup(st.fd)).read()["pending"] is None
        st.write({"pending": {"msg": "y", "stage": "handled"}})  # the record is stale now
        assert StateFile(os.dup(st.fd)).read()["pending"] == {"msg": "y", "stage": "handled"}
    finally:
        st.close()


def test_reply_outbox_sends_what_is_left_once_and_never_blocks():
    """The outbox pipe: a reply goes out whole; bytes left after a splice are exactly the
    unsent rest; a peer that does not read makes flush time out (it must not hang the
    daemon: splice into a blocking socket would block whatever its flags say)."""
    from vhostuser.restart import ReplyOutbox

    def hang(*_):
        raise AssertionError("flush blocked")
    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(20)
    ours, peer = socket.socketpair()
    box = ReplyOutbox.create()
    try:
        box.load(b"r" * 40)
        assert box.queued() == 40
        box.flush(ours, 1)
        assert box.queued() == 0 and peer.recv(100) == b"r" * 40
        box.flush(ours, 1)   # nothing left: nothing sent (a successor after the splice)
        ours.setblocking(False)
        filled = 0
        try:
            while True:
                filled += ours.send(b"f" * 4096)
        except BlockingIOError:
            pass
        ours.setblocking(True)
        box.load(b"s" * 4108)
        with pytest.raises(TimeoutError):
            box.flush(ours, 0.3)
        assert box.queued() == 4108   # not sent: all of it still there
        got = b""
        while len(got) < filled:
            got += peer.recv(1 << 16)
        box.flush(ours, 5)
        got = b""
        while len(got) < 4108:
            got += peer.recv(1 << 16)
        assert got == b"s" * 4108 and box.queued() == 0
        box.load(b"t" * 10)
        box.load(b"u" * 12)   # a leftover (a dropped session) is dropped first
        assert box.drain() == 12
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        box.close()
        ours.close()
        peer.close()


def test_fd_names_escape_guest_names():
    assert fdstore.fd_name("web1", "kick", 0, 7) == "vub.web1.kick.0.7"
    name = fdstore.fd_name("a.b:c", "listen")
    assert ":" not in name and fdstore.parse_name(name) == ("a%2Eb%3Ac", ["listen"])


def test_take_listen_fds_checks_the_pid():
    r, w = os.pipe()
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"}
    assert fdstore.take_listen_fds(env) == []
    env["LISTEN_PID"] = str(os.getpid())
    got = fdstore.take_listen_fds(env)
    assert got == [("x", 3)]
    os.close(r)
    os.close(w)


# ---- the daemon under its supervisor -------------------------------------------

class Supervised:
    def __init__(self, tmp_path, *args, guests=None, env=None):
        self.sock = str(tmp_path / "g.sock")
        self.ctl = self.sock + ".ctl"
        self.log = tmp_path / "daemon.log"
        where = ["--socket-path", self.sock]
        if guests:
            where = [a for n in guests for a in ("--guest", f"{n}={tmp_path}/{n}.sock")]
            self.ctl = str(tmp_path / "control.sock")
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", **(env or {}))
        for k in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            env.pop(k, None)
        import subprocess
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "balloon_device.host.cli", *where,
             "--log-level", "debug", *args], env=env, stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT, cwd=ROOT)
        # a guest of a multi-guest daemon has no process until its frontend connects:
        # the daemon is up once the manager answers for it ("unit": "waiting")
        self.wait_serving(guest=guests[0] if guests else None, waiting_ok=bool(guests))

    def status(self, guest=None):
        req = {"cmd": "status"}
        if guest:
            req["guest"] = guest
        reply = control_request(self.ctl, req, timeout=5)
        assert reply["ok"], reply
        return reply["status"]

    def wait_serving(self, not_pid=None, timeout=60, guest=None, waiting_ok=False):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                st = self.status(guest)
                # a guest whose process does not answer yet shows with pid None
                if st["process"].get("pid") not in (not_pid, None):
                    return st
                if waiting_ok and st["process"].get("unit") == "waiting":
                    return st
            except (OSError, AssertionError, ValueError, ControlError):
                pass
            assert self.proc.poll() is None, self.log_text()
            time.sleep(0.05)
        raise AssertionError(f"daemon not serving after {timeout}s:\n{self.log_text()}")

    def child(self):
        return self.status()["process"]["pid"]

    def kill_child(self, sig=signal.SIGKILL):
        pid = self.child()
        os.kill(pid, sig)
        return pid

    def log_text(self):
        return self.log.read_text(errors="replace")[-6000:]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(20)
            except Exception:
                self.proc.kill()
        return self.proc.wait()


class Guest:
    """A driver (rings in a memfd) on a RemoteFrontend."""

    def __init__(self, path, regions=None):
        self.mem = GuestMemory(96 * MiB, regions=regions)
        self.fe = RemoteFrontend(path)
        offered = self.fe.handshake()
        self.features = offered & ~(1 << 30)
        assert self.fe.ack(R.SET_FEATURES, m.U64.pack(self.features | (1 << 30))) == 0
        assert self.fe.set_mem_table(
            [(g, s, u, o, self.mem.fd) for g, s, u, o in self.mem.layout]) == 0
        self.q, self.kicks, self.calls = {}, {}, {}
        for index, role in enumerate(F.queue_roles(self.features)):
            dq = DriverQueue(self.mem, QSIZE)
            kick, call = self.fe.start_queue(index, QSIZE, dq.desc_uva, dq.avail_uva, dq.used_uva)
            self.q[role], self.kicks[role], self.calls[role] = dq, kick, call
        self.data = [self.mem.alloc(2 * MiB, align=2 * MiB) for _ in range(16)]
        for g in self.data:
            self.mem.fill(g, 2 * MiB, 0xA5)

    def blocks(self):
        return os.fstat(self.mem.fd).st_blocks * 512

    def post(self, role, out_bufs, in_bufs, kick=True):
        head = self.q[role].add(out_bufs, in_bufs)
        if kick:
            os.eventfd_write(self.kicks[role], 1)
        return head

    def wait_used(self, role, n=1, timeout=30):
        got = []
        deadline = time.monotonic() + timeout
        while len(got) < n and time.monotonic() < deadline:
            got += self.q[role].pop_used()  # raises on a chain completed twice
            time.sleep(0.01)
        return got

    def close(self):
        self.fe.close()
        self.mem.close()


@pytest.fixture
def daemon(tmp_path):
    d = Supervised(tmp_path)
    yield d
    rc = d.stop()
    assert rc == 0, d.log_text()


def test_supervisor_keeps_the_session_across_sigkill(daemon):
    g = Guest(daemon.sock)
    try:
        assert daemon.status()["process"]["fd_store"]
        daemon.ctl_target = control_request(daemon.ctl, {"cmd": "target", "bytes": 32 * MiB})
        before = g.blocks()
        h1 = g.post("reporting", [], [(g.data[0], 2 * MiB)])
        assert [u.id for u in g.wait_used("reporting")] == [h1]
        for cycle in range(3):
            old = daemon.kill_child()
            st = daemon.wait_serving(not_pid=old)
            assert st["process"]["restored"] and st["process"]["restarts"] == cycle + 1
            assert st["connected"] and g.fe.alive
            assert st["target_pages"] == 32 * MiB >> 12, "the target was lost"
            gpa = g.data[1 + cycle]
            h = g.post("reporting", [], [(gpa, 2 * MiB)])
            assert [u.id for u in g.wait_used("reporting")] == [h]
            assert g.mem.read(gpa, 16) == bytes(16)
            # the frontend's requests are answered as before
            hdr, payload, _ = g.fe.call(R.GET_CONFIG, m.encode_config(0, 0, bytes(16)),
                                        need_reply=True)
            assert struct.unpack("<I", payload[12:16])[0] == 32 * MiB >> 12
        assert before - g.blocks() > 4 * 2 * MiB - MiB  # (the driver touches a few pages)
        for gpa in g.data[4:]:
            assert g.mem.read(gpa, 2 * MiB) == bytes([0xA5]) * (2 * MiB)
        assert "frontend disconnected" not in daemon.log_text()
    finally:
        g.close()


def test_chains_in_flight_at_the_kill_are_completed_once(daemon):
    """The stats buffer is held (popped, not completed) by design: after a kill it is
    held again, and given back exactly once when fresh stats are asked for."""
    g = Guest(daemon.sock)
    try:
        buf = g.mem.alloc(10 * 3)
        g.mem.write(buf, struct.pack("<HQ", 4, 123 << 20) * 3)
        g.post("stats", [(buf, 30)], [])
        deadline = time.monotonic() + 20
        while daemon.status()["counters"]["stats_updates"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        old = daemon.kill_child()
        daemon.wait_serving(not_pid=old)
        assert g.wait_used("stats", timeout=1) == []  # still held, not completed by the restart
        reply = control_request(daemon.ctl, {"cmd": "stats", "refresh": True})
        assert reply["ok"], reply
        used = g.wait_used("stats")
        assert len(used) == 1
        assert g.wait_used("stats", timeout=1) == []
    finally:
        g.close()


def test_request_sent_while_the_daemon_is_dead_gets_one_reply(daemon):
    g = Guest(daemon.sock)
    try:
        pid = daemon.child()
        os.kill(pid, signal.SIGSTOP)
        # half a message, then the kill, then the rest: the successor reads it whole
        msg = m.encode(R.GET_CONFIG, m.encode_config(0, 0, bytes(16)),
                       m.VERSION | m.FLAG_NEED_REPLY)
        g.fe.send_raw(msg[:7])
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        g.fe.send_raw(msg[7:])
        hdr, payload, _ = g.fe.recv()
        assert hdr.request == R.GET_CONFIG and len(payload) == 12 + 16
        g.fe.sock.settimeout(1.0)
        with pytest.raises(socket.timeout):
            g.fe.recv()  # exactly one reply
        g.fe.sock.settimeout(20)
        h = g.post("reporting", [], [(g.data[0], 2 * MiB)])
        assert [u.id for u in g.wait_used("reporting")] == [h]
    finally:
        g.close()


def test_kicks_while_dead_are_served_after_the_restart(daemon):
    g = Guest(daemon.sock)
    try:
        pid = daemon.child()
        os.kill(pid, signal.SIGSTOP)
        heads = [g.post("reporting", [], [(g.data[i], 2 * MiB)]) for i in range(3)]
        os.kill(pid, signal.SIGKILL)
        daemon.wait_serving(not_pid=pid)
        assert sorted(u.id for u in g.wait_used("reporting", 3)) == sorted(heads)
        assert g.wait_used("reporting", timeout=0.5) == []
    finally:
        g.close()


def test_supervised_daemon_under_seccomp_answers_and_restores(tmp_path):
    """Under --seccomp the journaled path's calls are allowed: replies leave through the
    outbox (splice), a kill is survived."""
    d = Supervised(tmp_path, "--seccomp")
    g = Guest(d.sock)
    try:
        assert len(g.fe.get_config()) == 16
        old = d.kill_child()
        d.wait_serving(not_pid=old)
        assert len(g.fe.get_config()) == 16
        h = g.post("reporting", [], [(g.data[0], 2 * MiB)])
        assert [u.id for u in g.wait_used("reporting")] == [h]
        assert "Operation not permitted" not in d.log.read_text(), d.log_text()
    finally:
        g.close()
        d.stop()


def test_frontend_leaving_stops_the_supervisor(tmp_path):
    d = Supervised(tmp_path)
    g = Guest(d.sock)
    g.close()
    g.fe.sock.close()
    assert d.proc.wait(30) == 0, d.log_text()


def test_config_error_is_not_restarted(tmp_path):
    import subprocess
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    bad = tmp_path / "file"
    bad.write_text("x")
    cp = subprocess.run([sys.executable, "-m", "balloon_device.host.cli", "--socket-path",
                         str(bad)], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert cp.returncode == 2, cp.stderr
    assert "not restarting" in cp.stderr and "is not a socket" in cp.stderr


def test_ctl_upgrade_hands_over_without_the_frontend_noticing(daemon):
    g = Guest(daemon.sock)
    try:
        old = daemon.child()
        from balloon_device.host.cli import main
        assert main(["ctl", "--socket-path", daemon.sock, "upgrade"]) == 0
        st = daemon.wait_serving(not_pid=old)
        assert st["process"]["restored"] and st["connected"] and g.fe.alive
        assert "handed over for an upgrade" in daemon.log_text()
        h = g.post("reporting", [], [(g.data[0], 2 * MiB)])
        assert [u.id for u in g.wait_used("reporting")] == [h]
    finally:
        g.close()


def test_ctl_upgrade_refused_without_an_fd_store(tmp_path):
    d = Supervised(tmp_path, "--no-supervise")
    try:
        reply = control_request(d.ctl, {"cmd": "upgrade"})
        assert not reply["ok"] and "no fd store" in reply["error"]
        assert not d.status()["process"]["fd_store"]
    finally:
        assert d.stop() == 0


def test_every_guest_of_a_shared_daemon_is_restored(tmp_path):
    """Each guest of a shared daemon has its own serving process: killing one restores
    that guest's session and leaves the other's process alone (tests/test_isolation.py)."""
    d = Supervised(tmp_path, guests=("a", "b"))
    guests = {}
    try:
        for n in ("a", "b"):
            d.wait_serving(guest=n, waiting_ok=True)   # its process starts as it connects
            guests[n] = Guest(str(tmp_path / f"{n}.sock"))
            d.wait_serving(guest=n)
        others = {n: d.status(n)["process"]["pid"] for n in guests}
        for victim in ("a", "b"):
            old = d.status(victim)["process"]["pid"]
            os.kill(old, signal.SIGKILL)
            st = d.wait_serving(not_pid=old, guest=victim)
            others[victim] = st["process"]["pid"]
            for n, g in guests.items():
                st = d.status(n)
                assert st["process"]["pid"] == others[n], n
                assert st["process"]["restored"] == (n == "a" or victim == "b"), n
                assert st["connected"] and g.fe.alive, n
                h = g.post("reporting", [], [(g.data[0], 2 * MiB)])
                assert [u.id for u in g.wait_used("reporting")] == [h], n
    finally:
        for g in guests.values():
            g.close()
        d.stop()


@pytest.mark.parametrize("stage", ["handled", "consumed"])
def test_kill_between_a_request_and_its_reply(tmp_path, stage):
    """Killed after handling GET_CONFIG, before (handled) or after (consumed) the message
    left the socket: the successor answers it, exactly once."""
    d = Supervised(tmp_path, env={"VUB_CRASH_AT": f"{stage}:GET_CONFIG"})
    g = Guest(d.sock)
    try:
        old = d.child()
        hdr, payload, _ = g.fe.call(R.GET_CONFIG, m.encode_config(0, 0, bytes(16)),
                                    need_reply=True)
        assert hdr.request == R.GET_CONFIG and len(payload) == 12 + 16
        st = d.wait_serving(not_pid=old)
        assert st["process"]["restarts"] == 1 and st["process"]["restored"]
        assert "killing myself" in d.log_text()
        g.fe.sock.settimeout(1.0)
        with pytest.raises(socket.timeout):
            g.fe.recv()  # exactly one reply
        g.fe.sock.settimeout(20)
        assert g.fe.ack(R.SET_VRING_ENABLE, m.VRING_STATE.pack(0, 1)) == 0  # in step
        h = g.post("reporting", [], [(g.data[0], 2 * MiB)])
        assert [u.id for u in g.wait_used("reporting")] == [h]
    finally:
        g.close()
        d.stop()


@pytest.mark.parametrize("read_at_once", [False, True], ids=["unread", "read"])
def test_kill_between_sending_a_reply_and_recording_it(tmp_path, read_at_once):
    """Killed right after sending GET_CONFIG's reply, before recording that: the reply
    went out through the outbox pipe (vhostuser/restart.py), which is empty now, so the
    successor sends nothing, whether the frontend read the reply already (as QEMU,
    blocked in recv, does at once) or not yet. (The SIOCOUTQ check this replaced
    answered a reply the frontend had already read a second time.)"""
    d = Supervised(tmp_path, env={"VUB_CRASH_AT": "sent:GET_CONFIG"})
    g = Guest(d.sock)
    try:
        old = d.child()
        g.fe.send(R.GET_CONFIG, m.encode_config(0, 0, bytes(16)), need_reply=True)
        if read_at_once:
            hdr, payload, _ = g.fe.recv()
            assert hdr.request == R.GET_CONFIG
        st = d.wait_serving(not_pid=old)
        assert st["process"]["restarts"] == 1 and st["process"]["restored"]
        assert "0 of 40 bytes left to send" in d.log.read_text(), d.log_text()
        if not read_at_once:
            hdr, payload, _ = g.fe.recv()
        assert hdr.request == R.GET_CONFIG and len(payload) == 12 + 16
        g.fe.sock.settimeout(1.0)
        with pytest.raises(socket.timeout):
            g.fe.recv()  # exactly one reply
        g.fe.sock.settimeout(20)
        assert g.fe.ack(R.SET_VRING_ENABLE, m.VRING_STATE.pack(0, 1)) == 0  # in step
    finally:
        g.close()
        d.stop()


def test_kill_while_handling_a_message_with_an_fd(tmp_path):
    """The first SET_VRING_CALL of the handshake (an fd, NEED_REPLY) is handled, then the
    process is killed before the message leaves the socket: the successor takes it (and
    its fd) once and acks it once; every later ack of the handshake matches its request
    (Frontend.ack checks), and the ring works."""
    d = Supervised(tmp_path, env={"VUB_CRASH_AT": "handled:SET_VRING_CALL"})
    g = None
    try:
        g = Guest(d.sock)
        st = d.wait_serving()
        assert st["process"]["restarts"] == 1 and "killing myself" in d.log_text()
        h = g.post("reporting", [], [(g.data[0], 2 * MiB)])
        assert [u.id for u in g.wait_used("reporting")] == [h]
        g.fe.sock.settimeout(1.0)
        with pytest.raises(socket.timeout):
            g.fe.recv()  # no stray reply
    finally:
        if g is not None:
            g.close()
        d.stop()


def test_kill_after_discard_before_completion_completes_the_chain_once(tmp_path):
    d = Supervised(tmp_path, env={"VUB_CRASH_AT": "discarded:reporting"})
    g = Guest(d.sock)
    try:
        old = d.child()
        before = g.blocks()
        h = g.post("reporting", [], [(g.data[3], 2 * MiB)])
        used = g.wait_used("reporting")
        assert [u.id for u in used] == [h]
        st = d.wait_serving(not_pid=old)
        assert st["process"]["restarts"] == 1
        log = d.log_text()
        assert "killing myself after discarding a chain" in log
        assert "1 chain(s) in flight at the restart are redone" in log
        assert g.wait_used("reporting", timeout=1) == []  # once, not twice
        assert before - g.blocks() >= 2 * MiB - 64 * 1024  # (reading it back allocates it)
        assert g.mem.read(g.data[3], 2 * MiB) == bytes(2 * MiB)
        h2 = g.post("reporting", [], [(g.data[4], 2 * MiB)])
        assert [u.id for u in g.wait_used("reporting")] == [h2]
    finally:
        g.close()
        d.stop()


def test_kill_with_a_config_change_in_flight(tmp_path):
    """Killed right after sending CONFIG_CHANGE_MSG, before reading its ack: the target
    survives, the stale ack is read by the successor, which signals the change again."""
    d = Supervised(tmp_path, env={"VUB_CRASH_AT": "sent:CONFIG_CHANGE_MSG"})
    g = Guest(d.sock)
    try:
        old = d.child()
        try:
            control_request(d.ctl, {"cmd": "target", "bytes": 32 * MiB}, timeout=5)
        except ControlError:
            pass  # the daemon died before answering
        bs = g.fe.backend_sock
        for _ in range(2):  # one from the killed process, one from its successor
            hdr = m.HEADER.unpack(bs.recv(m.HEADER.size))
            assert hdr[0] == m.BackendRequest.CONFIG_CHANGE_MSG
            bs.sendall(m.encode(m.BackendRequest.CONFIG_CHANGE_MSG, m.U64.pack(0),
                                m.VERSION | m.FLAG_REPLY))
        st = d.wait_serving(not_pid=old)
        assert st["target_pages"] == 32 * MiB >> 12 and st["connected"]
        hdr, payload, _ = g.fe.call(R.GET_CONFIG, m.encode_config(0, 0, bytes(16)),
                                    need_reply=True)
        assert struct.unpack("<I", payload[12:16])[0] == 32 * MiB >> 12
        h = g.post("reporting", [], [(g.data[0], 2 * MiB)])
        assert [u.id for u in g.wait_used("reporting")] == [h]
    finally:
        g.close()
        d.stop()


def test_a_session_that_cannot_be_restored_is_dropped_not_crash_looped(tmp_path):
    """A successor that cannot restore the session (VUB_CRASH_AT=restore makes the first
    successor's restore fail) drops that frontend (QEMU would see the disconnect) and,
    serving one guest, stops cleanly instead of dying on every restart."""
    d = Supervised(tmp_path, env={"VUB_CRASH_AT": "restore"})
    g = Guest(d.sock)
    try:
        d.kill_child()
        assert d.proc.wait(60) == 0, d.log_text()
        assert "cannot restore the session; dropping the frontend" in d.log_text()
        assert not g.fe.alive
    finally:
        g.fe.close()


def test_counters_survive_a_kill(daemon):
    g = Guest(daemon.sock)
    try:
        h = g.post("reporting", [], [(g.data[0], 2 * MiB)])
        assert [u.id for u in g.wait_used("reporting")] == [h]
        time.sleep(3)  # > CHECKPOINT_EVERY
        old = daemon.kill_child()
        st = daemon.wait_serving(not_pid=old)
        assert st["counters"]["bytes_discarded"] == 2 * MiB
        assert st["counters"]["report_chains"] == 1
    finally:
        g.close()


def test_two_regions_of_one_memfd_survive_a_kill(daemon):
    """QEMU maps RAM below and above the PCI hole as two regions of one memfd. The store
    keeps one copy of a file (systemd drops duplicates, and so does the supervisor): the
    second region's name is an alias of the first, and both come back."""
    g = Guest(daemon.sock, regions=[(0x0, 48 * MiB), (0x100000000, 48 * MiB)])
    try:
        stored = daemon.status()["process"]
        old = daemon.kill_child()
        st = daemon.wait_serving(not_pid=old)
        assert st["process"]["restored"], daemon.log_text()
        assert st["memory_bytes"] == 96 * MiB
        lo = [a for a in g.data if a < 0x100000000]
        hi = [g.mem.alloc(2 * MiB, align=2 * MiB, region=1)]
        assert lo and hi[0] >= 0x100000000
        g.mem.fill(hi[0], 2 * MiB, 0xA5)
        h = g.post("reporting", [], [(lo[0], 2 * MiB), (hi[0], 2 * MiB)])
        assert [u.id for u in g.wait_used("reporting")] == [h]
        assert g.mem.read(hi[0], 16) == bytes(16) and g.mem.read(lo[0], 16) == bytes(16)
        del stored
    finally:
        g.close()


def test_the_same_call_eventfd_sent_again_survives_a_kill(daemon):
    """QEMU sends SET_VRING_CALL again with the eventfd it sent before (at vhost start).
    The store keeps one copy of a file (systemd and the supervisor drop the second): the
    new entry takes the old name, which stays in the store after the old entry goes."""
    g = Guest(daemon.sock)
    try:
        index = F.queue_roles(g.features).index("reporting")
        call = g.calls["reporting"]
        again = os.dup(call)
        assert g.fe.ack(R.SET_VRING_CALL, m.U64.pack(index), [again]) == 0
        os.close(again)
        old = daemon.kill_child()
        st = daemon.wait_serving(not_pid=old)
        assert st["process"]["restored"], daemon.log_text()
        while True:  # drop the interrupts of the restart itself
            try:
                os.eventfd_read(call)
            except BlockingIOError:
                break
        h = g.post("reporting", [], [(g.data[0], 2 * MiB)])
        assert [u.id for u in g.wait_used("reporting")] == [h]
        time.sleep(0.2)
        assert os.eventfd_read(call) >= 1
    finally:
        g.close()
