"""Least privilege, on the real daemon process: socket modes, one frontend per
socket, the limits on what a frontend may send, privilege drop (--user) and
the seccomp allowlist (--seccomp), which must not stop the daemon from
serving (protocol fuzzing and a real reporting session run under it)."""

import array
import os
import pwd
import socket
import stat
import subprocess
import sys
import textwrap

import pytest

from balloon_device.host import sandbox
from privilege import require_privilege
from fuzz.real_session import report_once
from fuzz.source import RandomSource
from fuzz.vhost_gen import DaemonProcess, gen_session, run_session_on_daemon
from vhostuser import messages as m
from vhostuser.handler import MAX_MEM_SLOTS
from vhostuser.testing import sealed_memfd
from vhostuser.messages import Request as R

MiB = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = DaemonProcess(str(tmp_path_factory.mktemp("sbx"))).start()
    yield d
    assert d.stop() == 0, d.log_tail()


def recv_all(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            return buf
        buf += chunk
    return buf


def test_sockets_are_0600(daemon):
    for p in (daemon.path, daemon.path + ".ctl"):
        st = os.stat(p)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, p


def test_second_frontend_refused_on_a_busy_socket(daemon):
    a = daemon.connect()
    a.sendall(m.encode(R.GET_FEATURES))
    assert len(recv_all(a, 20)) == 20          # a is the frontend
    b = daemon.connect()
    assert b.recv(1) == b""                     # b is closed at once
    b.close()
    a.sendall(m.encode(R.GET_QUEUE_NUM))
    assert len(recv_all(a, 20)) == 20          # a is still served
    a.close()
    assert daemon.wait_idle() == 0
    assert daemon.probe()                       # the next frontend is served


def test_limits_on_what_a_frontend_sends(daemon):
    def dropped(data, fds=()):
        s = daemon.connect()
        try:
            if fds:
                s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                    array.array("i", fds).tobytes())])
            else:
                s.sendall(data)
            return s.recv(64) == b""
        finally:
            s.close()
            assert daemon.wait_idle() == 0, "fds of a refused message were kept"

    # payload over MAX_PAYLOAD (4096)
    assert dropped(m.HEADER.pack(R.SET_CONFIG, 1, m.MAX_PAYLOAD + 1))
    # more than MAX_FDS (8) fds on one message: all closed
    fds = [os.eventfd(0) for _ in range(m.MAX_FDS + 2)]
    try:
        assert dropped(m.encode(R.GET_FEATURES), fds)
    finally:
        for fd in fds:
            os.close(fd)
    # SET_MEM_TABLE with 9 regions (limit 8)
    assert dropped(m.encode(R.SET_MEM_TABLE, m.MEM_TABLE_HEAD.pack(9, 0) + bytes(9 * 32)))
    # config read larger than MAX_CONFIG_SIZE: refused (zero-length reply, the error form
    # of GET_CONFIG), never answered with data
    s = daemon.connect()
    s.sendall(m.encode(R.GET_CONFIG, m.CONFIG_HEAD.pack(0, m.MAX_CONFIG_SIZE + 1, 0)))
    assert recv_all(s, 12) in (b"", m.HEADER.pack(R.GET_CONFIG, m.VERSION | m.FLAG_REPLY, 0))
    s.close()
    assert daemon.wait_idle() == 0
    assert daemon.alive() and daemon.probe()


def test_memory_slots_and_queue_size_limits(daemon):
    s = daemon.connect()
    fd = sealed_memfd("g", (MAX_MEM_SLOTS + 1) * 65536)
    try:
        def ack(req, payload=b"", fds=()):
            data = m.encode(req, payload, m.VERSION | m.FLAG_NEED_REPLY)
            if fds:
                s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                    array.array("i", fds).tobytes())])
            else:
                s.sendall(data)
            return m.U64.unpack(recv_all(s, 20)[12:])[0]
        s.sendall(m.encode(R.SET_PROTOCOL_FEATURES, m.U64.pack(
            (1 << 3) | (1 << 15))))  # REPLY_ACK, CONFIGURE_MEM_SLOTS
        results = [ack(R.ADD_MEM_REG, m.MEM_REG_SINGLE.pack(0) + m.MEM_REGION.pack(
            i * 65536, 65536, 0x7F0000000000 + i * 65536, i * 65536), [fd])
            for i in range(MAX_MEM_SLOTS + 1)]
        assert results == [0] * MAX_MEM_SLOTS + [1]
        assert ack(R.SET_VRING_NUM, m.VRING_STATE.pack(0, 65536)) == 1
        assert ack(R.SET_VRING_NUM, m.VRING_STATE.pack(0, 32768)) == 0
        assert ack(R.SET_VRING_NUM, m.VRING_STATE.pack(9, 64)) == 1
    finally:
        s.close()
        os.close(fd)
    assert daemon.wait_idle() == 0


# ---- seccomp --------------------------------------------------------------------

@pytest.mark.parametrize("machine", sorted(sandbox.TABLES))
@pytest.mark.parametrize("mode", sandbox.MODES)
def test_bpf_program_is_well_formed(machine, mode):
    prog = sandbox.build_program(mode, machine)
    assert sandbox.fields() and len(prog) < 4096
    for pc, (code, jt, jf, _k) in enumerate(prog):
        if code & 0x07 == 0x05:  # jumps stay inside the program
            assert pc + 1 + max(jt, jf) < len(prog)
    assert prog[-1][0] == 0x06  # ends with RET


def test_unknown_architecture_is_refused():
    with pytest.raises(sandbox.SandboxError, match="no system call table"):
        sandbox.build_program("errno", "sparc64")


CHILD = textwrap.dedent(r"""
    import errno, os, socket, sys, threading, mmap
    sys.path.insert(0, {root!r})
    import ctypes, platform
    from balloon_device.host import sandbox
    TGKILL = sandbox.TABLES[platform.machine()]["tgkill"]
    held = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)   # made before the filter
    open({tmp!r} + ".keep", "w").close()
    pair = socket.socketpair()                                # (a frontend's socket)
    sandbox.apply_seccomp({mode!r})
    out = []
    def check(name, fn):
        try:
            fn()
            out.append(f"{{name}}=ok")
        except OSError as e:
            out.append(f"{{name}}={{errno.errorcode.get(e.errno, e.errno)}}")
    fd = os.memfd_create("t")
    check("memfd", lambda: os.ftruncate(fd, 1 << 20))
    check("punch", lambda: os.posix_fallocate(fd, 0, 4096))
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    def punch():
        if libc.fallocate(fd, 3, 0, 4096) != 0:
            raise OSError(ctypes.get_errno(), "fallocate")
    check("fallocate", punch)
    check("eventfd", lambda: os.eventfd_write(os.eventfd(0), 1))
    def splice():  # the reply outbox (vhostuser/restart.py)
        r, w = os.pipe2(os.O_CLOEXEC)
        os.write(w, b"x")
        os.splice(r, pair[0].fileno(), 1)
    check("splice", splice)
    check("unix_socket", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).close())
    check("connect", lambda: held.connect("/dev/log"))
    check("unlink", lambda: os.unlink({tmp!r} + ".keep"))
    import signal, threading as th
    check("tgkill_self", lambda: signal.pthread_kill(th.main_thread().ident, 0))
    def tgkill_other():
        if libc.syscall(TGKILL, os.getppid(), os.getppid(), 0) != 0:
            raise OSError(ctypes.get_errno(), "tgkill")
    check("tgkill_other", tgkill_other)
    check("read_open", lambda: open("/proc/self/status").read())
    t = threading.Thread(target=lambda: None); t.start(); t.join(); out.append("thread=ok")
    check("inet_socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    check("write_open", lambda: open({tmp!r}, "w"))
    check("fork", lambda: os.fork() or os._exit(0))
    sys.stdout.write(" ".join(out) + "\n"); sys.stdout.flush()
    os.execv("/bin/true", ["true"])
""")


def run_child(mode, tmp_path):
    code = CHILD.format(root=ROOT, mode=mode, tmp=str(tmp_path / "x"))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_seccomp_errno_mode_allows_the_daemon_calls_and_refuses_others(tmp_path):
    r = run_child("errno", tmp_path)
    got = dict(kv.split("=") for kv in r.stdout.split())
    allowed = ("memfd", "fallocate", "eventfd", "splice", "read_open", "thread", "tgkill_self")
    assert {k: got[k] for k in allowed} == dict.fromkeys(allowed, "ok"), r
    # no new socket, no connect, no unlink, no signal to another process (issue 13)
    refused = ("inet_socket", "unix_socket", "connect", "unlink", "tgkill_other", "write_open",
               "fork")
    assert {k: got[k] for k in refused} == dict.fromkeys(refused, "EPERM"), r
    assert os.path.exists(str(tmp_path / "x") + ".keep")
    assert r.returncode == 1 and "PermissionError" in r.stderr  # execv refused with EPERM


def test_seccomp_kill_mode_kills_on_execve(tmp_path):
    code = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {ROOT!r})
        from balloon_device.host import sandbox
        sandbox.apply_seccomp("kill")
        os.execv("/bin/true", ["true"])
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert r.returncode == -31  # SIGSYS


@pytest.mark.parametrize("extra", [["--seccomp"], ["--seccomp", "kill"]], ids=["errno", "kill"])
def test_daemon_serves_under_seccomp(tmp_path, extra):
    d = DaemonProcess(str(tmp_path), log_level="info", extra=extra).start()
    try:
        assert report_once(d.path) == 4 * MiB          # memory really released
        assert d.wait_idle() == 0
        for seed in range(40):                          # hostile frontends too
            _sent, excess = run_session_on_daemon(d, gen_session(RandomSource(seed), 60))
            assert excess == 0 and d.alive(), d.log_tail()
        assert d.probe()
        assert report_once(d.path) == 4 * MiB
        with open(f"/proc/{d.pid}/status") as f:
            assert "Seccomp:\t2" in f.read()
        from balloon_device.host.control import request
        assert request(d.path + ".ctl", {"cmd": "status"})["ok"]
    finally:
        rc = d.stop()
    assert rc == 0, d.log_tail()
    assert "Operation not permitted" not in d.log_tail(100000), d.log_tail()


def test_daemon_drops_privileges_and_still_frees_memory(tmp_path):
    require_privilege(None if os.getuid() == 0 else "dropping privileges needs root")
    nobody = pwd.getpwnam("nobody")
    d = DaemonProcess(str(tmp_path), log_level="info",
                      extra=["--user", "nobody", "--seccomp"]).start()
    try:
        assert report_once(d.path) == 4 * MiB
        # not dumpable: /proc/PID belongs to root, so no other process of the daemon's
        # user (QEMU) can ptrace it or read its memory
        assert os.stat(f"/proc/{d.pid}/mem").st_uid == 0
        assert os.stat(f"/proc/{d.pid}/status").st_uid == 0
        ps = os.stat(d.path)
        assert ps.st_uid == nobody.pw_uid and stat.S_IMODE(ps.st_mode) == 0o600
        ctl = os.stat(d.path + ".ctl")  # the control socket does not go to --user
        assert ctl.st_uid == 0 and stat.S_IMODE(ctl.st_mode) == 0o600
        with open(f"/proc/{d.pid}/status") as f:
            status = f.read()
        groups = [ln.split(":", 1)[1].strip() for ln in status.splitlines()
                  if ln.startswith("Groups:")]
        assert groups == [""], groups  # supplementary groups dropped
        uids = [ln.split()[1:] for ln in status.splitlines() if ln.startswith("Uid:")][0]
        assert set(uids) == {str(nobody.pw_uid)}  # real, effective, saved, fs
        assert "memfd" in d.log_tail(100000)  # backing still recognised after setuid
    finally:
        rc = d.stop()
    assert rc == 0, d.log_tail()


def test_unknown_user_is_a_clean_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "balloon_device.host.cli", "--socket-path",
                        str(tmp_path / "s.sock"), "--user", "no-such-user-xyz"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and "no such user" in r.stderr


@pytest.mark.skipif(os.getuid() != 0, reason="changing socket groups needs root")
def test_socket_groups(tmp_path):
    """--socket-group: guest sockets get the daemon's user and QEMU's group, 0660;
    --control-socket-group: the control socket keeps root as owner, operators' group, 0660."""
    import grp
    qemu_group = grp.getgrnam("nogroup")
    ops = grp.getgrgid(0)
    d = DaemonProcess(str(tmp_path), log_level="info",
                      extra=["--user", "nobody", "--socket-group", "nogroup",
                             "--control-socket-group", ops.gr_name, "--seccomp"]).start()
    try:
        st = os.stat(d.path)
        assert (st.st_uid, st.st_gid) == (pwd.getpwnam("nobody").pw_uid, qemu_group.gr_gid)
        assert stat.S_IMODE(st.st_mode) == 0o660
        ctl = os.stat(d.path + ".ctl")
        assert (ctl.st_uid, ctl.st_gid) == (0, ops.gr_gid) and stat.S_IMODE(ctl.st_mode) == 0o660
        assert report_once(d.path) == 4 * MiB
        # a process of the daemon's user (as QEMU would be) cannot use the control socket
        code = textwrap.dedent(f"""
            import os, socket
            os.setgid({qemu_group.gr_gid}); os.setgroups([]); os.setuid({pwd.getpwnam("nobody").pw_uid})
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect({d.path + ".ctl"!r})
                print("connected")
            except PermissionError:
                print("refused")
        """)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=60)
        assert r.stdout.strip() == "refused", r
    finally:
        rc = d.stop()
    assert rc == 0, d.log_tail()


def test_unknown_socket_group_is_a_clean_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "balloon_device.host.cli", "--socket-path",
                        str(tmp_path / "s.sock"), "--socket-group", "no-such-group-xyz"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and "no such group" in r.stderr


def test_every_daemon_makes_itself_non_dumpable(tmp_path):
    """The shipped units start the daemon as QEMU's user (no --user): it still makes itself
    non-dumpable, so QEMU processes of that user cannot ptrace it or read /proc/PID/mem
    (every guest's RAM), and it writes no core dumps."""
    code = textwrap.dedent(f"""
        import ctypes, sys
        sys.path.insert(0, {ROOT!r})
        from balloon_device.host import cli
        from balloon_device.host.config import DaemonConfig
        from balloon_device.host.multi import Daemon
        cfg = DaemonConfig(socket_path={str(tmp_path / "g.sock")!r})
        d = Daemon(cfg)
        before = ctypes.CDLL(None).prctl(3, 0, 0, 0, 0)
        cli._sandbox(cfg, d)
        print(before, ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))
        d.close()
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["1", "0"], r


def test_sd_notify_works_under_seccomp_without_socket_or_connect(tmp_path):
    """seccomp forbids socket() and connect() (issue 13): the notification socket is
    connected before the filter, so READY/STOPPING still reach systemd, in kill mode too."""
    import signal
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(str(tmp_path / "notify"))
    ns.settimeout(30)
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"))
    p = subprocess.Popen([sys.executable, "-m", "balloon_device.host.cli", "--socket-path",
                          str(tmp_path / "g.sock"), "--seccomp", "kill"], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    def recv():  # FDSTORE messages (the fd store, tests/test_restart.py) are not looked at here
        while (msg := ns.recv(4096)).startswith((b"FDSTORE=1", b"FDSTOREREMOVE=1")):
            pass
        return msg
    try:
        assert b"READY=1" in recv()
        p.send_signal(signal.SIGTERM)
        assert recv() == b"STOPPING=1"
        out, _ = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
        ns.close()
    assert p.returncode == 0, out       # not -31 (SIGSYS): no forbidden call at exit either
    assert os.path.exists(tmp_path / "g.sock")  # no unlink under seccomp: left for next start
