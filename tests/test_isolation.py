"""Fault isolation between the guests of a supervised multi-guest daemon.

Under the built-in supervisor each guest has its own serving process (a unit) and a
manager process holds the main control socket, metrics and the policy. The tests play
QEMU over real sockets (test_restart's Guest) and hurt one guest's process: a SIGBUS
caused by its frontend, a SIGKILL, a hang; the other guest keeps its process and its
service. Guests are also added and removed at run time.
"""

import os
import re
import signal
import statistics
import threading
import time
import urllib.request

import pytest

import vhostuser.testing.driver as driver_mod
from balloon_device.host.control import request as control_request
from test_restart import MiB, Guest, Supervised

pytestmark = pytest.mark.timeout(300)


def shm_file(name, size):
    """Guest RAM in a /dev/shm file: unlike a memfd it cannot be sealed, so its owner
    can shrink it under the daemon's mapping (docs/threat-model.md)."""
    path = f"/dev/shm/vub-isolation-{os.getpid()}-{time.monotonic_ns()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    os.unlink(path)
    os.ftruncate(fd, size)
    return fd


def ctl(d, req, timeout=10):
    return control_request(d.ctl, req, timeout=timeout)


def pid_of(d, name):
    return d.status(name)["process"]["pid"]


def wait_for(pred, timeout=60, what="condition", d=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = pred()
        except Exception:
            got = None
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}" + (f":\n{d.log_text()}" if d else ""))


def wait_unit(d, name, not_pid=None, timeout=60):
    """The guest's status once its process answers (a pid other than not_pid)."""
    def ready():
        st = d.status(name)
        pid = st["process"].get("pid")
        return st if pid is not None and pid != not_pid else None
    return wait_for(ready, timeout, f"guest {name}'s process", d)


def report_once(g, i):
    """One reporting chain, posted and completed; its latency in seconds."""
    t0 = time.monotonic()
    h = g.post("reporting", [], [(g.data[i % len(g.data)], 2 * MiB)])
    used = []
    while not used and time.monotonic() - t0 < 30:
        used = g.q["reporting"].pop_used()   # raises on a chain completed twice
        time.sleep(0.0005)
    elapsed = time.monotonic() - t0
    assert [u.id for u in used] == [h]
    assert g.wait_used("reporting", timeout=0) == []
    return elapsed


def latencies(g, n, start=0):
    return [report_once(g, start + i) for i in range(n)]


def children(pid):
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(p) for p in f.read().split()]
    return out


def manager_pid(d, guests=("a", "b")):
    """The supervisor's child that serves no guest."""
    serving = {wait_unit(d, n)["process"]["pid"] for n in guests}
    rest = set(children(d.proc.pid)) - serving
    assert len(rest) == 1, (rest, serving)
    return rest.pop()


def ms(values):
    return f"p50 {statistics.median(values) * 1e3:.1f} ms, max {max(values) * 1e3:.1f} ms"


@pytest.fixture
def two(tmp_path):
    d = Supervised(tmp_path, "--unit-watchdog", "0", guests=("a", "b"))
    yield d
    d.stop()


def connect(tmp_path, d, name, **kw):
    """A frontend on the guest's socket (its process starts when it connects)."""
    path = tmp_path / f"{name}.sock"
    wait_for(lambda: path.exists(), 60, f"{path}", d)
    g = Guest(str(path), **kw)
    wait_unit(d, name)
    return g


def test_a_guest_gets_its_process_when_its_frontend_comes(tmp_path):
    """No frontend, no process: the supervisor holds the guest's listening socket and
    forks the guest's process when a connection is pending; that process serves it and
    survives a restart like any other. A guest removed before it ever connected leaves
    no socket behind."""
    d = Supervised(tmp_path, "--unit-watchdog", "0", guests=("a", "b", "c"))
    a = None
    try:
        mgr = manager_pid(d, ())
        assert set(children(d.proc.pid)) == {mgr}             # the manager only
        assert all((tmp_path / f"{n}.sock").exists() for n in "abc")
        st = ctl(d, {"cmd": "status"})
        assert st["ok"] and set(st["guests"]) == {"a", "b", "c"}
        for n in "abc":
            p = st["guests"][n]["process"]
            assert p["unit"] == "waiting" and p["pid"] is None and "error" not in p, p
            assert not st["guests"][n]["connected"]
        from balloon_device.host import status_view
        rows = {r[0]: r[1] for r in map(status_view.row, ctl(d, {"cmd": "list"})["guests"])}
        assert rows == {"a": "waiting", "b": "waiting", "c": "waiting"}
        refused = ctl(d, {"cmd": "target", "guest": "a", "bytes": MiB})
        assert not refused["ok"] and "no frontend has connected" in refused["error"]
        a = connect(tmp_path, d, "a")
        report_once(a, 0)
        pa = pid_of(d, "a")
        assert set(children(d.proc.pid)) == {mgr, pa}          # b and c still have none
        with open(f"/proc/{pa}/comm") as f:
            assert f.read().strip() == "vub-guest-a"
        assert ctl(d, {"cmd": "status", "guest": "b"})["status"]["process"]["unit"] == "waiting"
        assert ctl(d, {"cmd": "target", "guest": "a", "bytes": 8 * MiB})["ok"]
        os.kill(pa, signal.SIGKILL)                            # the on-demand unit restarts
        st = wait_unit(d, "a", not_pid=pa)
        assert st["process"]["restored"] and st["connected"] and a.fe.alive
        assert st["target_pages"] == 8 * MiB >> 12
        report_once(a, 1)
        assert ctl(d, {"cmd": "remove-guest", "guest": "c"})["ok"]
        wait_for(lambda: not (tmp_path / "c.sock").exists(), 30, "c's socket to go", d)
        assert len(children(d.proc.pid)) == 2                  # a's process, the manager
    finally:
        if a is not None:
            a.close()
        d.stop()
    assert not any((tmp_path / f"{n}.sock").exists() for n in "abc")


def test_each_guest_has_its_own_process(two, tmp_path):
    a, b = connect(tmp_path, two, "a"), connect(tmp_path, two, "b")
    a.close()
    b.close()
    pa, pb = pid_of(two, "a"), pid_of(two, "b")
    mgr = manager_pid(two)
    assert len({pa, pb, mgr, two.proc.pid}) == 4
    assert set(children(two.proc.pid)) == {pa, pb, mgr}
    with open(f"/proc/{pa}/comm") as fa, open(f"/proc/{mgr}/comm") as fm:
        assert (fa.read().strip(), fm.read().strip()) == ("vub-guest-a", "vub-manager")
    st = ctl(two, {"cmd": "status"})
    assert st["ok"] and set(st["guests"]) == {"a", "b"}
    # each guest's own control socket, beside the main one
    own = control_request(two.ctl + ".a", {"cmd": "status"})
    assert own["ok"] and own["status"]["name"] == "a" and own["status"]["process"]["pid"] == pa


def test_sigbus_from_one_frontend_costs_only_that_guest(two, tmp_path, monkeypatch):
    """a's frontend gives a /dev/shm file as guest RAM, shrinks it after SET_MEM_TABLE and
    kicks: a's process dies of SIGBUS on its next ring read. b keeps its process and its
    service; the supervisor restarts a's process, which cannot map the shrunk file again
    and so drops a's session cleanly (its frontend sees the socket close) and listens
    for a's QEMU to come back."""
    b = connect(tmp_path, two, "b")
    monkeypatch.setattr(driver_mod, "sealed_memfd", shm_file)
    a = connect(tmp_path, two, "a")
    monkeypatch.undo()
    try:
        pa, pb, mgr = pid_of(two, "a"), pid_of(two, "b"), manager_pid(two)
        before = latencies(b, 20)
        report_once(a, 0)                              # a is served too, until ...
        a.post("reporting", [], [(a.data[1], 2 * MiB)], kick=False)
        os.ftruncate(a.mem.fd, 0)                      # ... its frontend shrinks its RAM
        os.eventfd_write(a.kicks["reporting"], 1)
        during = latencies(b, 20, start=20)            # b served while a dies and restarts
        st = wait_unit(two, "a", not_pid=pa)
        after = latencies(b, 20, start=40)
        print(f"\nb's report latency: before {ms(before)}; while a died and restarted "
              f"{ms(during)}; after {ms(after)}")
        log = two.log_text()
        assert "unit guest a" in log and "killed by SIGBUS" in log, log
        assert st["process"]["restarts"] == 1
        assert not st["connected"] and "cannot restore the session" in log
        wait_for(lambda: not a.fe.alive, 30, "a's frontend to see its session end")
        assert pid_of(two, "b") == pb and two.status("b")["process"]["restarts"] == 0
        assert two.status("b")["connected"] and b.fe.alive
        assert manager_pid(two) == mgr and two.proc.poll() is None
        # a's socket still listens: its QEMU may come back
        a2 = Guest(str(tmp_path / "a.sock"))
        try:
            report_once(a2, 0)
        finally:
            a2.close()
    finally:
        b.close()
        a.fe.close()
        os.close(a.mem.fd)


def test_sigkill_of_one_guest_process(two, tmp_path):
    a, b = connect(tmp_path, two, "a"), connect(tmp_path, two, "b")
    try:
        target = ctl(two, {"cmd": "target", "guest": "a", "bytes": 16 * MiB})
        assert target["ok"], target
        pa, pb = pid_of(two, "a"), pid_of(two, "b")
        report_once(a, 0)
        os.kill(pa, signal.SIGKILL)
        latencies(b, 10)                               # b is served while a is dead
        st = wait_unit(two, "a", not_pid=pa)
        assert st["process"]["restored"] and st["connected"] and a.fe.alive
        assert st["target_pages"] == 16 * MiB >> 12
        report_once(a, 1)
        assert pid_of(two, "b") == pb
        assert two.status("b")["process"]["restarts"] == 0
        report_once(b, 11)
    finally:
        a.close()
        b.close()


def test_hung_guest_process_is_killed_by_the_watchdog(tmp_path):
    d = Supervised(tmp_path, "--unit-watchdog", "4", guests=("a", "b"))
    a = b = None
    try:
        a, b = connect(tmp_path, d, "a"), connect(tmp_path, d, "b")
        time.sleep(5)                                  # pings keep healthy units alive
        pa, pb = pid_of(d, "a"), pid_of(d, "b")
        assert "watchdog" not in d.log_text()
        os.kill(pa, signal.SIGSTOP)
        t0 = time.monotonic()
        n = 0
        while "watchdog: unit guest a" not in d.log_text():   # b is served while a hangs
            assert time.monotonic() - t0 < 60, d.log_text()
            report_once(b, n)
            n += 1
        st = wait_unit(d, "a", not_pid=pa)
        print(f"\nb served {n} chains while a hung; a restarted {time.monotonic() - t0:.1f} s "
              "after it stopped")
        assert re.search(r"watchdog: unit guest a \(pid %d\) sent no WATCHDOG=1" % pa,
                         d.log_text()), d.log_text()
        assert st["process"]["restored"] and st["connected"] and a.fe.alive
        report_once(a, 0)
        assert pid_of(d, "b") == pb
    finally:
        for g in (a, b):
            if g is not None:
                g.close()
        d.stop()


def test_status_and_metrics_show_a_guest_whose_process_does_not_answer(tmp_path):
    d = Supervised(tmp_path, "--unit-watchdog", "0", "--metrics-port", "0", guests=("a", "b"))
    a = b = None
    try:
        a, b = connect(tmp_path, d, "a"), connect(tmp_path, d, "b")
        port = int(wait_for(lambda: re.search(r"metrics on http://127\.0\.0\.1:(\d+)/",
                                              d.log.read_text()), 30, "metrics").group(1))
        pa = pid_of(d, "a")
        os.kill(pa, signal.SIGSTOP)
        try:
            st = ctl(d, {"cmd": "status"})
            assert st["ok"] and set(st["guests"]) == {"a", "b"}
            assert st["guests"]["a"]["process"]["unit"] == "unreachable"
            assert not st["guests"]["a"]["connected"] and st["guests"]["b"]["connected"]
            one = ctl(d, {"cmd": "status", "guest": "a"})
            assert one["ok"] and one["status"]["process"]["pid"] is None
            lst = ctl(d, {"cmd": "list"})
            assert [g["name"] for g in lst["guests"]] == ["a", "b"]
            from balloon_device.host import status_view
            rows = {r[0]: r[1] for r in map(status_view.row, lst["guests"])}
            assert rows == {"a": "no answer", "b": "serving"}
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10
                                          ).read().decode()
            assert 'vhost_user_balloon_connected{guest="a"} 0.0' in text
            assert 'vhost_user_balloon_connected{guest="b"} 1.0' in text
            refused = ctl(d, {"cmd": "target", "guest": "a", "bytes": MiB})
            assert not refused["ok"] and "does not answer" in refused["error"]
            report_once(b, 0)
        finally:
            os.kill(pa, signal.SIGCONT)
        st = wait_for(lambda: d.status("a")["process"].get("pid") == pa, 30, "a again", d)
        assert st and d.status("a")["connected"]
        report_once(a, 0)
    finally:
        for g in (a, b):
            if g is not None:
                g.close()
        d.stop()


class Reporter(threading.Thread):
    """Keeps one guest reporting until stopped; counts completed chains."""

    def __init__(self, g):
        super().__init__(daemon=True)
        self.g, self.done, self.error = g, 0, None
        self.halt = threading.Event()

    def run(self):
        try:
            while not self.halt.is_set():
                report_once(self.g, self.done)
                self.done += 1
        except BaseException as e:
            self.error = e

    def count(self):
        assert self.error is None, self.error
        return self.done

    def stop(self):
        self.halt.set()
        self.join(60)
        assert self.error is None, self.error


@pytest.mark.parametrize("supervise", [True, False], ids=["supervised", "one-process"])
def test_add_and_remove_a_guest_at_run_time(tmp_path, supervise):
    extra = () if supervise else ("--no-supervise",)
    d = Supervised(tmp_path, *extra, guests=("b",))
    b = connect(tmp_path, d, "b")
    rep = Reporter(b)
    rep.start()
    a = None
    try:
        pb = pid_of(d, "b")
        from balloon_device.host.cli import main
        n0 = wait_for(rep.count, 30, "b reporting")
        assert main(["ctl", "--control-socket", d.ctl, "add-guest",
                     f"a={tmp_path}/a.sock"]) == 0
        again = ctl(d, {"cmd": "add-guest", "guest": "a", "path": f"{tmp_path}/a.sock"})
        assert not again["ok"] and "already" in again["error"]
        bad = ctl(d, {"cmd": "add-guest", "guest": "x/y", "path": f"{tmp_path}/x.sock"})
        assert not bad["ok"] and "guest name" in bad["error"]
        taken = ctl(d, {"cmd": "add-guest", "guest": "c", "path": f"{tmp_path}/b.sock"})
        assert not taken["ok"] and "another guest" in taken["error"]
        unknown = ctl(d, {"cmd": "remove-guest", "guest": "nope"})
        assert not unknown["ok"] and "no guest 'nope'" in unknown["error"]
        a = connect(tmp_path, d, "a")
        report_once(a, 0)
        if supervise:
            assert pid_of(d, "a") not in (pb, d.proc.pid)
            # a restarted manager knows the guest added at run time
            mgr = manager_pid(d, ("a", "b"))
            os.kill(mgr, signal.SIGKILL)
            wait_for(lambda: manager_pid(d, ("a", "b")) != mgr, 30, "a new manager", d)
            assert [g["name"] for g in ctl(d, {"cmd": "list"})["guests"]] == ["b", "a"]
        n1 = rep.count()
        assert main(["ctl", "--control-socket", d.ctl, "remove-guest", "a"]) == 0
        wait_for(lambda: not a.fe.alive, 30, "a's session to end", d)
        assert [g["name"] for g in ctl(d, {"cmd": "list"})["guests"]] == ["b"]
        wait_for(lambda: not os.path.exists(tmp_path / "a.sock"), 30, "a's socket to go", d)
        n2 = wait_for(lambda: rep.count() > n1 + 3 and rep.count(), 30, "b still reporting")
        assert pid_of(d, "b") == pb and n0 < n1 < n2
        if supervise:
            assert "unit guest a removed (its fds dropped from the store)" in d.log_text()
            assert len(children(d.proc.pid)) == 2     # b's process and the manager
        print(f"\nb completed {n2} chains while a was added and removed")
    finally:
        rep.stop()
        b.close()
        if a is not None:
            a.close()
        d.stop()


def test_a_single_guest_daemon_refuses_add_guest(tmp_path):
    d = Supervised(tmp_path)
    try:
        reply = ctl(d, {"cmd": "add-guest", "guest": "x", "path": f"{tmp_path}/x.sock"})
        assert not reply["ok"] and "multi-guest daemon" in reply["error"], reply
        assert len(children(d.proc.pid)) == 1
    finally:
        d.stop()


def test_policy_reaches_guests_through_their_processes(tmp_path):
    """The manager's PolicyLoop works on RemoteGuests: statuses and stats come from each
    guest's process, targets go to it; a guest that does not answer is skipped."""
    import struct
    from balloon_device.host.manager import RemoteGuest
    from balloon_device.host.policy import HostMemory, PolicyConfig, PolicyLoop
    d = Supervised(tmp_path, "--policy", "--policy-interval", "3600", "--no-policy-taskstats",
                   guests=("a", "b"))
    a = None
    try:
        a = connect(tmp_path, d, "a")
        buf = a.mem.alloc(10 * 2)
        a.mem.write(buf, struct.pack("<HQ", 6, 32 * MiB) + struct.pack("<HQ", 5, 96 * MiB))
        a.post("stats", [(buf, 20)], [])
        wait_for(lambda: d.status("a")["counters"]["stats_updates"] >= 1, 30, "stats", d)
        # the manager runs the policy (its last decision is in ctl list)
        wait_for(lambda: ctl(d, {"cmd": "list"})["policy"].get("time"), 30, "a policy tick", d)
        guests = {n: RemoteGuest(n, str(tmp_path / f"{n}.sock"), f"{d.ctl}.{n}")
                  for n in ("a", "b")}
        guests["gone"] = RemoteGuest("gone", str(tmp_path / "gone.sock"), f"{d.ctl}.gone")
        cfg = PolicyConfig(floor_bytes=2 << 30, guest_min_bytes=16 * MiB, margin_bytes=8 * MiB,
                           sweep_bytes=0, taskstats=False, stats_max_age=3600)
        policy = PolicyLoop(cfg, guests, loop=None,
                            host_reader=lambda: HostMemory(available_bytes=1 << 30))
        targets = policy.tick()
        assert set(targets) == {"a"}                 # b has no frontend, "gone" no process
        assert targets["a"] == (32 - 8) * MiB >> 12
        assert d.status("a")["target_pages"] == targets["a"]
        assert not guests["gone"].status().serving
    finally:
        if a is not None:
            a.close()
        d.stop()


def test_ctl_upgrade_replaces_every_process(two, tmp_path):
    a, b = connect(tmp_path, two, "a"), connect(tmp_path, two, "b")
    try:
        old = {n: pid_of(two, n) for n in ("a", "b")}
        mgr = manager_pid(two)
        reply = ctl(two, {"cmd": "upgrade"})
        assert reply["ok"], reply
        for n, g in (("a", a), ("b", b)):
            st = wait_unit(two, n, not_pid=old[n])
            assert st["process"]["restored"] and st["connected"] and g.fe.alive
            report_once(g, 0)
        wait_for(lambda: manager_pid(two) != mgr, 30, "a new manager", two)
    finally:
        a.close()
        b.close()


def test_warm_up_runs_a_guest_units_start_in_the_supervisor(tmp_path, caplog):
    """Before forking, the supervisor parses a guest unit's command line and builds its
    device once (their caches then live in shared pages); it must really get through
    that, not fail quietly."""
    import logging
    from balloon_device.host import cli, supervisor
    from balloon_device.host.config import DaemonConfig
    argv = ["--socket-dir", str(tmp_path), "--guests", "a,b", "--stats-interval", "1"]
    cfg = cli.config_from_args(cli._daemon_parser().parse_args(argv))
    assert isinstance(cfg, DaemonConfig) and cfg.guests
    units = [supervisor.guest_unit(argv, cfg, n, p) for n, p in cfg.guests]
    sup = supervisor.Supervisor(units=units, multi=True)
    try:
        sup._parser = cli._daemon_parser()
        seen = []
        from balloon_device.host import multi
        orig = multi.make_device
        multi.make_device = lambda c: seen.append(c) or orig(c)
        try:
            with caplog.at_level(logging.DEBUG, logger="vhost-user-balloon.supervisor"):
                sup._warm_up()
        finally:
            multi.make_device = orig
        assert "warm-up failed" not in caplog.text
        assert seen and seen[0].guests == (("a", str(tmp_path / "a.sock")),)
        assert seen[0].stats_interval == 1
    finally:
        for u in units:
            u.sock.close()
        sup._wake_r.close()
        sup._wake_w.close()


def test_shared_guest_process_serves_every_guest_and_survives_a_kill(tmp_path):
    """--guest-processes shared: one supervised serving process for every guest (no
    manager, no per-guest process): a SIGKILL of it costs both guests one restart,
    both sessions come back from the fd store."""
    d = Supervised(tmp_path, "--guest-processes", "shared", "--unit-watchdog", "0",
                   guests=("a", "b"))
    a = b = None
    try:
        a, b = connect(tmp_path, d, "a"), connect(tmp_path, d, "b")
        report_once(a, 0)
        report_once(b, 0)
        pa, pb = pid_of(d, "a"), pid_of(d, "b")
        assert pa == pb and children(d.proc.pid) == [pa]
        with open(f"/proc/{pa}/comm") as f:
            assert f.read().strip() == "vub-guests"
        assert ctl(d, {"cmd": "target", "guest": "b", "bytes": 8 * MiB})["ok"]
        os.kill(pa, signal.SIGKILL)
        for n, g in (("a", a), ("b", b)):
            st = wait_unit(d, n, not_pid=pa)
            assert st["process"]["restored"] and st["connected"] and g.fe.alive
            report_once(g, 1)
        assert d.status("b")["target_pages"] == 8 * MiB >> 12
        assert len(children(d.proc.pid)) == 1
    finally:
        for g in (a, b):
            if g is not None:
                g.close()
        d.stop()
