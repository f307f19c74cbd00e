"""A Hypothesis state machine that kills the serving process at arbitrary points.

The daemon runs under its real supervisor (test_restart.Supervised); the machine plays
QEMU over a real socket with a driver's rings in a memfd (test_restart.Guest). Kills
come two ways: from outside (SIGKILL at a random moment, also in the middle of a
message: the first k bytes sent, the kill, then the rest), and from inside: the r-th
serving process kills itself at its N_r-th internal boundary (VUB_CRASH_AFTER=N0,N1,..,
see balloon_device/host/state.py: state writes, progress records and the moments just
before them, chain discards, CONFIG_CHANGE_MSG sends), the Ns chosen by Hypothesis.

The frontend's view is checked after every step: each request that wants a reply got
exactly one, of its own type (an extra reply left in the socket is a failure), each
posted chain is used exactly once by id (the driver raises on a chain used twice),
chains keep being completed after each kill, the supervisor is alive and the
frontend's socket never saw EOF.

Each example starts a daemon and each kill costs a Python start-up (0.3-1 s), so the
machine is small: 12 examples of up to 8 steps, derandomized (no example database)
so that CI runs the same examples every time.
"""

import os
import select
import shutil
import signal
import socket
import struct
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from test_restart import MiB, Guest, Supervised
from vhostuser import messages as m
from vhostuser.messages import Request as R

# reply-wanting requests: (name, build(guest) -> (request, payload, need_reply))
REQUESTS = {
    "GET_CONFIG": lambda g: (R.GET_CONFIG, m.encode_config(0, 0, bytes(16)), True),
    "GET_FEATURES": lambda g: (R.GET_FEATURES, b"", False),
    "GET_PROTOCOL_FEATURES": lambda g: (R.GET_PROTOCOL_FEATURES, b"", False),
    "GET_QUEUE_NUM": lambda g: (R.GET_QUEUE_NUM, b"", False),
    "SET_VRING_ENABLE": lambda g: (R.SET_VRING_ENABLE,
                                   m.VRING_STATE.pack(g.index("reporting"), 1), True),
    "SET_CONFIG": lambda g: (R.SET_CONFIG, m.encode_config(4, 0, struct.pack("<I", 0)), True),
}
REPLY_TIMEOUT = 60      # a reply may wait for a restart (back-off included)
USED_TIMEOUT = 60
PAGE = 4096


class MachineGuest(Guest):
    def index(self, role):
        return list(self.q).index(role)


class KillMachine(RuleBasedStateMachine):
    """See the module docstring."""

    def __init__(self):
        super().__init__()
        self.tmp = None
        self.d = self.g = None
        self.outstanding = {}       # role -> set of heads posted, not yet used
        self.used = 0
        self.kills = 0
        self.slot = 0

    # the QEMU-like handshake (test_restart.Guest) passes 206 boundaries; then each request
    # passes 5 and each chain 1 (more with a state write). The first process dies at
    # its first N (0: never), the next ones (restarted after any kill) at theirs.
    @initialize(first=st.one_of(st.integers(207, 245), st.integers(1, 206), st.just(0)),
                later=st.lists(st.integers(1, 30), min_size=1, max_size=3))
    def start(self, first, later):
        crash_after = ",".join(str(n) for n in [first, *later])
        self.tmp = Path(tempfile.mkdtemp(prefix="vub-killsm-"))
        env = {"VUB_CRASH_AFTER": crash_after}
        self.d = Supervised(self.tmp, env=env)
        self.g = MachineGuest(self.d.sock)
        self.outstanding = {role: set() for role in self.g.q}

    def teardown(self):
        try:
            if self.g is not None:
                self.final_check()
        finally:
            if self.g is not None:
                self.g.close()
            if self.d is not None:
                self.d.stop()
            if self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)

    # ---- the frontend's side ------------------------------------------------------

    def fail(self, what):
        raise AssertionError(f"{what}\n--- daemon log tail ---\n{self.d.log_text()}")

    def read_reply(self, req):
        self.g.fe.sock.settimeout(REPLY_TIMEOUT)
        try:
            hdr, payload, fds = self.g.fe.recv()
        except socket.timeout:
            self.fail(f"no reply to {req.name} within {REPLY_TIMEOUT}s")
        for fd in fds:
            os.close(fd)
        if hdr.request != req:
            self.fail(f"reply of type {hdr.request} to {req.name} (a duplicated or "
                      "stray reply)")
        if not hdr.flags & m.FLAG_REPLY:
            self.fail(f"reply to {req.name} without the REPLY flag: {hdr}")
        if req in (R.SET_VRING_ENABLE, R.SET_CONFIG):
            assert struct.unpack("<Q", payload)[0] == 0, (req, payload)
        elif req == R.GET_CONFIG:
            assert len(payload) == 12 + 16, payload
        else:
            assert len(payload) == 8, payload

    def nothing_extra(self):
        """No reply is waiting in the frontend's socket (one would be a duplicate)."""
        p = select.poll()
        p.register(self.g.fe.sock.fileno(), select.POLLIN)
        if p.poll(0):
            self.fail("an unexpected message is waiting in the frontend's socket")

    def build(self, name):
        req, payload, need_reply = REQUESTS[name](self.g)
        flags = m.VERSION | (m.FLAG_NEED_REPLY if need_reply else 0)
        return req, m.encode(req, payload, flags)

    def kill(self):
        """SIGKILL the serving process now (from outside)."""
        pid = self.d.wait_serving()["process"]["pid"]
        try:
            os.kill(pid, signal.SIGKILL)
            self.kills += 1
        except ProcessLookupError:
            pass

    # ---- rules ----------------------------------------------------------------------

    @rule(name=st.sampled_from(sorted(REQUESTS)))
    def request(self, name):
        req, raw = self.build(name)
        self.g.fe.send_raw(raw)
        self.read_reply(req)

    @rule(name=st.sampled_from(sorted(REQUESTS)), delay=st.sampled_from([0, 0.001, 0.01]))
    def request_then_kill(self, name, delay):
        req, raw = self.build(name)
        self.g.fe.send_raw(raw)
        if delay:
            time.sleep(delay)
        self.kill()
        self.read_reply(req)

    @rule(name=st.sampled_from(sorted(REQUESTS)), cut=st.integers(1, 100))
    def partial_message_then_kill(self, name, cut):
        req, raw = self.build(name)
        cut = min(cut, len(raw) - 1)
        self.g.fe.send_raw(raw[:cut])
        time.sleep(0.02)
        self.kill()
        time.sleep(0.05)
        self.g.fe.send_raw(raw[cut:])
        self.read_reply(req)

    def data_page(self):
        self.slot = (self.slot + 1) % len(self.g.data)
        return self.g.data[self.slot]

    @rule(n=st.integers(1, 3), kick=st.booleans())
    def report(self, n, kick):
        for _ in range(n):
            gpa = self.data_page()
            head = self.g.post("reporting", [], [(gpa, MiB), (gpa + MiB, MiB)], kick=kick)
            self.outstanding["reporting"].add(head)
        if not kick:
            os.eventfd_write(self.g.kicks["reporting"], 1)

    @rule(role=st.sampled_from(["inflate", "deflate"]), pages=st.integers(1, 64))
    def balloon(self, role, pages):
        base = self.data_page() // PAGE
        pfns = struct.pack(f"<{pages}I", *range(base, base + pages))
        head = self.g.post(role, [pfns], [])
        self.outstanding[role].add(head)

    @rule(delay=st.sampled_from([0, 0.005, 0.05, 0.3]))
    def kill_later(self, delay):
        time.sleep(delay)
        self.kill()

    @rule(mib=st.sampled_from([0, 8, 16]))
    def target(self, mib):
        """A balloon target (CONFIG_CHANGE_MSG on the backend channel); the ack is
        sent by the frontend's backend-channel reader in collect()."""
        from balloon_device.host.control import request as control_request
        from balloon_device.host.errors import ControlError
        try:
            control_request(self.d.ctl, {"cmd": "target", "bytes": mib * MiB}, timeout=5)
        except (ControlError, OSError):
            pass  # a kill in between: the target is then not set; fine

    # ---- invariants -----------------------------------------------------------------

    def ack_config_changes(self):
        bs = self.g.fe.backend_sock
        while True:
            r, _, _ = select.select([bs], [], [], 0)
            if not r:
                return
            hdr = m.HEADER.unpack(bs.recv(m.HEADER.size))
            assert hdr[0] == m.BackendRequest.CONFIG_CHANGE_MSG, hdr
            if hdr[2]:
                bs.recv(hdr[2])
            if hdr[1] & m.FLAG_NEED_REPLY:
                bs.sendall(m.encode(m.BackendRequest.CONFIG_CHANGE_MSG, m.U64.pack(0),
                                    m.VERSION | m.FLAG_REPLY))

    def collect(self, timeout=USED_TIMEOUT):
        """Every posted chain used, once (pop_used raises on a head used twice)."""
        deadline = time.monotonic() + timeout
        while any(self.outstanding.values()):
            self.ack_config_changes()
            for role, heads in self.outstanding.items():
                for u in self.g.q[role].pop_used():
                    if u.id not in heads:
                        self.fail(f"{role}: chain {u.id} used but not outstanding")
                    heads.discard(u.id)
                    self.used += 1
            if time.monotonic() > deadline:
                self.fail(f"chains never used: {self.outstanding}")
            time.sleep(0.01)
        self.ack_config_changes()

    @invariant()
    def frontends_view(self):
        if self.g is None:
            return
        assert self.d.proc.poll() is None, self.d.log_text()
        if not self.g.fe.alive:
            self.fail("the frontend's socket saw EOF")
        self.collect()
        self.nothing_extra()

    def final_check(self):
        """The rings continue after everything: a fresh chain and a fresh request are
        served, and no late reply turns up once a stable process serves."""
        self.d.wait_serving()
        head = self.g.post("reporting", [], [(self.data_page(), 2 * MiB)])
        self.outstanding["reporting"].add(head)
        self.collect()
        self.request("GET_FEATURES")
        self.ack_config_changes()
        self.nothing_extra()
        assert self.g.fe.alive and self.d.proc.poll() is None
        log = self.d.log.read_text(errors="replace")
        assert "frontend disconnected" not in log
        # what the example exercised (pytest --hypothesis-show-statistics)
        for line in log.splitlines():
            if "VUB_CRASH_AFTER: killing myself" in line:
                event("internal kill at a " + line.rsplit(", a ", 1)[1])
        event(f"outside kills: {min(self.kills, 3)}{'+' if self.kills > 3 else ''}")
        event(f"restarts: {log.count('started serving process') - 1}")


KillMachine.TestCase.settings = settings(
    max_examples=12, stateful_step_count=8, deadline=None, derandomize=True,
    database=None, suppress_health_check=list(HealthCheck))
TestKillMachine = KillMachine.TestCase
