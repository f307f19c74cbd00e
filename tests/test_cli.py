"""The command line and its integration files: capabilities, qemu-args (memfd,
hugetlbfs, libvirt XML), the QEMU backend JSON, sd_notify, the status table, and
the daemon under a fake systemd (NOTIFY_SOCKET) as a real subprocess."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from balloon_device.host import cli, notify, status_view
from balloon_device.host.config import DaemonConfig
from balloon_device.host.multi import Daemon

ROOT = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv):
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


# ---- capabilities, qemu-args, backend JSON -----------------------------------

def test_print_capabilities(capsys):
    rc, out, _ = run_cli(capsys, "--print-capabilities")
    caps = json.loads(out)
    assert rc == 0 and caps["type"] == "balloon" and "free-page-reporting" in caps["features"]


def test_qemu_args_memfd(capsys):
    rc, out, _ = run_cli(capsys, "qemu-args", "--socket-path", "/run/v/a.sock", "--memory", "2G")
    assert rc == 0
    assert "-object memory-backend-memfd,id=mem,size=2G,share=on" in out
    assert "-chardev socket,id=vub0,path=/run/v/a.sock" in out
    assert "vhost-user-test-device-pci,chardev=vub0,virtio-id=5,num_vqs=4,config_size=16" in out


def test_qemu_args_hugepages(capsys, tmp_path):
    rc, out, _ = run_cli(capsys, "qemu-args", "--socket-path", "/s", "--hugepages", str(tmp_path),
                         "--chardev-id", "bal")
    assert rc == 0
    assert f"memory-backend-file,id=mem,size=1G,mem-path={tmp_path},share=on" in out
    assert "chardev=bal," in out
    rc, _, err = run_cli(capsys, "qemu-args", "--socket-path", "/s", "--hugepages", "/nope/x")
    assert rc == 2 and "no such folder" in err


def test_qemu_args_libvirt_xml_is_well_formed(capsys):
    rc, out, _ = run_cli(capsys, "qemu-args", "--socket-path", "/run/v/a.sock", "--libvirt")
    assert rc == 0
    doc = ET.fromstring("<domain xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
                        + out + "</domain>")
    assert doc.find("memoryBacking/source").get("type") == "memfd"
    assert doc.find("memoryBacking/access").get("mode") == "shared"
    q = "{http://libvirt.org/schemas/domain/qemu/1.0}"
    args = [a.get("value") for a in doc.find(f"{q}commandline").findall(f"{q}arg")]
    assert args[0] == "-chardev" and args[2] == "-device"
    assert json.loads(args[3]) == {"driver": "vhost-user-test-device-pci", "chardev": "vub0",
                                   "virtio-id": 5, "num_vqs": 4, "config_size": 16,
                                   "vq_size": 64}  # JSON form: see cli.libvirt_xml


def test_contrib_domain_example_is_valid_xml():
    doc = ET.parse(ROOT / "contrib/libvirt/domain-example.xml").getroot()
    assert doc.find("memoryBacking/access").get("mode") == "shared"
    q = "{http://libvirt.org/schemas/domain/qemu/1.0}"
    values = [a.get("value") for a in doc.iter(f"{q}arg")]
    devices = [json.loads(v) for v in values if v.startswith("{")]
    assert [d["driver"] for d in devices] == ["vhost-user-test-device-pci"]


def test_backend_json(capsys):
    packaged = json.loads((ROOT / "balloon_device/host/vhost-user-balloon.json").read_text())
    assert set(packaged) == {"description", "type", "binary"} and packaged["type"] == "balloon"
    rc, out, _ = run_cli(capsys, "backend-json", "--binary", "/opt/vub/bin/vhost-user-balloon")
    desc = json.loads(out)
    assert rc == 0 and desc["type"] == "balloon"
    assert desc["binary"] == "/opt/vub/bin/vhost-user-balloon"


def test_config_errors_exit_2_with_a_sentence(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "--guest", "nopath")
    assert rc == 2 and "NAME=SOCKET_PATH" in err
    rc, _, err = run_cli(capsys, "--socket-dir", str(tmp_path))
    assert rc == 2 and "go together" in err
    rc, _, err = run_cli(capsys, "--socket-path", str(tmp_path / "x.sock"), "--policy",
                         "--policy-floor", "lots")
    assert rc == 2 and "cannot read size" in err


# ---- sd_notify -----------------------------------------------------------------

@pytest.fixture
def notify_socket(tmp_path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    s.bind(path)
    s.settimeout(10)
    yield s, path
    s.close()


def test_notify_path(notify_socket):
    s, path = notify_socket
    assert notify.notify("READY=1\nSTATUS=hi", env={"NOTIFY_SOCKET": path})
    assert s.recv(4096) == b"READY=1\nSTATUS=hi"


def test_notify_abstract_namespace():
    name = f"vub-test-{os.getpid()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    try:
        assert notify.notify("STOPPING=1", env={"NOTIFY_SOCKET": "@" + name})
        assert s.recv(100) == b"STOPPING=1"
    finally:
        s.close()


def test_notify_without_systemd_is_a_no_op(tmp_path):
    assert notify.notify("READY=1", env={}) is False
    assert notify.notify("READY=1", env={"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False
    assert notify.watchdog_interval({"WATCHDOG_USEC": "4000000"}) == 2.0
    assert notify.watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}) is None
    assert notify.watchdog_interval({}) is None


def test_daemon_tells_systemd_ready_and_stopping(notify_socket, tmp_path):
    s, path = notify_socket
    env = dict(os.environ, NOTIFY_SOCKET=path, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "balloon_device.host.cli", "--guest",
                             f"a={tmp_path}/a.sock", "--guest", f"b={tmp_path}/b.sock"],
                            env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    def recv():  # the fd store messages (FDSTORE=1, tests/test_restart.py) are not looked at here
        while (msg := s.recv(4096).decode()).startswith(("FDSTORE=1", "FDSTOREREMOVE=1")):
            pass
        return msg
    try:
        ready = recv()
        assert ready.startswith("READY=1\nSTATUS=serving 2 guest(s): a on ")
        assert (tmp_path / "a.sock").exists() and (tmp_path / "control.sock").exists()
        proc.send_signal(signal.SIGTERM)
        assert recv() == "STOPPING=1"
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = proc.stderr.read()
    assert "serving 2 guest(s)" in log and "stopped" in log
    assert not (tmp_path / "a.sock").exists()


# ---- status table ----------------------------------------------------------------

def test_format_table():
    text = status_view.format_table([
        {"name": "web1", "connected": True, "features_acked": ["REPORTING"],
         "target_bytes": 512 << 20, "actual_bytes": 256 << 20, "last_report_age": 3.2,
         "counters": {"bytes_reported": 3 << 30, "bytes_discarded": 2 << 30,
                      "bytes_inflate_discarded": 1 << 30}, "sessions": 2,
         "stats": {"available_memory": 700 << 20}},
        {"name": "db", "connected": False, "target_bytes": 0, "actual_bytes": 0,
         "last_report_age": None, "counters": {}, "sessions": 0},
    ])
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["GUEST", "STATE"]
    assert lines[1].split()[:2] == ["web1", "serving"]
    assert "512.0 MiB" in lines[1] and "3.0 GiB" in lines[1] and "3s ago" in lines[1]
    assert "700.0 MiB" in lines[1]
    assert lines[2].split()[:2] == ["db", "waiting"] and "never" in lines[2]


@pytest.fixture
def running(tmp_path):
    cfg = DaemonConfig(guests=(("a", str(tmp_path / "a.sock")), ("b", str(tmp_path / "b.sock"))))
    d = Daemon(cfg)
    stop = threading.Event()

    def run():
        while not stop.is_set():
            d.loop.run_once(timeout=0.02)
    t = threading.Thread(target=run)
    t.start()
    yield d, cfg.control_path
    stop.set()
    t.join()
    d.close()


def test_status_subcommand(capsys, running):
    d, ctl = running
    d.guests["b"].device.target_pages = 256
    rc, out, _ = run_cli(capsys, "status", "--control-socket", ctl)
    assert rc == 0
    lines = out.splitlines()
    assert [ln.split()[0] for ln in lines] == ["GUEST", "a", "b"]
    assert "1.0 MiB" in lines[2]
    rc, out, _ = run_cli(capsys, "status", "--control-socket", ctl, "--json")
    assert [g["name"] for g in json.loads(out)] == ["a", "b"]


def test_status_shows_the_policy(capsys, tmp_path):
    from balloon_device.host.policy import HostMemory, PolicyConfig
    cfg = DaemonConfig(guests=(("a", str(tmp_path / "a.sock")),), policy=PolicyConfig())
    d = Daemon(cfg, host_reader=lambda: HostMemory(1536 << 20))
    stop = threading.Event()

    def run():
        while not stop.is_set():
            d.loop.run_once(timeout=0.02)
    t = threading.Thread(target=run)
    t.start()
    try:
        rc, out, _ = run_cli(capsys, "status", "--control-socket", cfg.control_path)
        assert rc == 0 and out.splitlines()[-1] == "policy: on, no decision yet"
        d.policy.tick()
        rc, out, _ = run_cli(capsys, "status", "--control-socket", cfg.control_path)
        assert out.splitlines()[-1] == ("policy: host 1.5 GiB available; under pressure; "
                                        "sweeps done: 0; fast reclaims done: 0")
    finally:
        stop.set()
        t.join()
        d.close()


def test_policy_line():
    last = {"host_available": 900 << 20, "pressure": False, "busy": ["g2"],
            "sweeping": "g1", "sweeps": {"g0": 2, "g1": 1}}
    assert status_view.policy_line(last) == ("policy: host 900.0 MiB available; no pressure; "
                                             "allocating: g2; sweeping g1; sweeps done: 3; "
                                             "fast reclaims done: 0")
    last.update(fast={"g0": 512 * 256}, fast_done={"g0": 1}, stalling=["g3"],
                host_pressure={"g3": {"stall_ms_per_s": 123.4}}, taskstats_error="no taskstats")
    assert status_view.policy_line(last) == (
        "policy: host 900.0 MiB available; no pressure; allocating: g2; sweeping g1; "
        "fast reclaim: g0 -> 512.0 MiB; QEMU stalling: g3 (123 ms/s); sweeps done: 3; "
        "fast reclaims done: 1; no taskstats")


def test_ctl_with_guest(capsys, running):
    d, ctl = running
    rc, out, _ = run_cli(capsys, "ctl", "--control-socket", ctl, "--guest", "b", "target", "8MiB")
    assert rc == 0 and json.loads(out)["target_pages"] == 2048
    assert d.guests["b"].device.target_pages == 2048
    rc, out, _ = run_cli(capsys, "ctl", "--control-socket", ctl, "target", "8MiB")
    assert rc == 1 and "guest" in json.loads(out)["error"]
    rc, out, _ = run_cli(capsys, "ctl", "--control-socket", ctl, "list")
    assert rc == 0 and len(json.loads(out)["guests"]) == 2


def test_status_of_a_daemon_that_is_not_there(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "status", "--control-socket", str(tmp_path / "none.sock"))
    assert rc == 2 and "cannot talk to the daemon" in err


# ---- systemd units -----------------------------------------------------------------

def unit(name):
    sections, cur = {}, None
    for line in (ROOT / "contrib/systemd" / name).read_text().splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            cur = sections.setdefault(line[1:-1], {})
        elif "=" in line and not line.startswith("#"):
            k, _, v = line.partition("=")
            cur.setdefault(k, []).append(v)
    return sections


def test_systemd_template():
    svc = unit("vhost-user-balloon@.service")["Service"]
    assert svc["Type"] == ["notify"] and svc["Restart"] == ["on-failure"]
    assert "/run/vhost-user-balloon/%i.sock" in svc["ExecStart"][0]
    for key in ("NoNewPrivileges", "PrivateTmp", "MemoryDenyWriteExecute"):
        assert svc[key] == ["yes"], key
    assert svc["ProtectSystem"] == ["strict"]
    assert svc["RestrictAddressFamilies"][0].split()[0] == "AF_UNIX"


def test_systemd_socket_activation_pair():
    sock = unit("vhost-user-balloon-activated@.socket")["Socket"]
    assert sock["ListenStream"] == ["/run/vhost-user-balloon/%i.sock"]
    svc = unit("vhost-user-balloon-activated@.service")["Service"]
    assert "--fd 3" in svc["ExecStart"][0]


# ---- issue 17: version, help, sizes, ctl stats-interval/events, qemu-args checks ----

def test_version(capsys):
    from balloon_device.host.version import FALLBACK, version
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.strip() == f"vhost-user-balloon {version()}"
    import tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert version() == project["version"]            # installed: from the package metadata
    assert FALLBACK.split("+")[0] == project["version"]
    changelog = (ROOT / "debian" / "changelog").read_text().splitlines()[0]
    assert changelog.startswith(f"vhost-user-balloon ({project['version']})"), changelog


def test_version_fallback_without_metadata(monkeypatch):
    from importlib import metadata
    from balloon_device.host import version as v

    def missing(name):
        raise metadata.PackageNotFoundError(name)
    monkeypatch.setattr(v.metadata, "version", missing)
    assert v.version() == v.FALLBACK


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    listed = out.split("subcommands", 1)[1]
    for name in ("ctl", "status", "qemu-args", "backend-json"):
        assert f"\n  {name} " in listed
    assert set(cli.SUBCOMMANDS) == {"ctl", "status", "qemu-args", "backend-json"}
    with pytest.raises(SystemExit):
        cli.main(["ctl", "--help"])
    out = capsys.readouterr().out
    for cmd in ("status", "list", "stats", "target", "inhibit", "stats-interval", "events"):
        assert cmd in out


def test_sizes_with_decimals():
    from balloon_device.host.config import parse_size
    from balloon_device.host.errors import ConfigError
    assert parse_size("1.5G") == 3 << 29
    assert parse_size("0.5 MiB") == 512 << 10
    assert parse_size("2") == 2
    for bad in ("1.5", "1.", ".5G", "1,5G", "-1G", "1.5X"):
        with pytest.raises(ConfigError):
            parse_size(bad)


def test_ctl_guest_after_the_subcommand(capsys, running):
    d, ctl = running
    rc, out, _ = run_cli(capsys, "ctl", "--control-socket", ctl, "target", "1.5M", "--guest", "a")
    assert rc == 0 and json.loads(out)["target_pages"] == 384
    assert d.guests["a"].device.target_pages == 384
    rc, out, _ = run_cli(capsys, "ctl", "--control-socket", ctl, "status", "--guest", "b")
    assert rc == 0 and json.loads(out)["status"]["name"] == "b"
    # before the subcommand still works, and the one after wins
    rc, out, _ = run_cli(capsys, "ctl", "--control-socket", ctl, "--guest", "a", "status",
                         "--guest", "b")
    assert json.loads(out)["status"]["name"] == "b"


def test_ctl_status_carries_the_version(capsys, running):
    from balloon_device.host.version import version
    _, ctl = running
    rc, out, _ = run_cli(capsys, "ctl", "--control-socket", ctl, "status", "--guest", "a")
    assert rc == 0 and json.loads(out)["version"] == version()
    rc, out, _ = run_cli(capsys, "ctl", "--control-socket", ctl, "list")
    assert json.loads(out)["version"] == version()


def test_ctl_stats_interval(capsys, running):
    d, ctl = running
    rc, out, _ = run_cli(capsys, "ctl", "--control-socket", ctl, "stats-interval", "7.5")
    assert rc == 0 and json.loads(out)["guests"] == ["a", "b"]
    assert [g.device.stats_interval for g in d.guests.values()] == [7.5, 7.5]
    rc, out, _ = run_cli(capsys, "ctl", "--control-socket", ctl, "stats-interval", "0",
                         "--guest", "b")
    assert rc == 0 and [g.device.stats_interval for g in d.guests.values()] == [7.5, 0]
    rc, _, err = run_cli(capsys, "ctl", "--control-socket", ctl, "stats-interval", "-1")
    assert rc == 2 and "seconds >= 0" in err
    from balloon_device.host.control import request
    for bad in ("x", True, -1, 1e9, None):
        reply = request(ctl, {"cmd": "stats-interval", "seconds": bad})
        assert reply["ok"] is False and "seconds" in reply["error"]


def test_ctl_events_streams_balloon_changes(capsys, running):
    d, ctl = running
    got = []

    def listen():
        got.append(cli.main(["ctl", "--control-socket", ctl, "--guest", "b", "events",
                             "--count", "3"]))
    t = threading.Thread(target=listen)
    t.start()
    from balloon_device.host.control import request
    import time
    deadline = time.monotonic() + 20
    while not d.control.listeners and time.monotonic() < deadline:
        time.sleep(0.02)
    assert d.control.listeners, "ctl events never subscribed"
    assert request(ctl, {"cmd": "target", "bytes": 8 << 20, "guest": "a"})["ok"]  # not b
    assert request(ctl, {"cmd": "target", "bytes": 4 << 20, "guest": "b"})["ok"]
    while (list(d.control.listeners.values()) != [{"b": (1024, 0)}]
           and time.monotonic() < deadline):
        time.sleep(0.02)                    # the daemon has sent the target's event
    d.guests["b"].device.actual = 1024      # as the guest's SET_CONFIG would
    t.join(timeout=20)
    assert not t.is_alive() and got == [0]
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(e["guest"], e["target_bytes"], e["actual_bytes"]) for e in events] == [
        ("b", 0, 0), ("b", 4 << 20, 0), ("b", 4 << 20, 4 << 20)]
    assert events[0]["initial"] is True and "initial" not in events[1]
    assert all(e["event"] == "balloon-change" for e in events)
    rc, out, _ = run_cli(capsys, "ctl", "--control-socket", ctl, "--guest", "zz", "events")
    assert rc == 1 and "no guest" in json.loads(out)["error"]


def test_qemu_args_rejects_bad_queue_size_and_memory(capsys):
    for q in ("48", "100", "0", "65536"):
        rc, _, err = run_cli(capsys, "qemu-args", "--socket-path", "/s", "--queue-size", q)
        assert rc == 2 and "power of two" in err, q
    rc, out, _ = run_cli(capsys, "qemu-args", "--socket-path", "/s", "--queue-size", "128")
    assert rc == 0 and "vq_size=128" in out
    for mem in ("lots", "1.5", "0", "4Q"):
        rc, _, err = run_cli(capsys, "qemu-args", "--socket-path", "/s", "--memory", mem)
        assert rc == 2 and ("--memory" in err or "size" in err), mem
    rc, out, _ = run_cli(capsys, "qemu-args", "--socket-path", "/s", "--memory", "1.5G")
    assert rc == 0 and "size=1536M," in out
    rc, out, _ = run_cli(capsys, "qemu-args", "--socket-path", "/s", "--memory", "4GiB")
    assert "size=4G," in out


def test_qemu_args_quotes_paths(capsys):
    path = "/run/v/it's <a> & \"b\",c.sock"
    rc, out, _ = run_cli(capsys, "qemu-args", "--socket-path", path, "--libvirt")
    assert rc == 0
    doc = ET.fromstring("<domain xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
                        + out + "</domain>")
    values = [a.get("value") for a in doc.iter("{http://libvirt.org/schemas/domain/qemu/1.0}arg")]
    assert values[1] == "socket,id=vub0,path=" + path.replace(",", ",,")
    rc, out, _ = run_cli(capsys, "qemu-args", "--socket-path", "/a,b.sock")
    assert "path=/a,,b.sock " in out        # QEMU's option syntax doubles commas


def test_log_format_json_and_journal(tmp_path):
    import logging
    rec = logging.LogRecord("vhost-user-balloon", logging.WARNING, __file__, 1, "hi %s", ("x",),
                            None)
    rec.guest = "[web1] "
    line = json.loads(cli.log_formatter("json").format(rec))
    assert line["message"] == "hi x" and line["level"] == "warning" and line["guest"] == "web1"
    assert line["time"].endswith("Z")
    assert cli.log_formatter("text", journal=True).format(rec) == "WARNING: [web1] hi x"
    assert cli.log_formatter("text").format(rec).endswith(
        "vhost-user-balloon WARNING: [web1] hi x")
    assert cli.log_formatter("text").format(rec)[:4].isdigit()     # a timestamp first
    # JOURNAL_STREAM names the journal's socket: only a matching stderr counts
    f = open(tmp_path / "err", "w")
    st = os.fstat(f.fileno())
    assert cli.stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, f)
    assert not cli.stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, f)
    assert not cli.stderr_is_journal({}, f)
    assert not cli.stderr_is_journal({"JOURNAL_STREAM": "junk"}, f)
    f.close()


def test_daemon_logs_json_and_without_timestamp_under_the_journal(tmp_path):
    """The real daemon: --log-format json; JOURNAL_STREAM matching its stderr."""
    def first_line(args, env_extra):
        err = open(tmp_path / "stderr", "w+")
        env = dict(os.environ)
        if env_extra:
            st = os.fstat(err.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        sock = tmp_path / "g.sock"
        # the serving process's own first line (a supervisor would log first)
        p = subprocess.Popen([sys.executable, "-m", "balloon_device.host.cli", "--socket-path",
                              str(sock), "--no-supervise", *args], stderr=err, env=env, cwd=ROOT)
        try:
            import time
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not (tmp_path / "stderr").read_text():
                time.sleep(0.05)
        finally:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=30)
            err.close()
        return (tmp_path / "stderr").read_text().splitlines()[0]
    line = json.loads(first_line(["--log-format", "json"], False))
    assert line["level"] == "info" and "serving 1 guest" in line["message"]
    line = first_line([], True)
    assert line.startswith("INFO: serving 1 guest"), line
    line = first_line([], False)
    assert line[:4].isdigit() and "INFO: serving 1 guest" in line


def test_remove_guest_drops_all_its_fds_from_systemds_store(notify_socket, tmp_path):
    """Under systemd (one process, systemd's fd store): ctl remove-guest takes every fd
    the guest stored out of the store again, its reply outbox's two ends included, and
    none of the other guest's."""
    from balloon_device.host.state import outbox_names
    s, path = notify_socket
    env = dict(os.environ, NOTIFY_SOCKET=path, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "balloon_device.host.cli", "--guest",
                             f"a={tmp_path}/a.sock", "--guest", f"b={tmp_path}/b.sock"],
                            env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)

    def fdname(msg):
        return dict(ln.split("=", 1) for ln in msg.splitlines() if "=" in ln).get("FDNAME")
    try:
        stored = set()
        while not (msg := s.recv(4096).decode()).startswith("READY=1"):
            if msg.startswith("FDSTORE=1"):
                stored.add(fdname(msg))
        assert set(outbox_names("a")) <= stored and set(outbox_names("b")) <= stored
        assert cli.main(["ctl", "--control-socket", str(tmp_path / "control.sock"),
                     "remove-guest", "a"]) == 0
        removed = set()
        s.settimeout(2)
        try:
            while True:
                msg = s.recv(4096).decode()
                if msg.startswith("FDSTOREREMOVE=1"):
                    removed.add(fdname(msg))
        except socket.timeout:
            pass
        a_names = {n for n in stored if n.startswith("vub.a.")}
        assert set(outbox_names("a")) <= removed and a_names <= removed, (a_names, removed)
        assert not {n for n in removed if n.startswith("vub.b.")}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
