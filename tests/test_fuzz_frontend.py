"""Fuzzing the frontend channel (vhost-user socket), CI-sized.

A Hypothesis-driven frontend sends sessions of valid, nearly valid and
hostile messages (tests/fuzz/vhost_gen.py) to

* a RUNNING daemon process (``python -m balloon_device.host.cli --socket-path S
  --keep-listening --log-level warning``) over a real Unix socket, and
* an in-process Server over a socketpair (faster, and any exception that
  escapes the event loop fails the test with its traceback).

Oracle, after every message: the backend answered with well-framed replies
to that message (then to a GET_FEATURES probe) or disconnected cleanly;
after every session: the daemon is alive, its fd count is back to the idle
baseline once the session is closed, and a fresh frontend gets GET_FEATURES
answered within 5 s.

max_examples: the "ci" profile asks 2000 examples per test; each example
here is a whole session of up to ~60 messages through a subprocess (a few ms
to ~100 ms each), so the subprocess test runs 250 examples and 100 longer
random sessions (about 3500 messages in ~20 s) and the in-process one 300.  The long run is
scripts/fuzz_frontend.py.
"""

import os
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balloon_device.device import BalloonDevice
from fuzz.source import HypothesisSource, RandomSource
from fuzz.vhost_gen import (DaemonProcess, SessionRunner, gen_session, run_session_on_daemon)
from vhostuser.connection import Listener
from vhostuser.loop import Server

COUNT = {"messages": 0, "sessions": 0}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = DaemonProcess(str(tmp_path_factory.mktemp("fuzzd"))).start()
    yield d
    rc = d.stop()
    print(f"\nfrontend fuzz (daemon): {COUNT['messages']} messages in {COUNT['sessions']} "
          f"sessions; daemon exit code {rc}")
    assert rc == 0, d.log_tail()


def check_daemon(d, excess):
    assert d.alive(), f"daemon died (rc {d.proc.poll()}):\n{d.log_tail()}"
    assert excess == 0, (f"daemon holds {excess} more fds than at idle after the session closed: "
                         f"{set(os.listdir(f'/proc/{d.pid}/fd'))}")
    assert d.probe(), f"daemon does not answer a fresh frontend:\n{d.log_tail()}"
    assert d.wait_idle() == 0


@settings(max_examples=250)  # each example is a subprocess session: see the module docstring
@given(st.data())
def test_fuzz_running_daemon(daemon, data):
    daemon.ensure_running()  # a crash fails the example that caused it, not all later ones
    actions = gen_session(HypothesisSource(data), max_actions=30)
    sent, excess = run_session_on_daemon(daemon, actions)
    COUNT["messages"] += sent
    COUNT["sessions"] += 1
    check_daemon(daemon, excess)


def test_fuzz_running_daemon_random_burst(daemon):
    """Plain random sessions with longer sequences (fixed seeds: reproducible)."""
    for seed in range(100):
        sent, excess = run_session_on_daemon(daemon, gen_session(RandomSource(seed), 80))
        COUNT["messages"] += sent
        COUNT["sessions"] += 1
        check_daemon(daemon, excess)
    assert COUNT["messages"] > 2000


def _open_fds():
    return len(os.listdir("/proc/self/fd"))


@settings(max_examples=300)  # a session per example; 300 keep the file under ~20 s
@given(st.data())
def test_fuzz_in_process(data):
    actions = gen_session(HypothesisSource(data), max_actions=30)
    before = _open_fds()
    ours, theirs = socket.socketpair()
    server = Server(BalloonDevice(), Listener(theirs))
    runner = SessionRunner(ours, step=lambda t: server.loop.run_once(timeout=0))
    try:
        runner.run(actions)
    finally:
        runner.close()
        for _ in range(5):
            server.loop.run_once(timeout=0)
        assert server.conn is None, "the server did not notice the closed session"
        server.close()
        server.loop.close()
    assert _open_fds() == before
