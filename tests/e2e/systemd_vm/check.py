#!/usr/bin/python3
"""Runs inside the systemd test VM (vub-systemd-check.service), as root.

Drives the installed contrib/systemd units through systemctl and serves
them with real vhost-user sessions (real_session.report_once).  Every step
prints one serial-console line
    VUB-MARK systemd-step name=NAME result=PASS|FAIL key=value ...
then ``VUB-MARK systemd-done pass=N fail=M`` and the VM powers off.
tests/e2e/test_systemd.py boots the VM and checks the markers.
"""
import os
import pwd
import signal
import stat
import subprocess
import sys
import time
import traceback
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from real_session import report_once  # noqa: E402

RUN = "/run/vhost-user-balloon"
TEMPLATE = "vhost-user-balloon@t1.service"
SOCKET = "vhost-user-balloon-activated@s1.socket"
ACTIVATED = "vhost-user-balloon-activated@s1.service"
MULTI = "vhost-user-balloon.service"
WATCH_WAIT = 35.0           # > WatchdogSec=30s
REPORTED = 4 << 20          # one reporting chain of 4 MiB, filled first: all of it comes back
MAX_EXPOSURE = 2.0          # systemd-analyze security; the units measure 1.2-1.5
console = os.open("/dev/console", os.O_WRONLY | os.O_NOCTTY)
results = {"pass": 0, "fail": 0}


def say(text):
    """One write per line so kernel/systemd output does not split markers."""
    for line in text.splitlines():
        os.write(console, ("\n" + line + "\n").encode())
        print(line, flush=True)


def mark(marker, /, **kv):
    say(f"VUB-MARK {marker} " + " ".join(f"{k}={str(v).replace(' ', '_') or '-'}"
                                       for k, v in kv.items()))


def run(*argv, timeout=120, check=True):
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and cp.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: rc={cp.returncode} {cp.stderr.strip()[-300:]}")
    return cp.stdout


def show(unit, *props):
    out = run("systemctl", "show", "-p", ",".join(props), unit)
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def wait_for(pred, timeout, what, interval=0.1):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out ({timeout} s) waiting for {what}")
        time.sleep(interval)


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


def step(name, units=()):
    """Decorator: run the step now, print its marker, dump journals on failure."""
    def deco(fn):
        t0 = time.monotonic()
        try:
            detail = fn() or {}
            results["pass"] += 1
            mark("systemd-step", name=name, result="PASS", secs=f"{time.monotonic() - t0:.1f}",
                 **detail)
        except Exception as e:  # noqa: BLE001 - reported, the next steps still run
            results["fail"] += 1
            mark("systemd-step", name=name, result="FAIL", secs=f"{time.monotonic() - t0:.1f}",
                 error=f"{type(e).__name__}:{e}"[:300])
            say("\n".join("VUB-LOG " + ln for ln in traceback.format_exc().splitlines()))
            for u in units:
                out = run("journalctl", "-b", "-u", u, "-n", "25", "--no-pager", check=False)
                say("\n".join(f"VUB-LOG {u}: {ln}" for ln in out.splitlines()))
        return fn
    return deco


def proc_status(pid):
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def hardening(pid):
    """What the kernel says about the daemon process: user, no caps, seccomp, NNP."""
    st = proc_status(pid)
    uid = int(st["Uid"].split()[0])
    check(pwd.getpwuid(uid).pw_name == "libvirt-qemu", f"daemon runs as uid {uid}")
    check(int(st["CapEff"], 16) == 0 and int(st["CapBnd"], 16) == 0, f"caps {st['CapEff']}")
    check(st["NoNewPrivs"].strip() == "1", "NoNewPrivs is not set")
    check(st["Seccomp"].strip() == "2", "no seccomp filter")
    return {"user": "libvirt-qemu", "seccomp": st["Seccomp"].strip(), "capeff": st["CapEff"]}


def sock_ok(path):
    st = os.stat(path)
    check(stat.S_ISSOCK(st.st_mode), f"{path} is not a socket")
    check(stat.S_IMODE(st.st_mode) == 0o600, f"{path} mode {oct(st.st_mode)}")
    check(pwd.getpwuid(st.st_uid).pw_name == "libvirt-qemu", f"{path} owner uid {st.st_uid}")


def served(path, timeout=30):
    released = report_once(path, report=REPORTED, timeout=timeout)
    check(released == REPORTED,
          f"{path}: the daemon released {released} bytes of the {REPORTED} reported")
    return released


# ---------------------------------------------------------------------------
with open("/proc/1/comm") as f:
    pid1 = f.read().strip()
mark("systemd-boot", pid1=pid1, version=run("systemctl", "--version").split()[1],
     state=run("systemctl", "is-system-running", check=False).strip(),
     uptime=open("/proc/uptime").read().split()[0])

# The multi-guest unit starts first: its watchdog window runs during the other steps.
multi = {}


@step("multi_start", [MULTI])
def _():
    run("systemctl", "start", MULTI)
    multi["t0"] = time.monotonic()
    s = show(MULTI, "ActiveState", "MainPID", "StatusText", "WatchdogTimestampMonotonic")
    check(s["ActiveState"] == "active", f"state {s['ActiveState']}")
    multi["pid"] = s["MainPID"]
    multi["ping0"] = int(s["WatchdogTimestampMonotonic"])
    for g in ("a", "b"):
        sock_ok(f"{RUN}/{g}.sock")
    return {"pid": s["MainPID"], "status": s["StatusText"]}


@step("notify_control")
def _():
    # Control: a Type=notify service that never sends READY=1 stays "activating".
    run("systemd-run", "--no-block", "--unit=vub-notify-control", "-p", "Type=notify",
        "-p", "TimeoutStartSec=120", "/bin/sleep", "300")
    unit = "vub-notify-control.service"
    wait_for(lambda: show(unit, "ActiveState")["ActiveState"] != "inactive", 60, "the control")
    time.sleep(3)
    state = show(unit, "ActiveState")["ActiveState"]
    run("systemctl", "stop", "vub-notify-control.service", check=False)
    check(state == "activating", f"a service without READY=1 is {state}")
    return {"state": state}


@step("template_ready", [TEMPLATE])
def _():
    run("systemctl", "start", "--no-block", TEMPLATE)
    seen = set()

    def active():
        s = show(TEMPLATE, "ActiveState", "MainPID", "StatusText")
        seen.add(s["ActiveState"])
        if s["ActiveState"] == "active":
            # READY=1 comes after listen(): the socket exists at the first "active".
            s["sock_at_active"] = os.path.exists(f"{RUN}/t1.sock")
            return s
        check(s["ActiveState"] in ("activating", "inactive"), f"state {s['ActiveState']}")
        return None

    s = wait_for(active, 90, f"{TEMPLATE} active", interval=0.05)
    check("activating" in seen, f"never seen activating: {seen}")
    check(s["sock_at_active"], "active before its socket existed")
    check(s["StatusText"].startswith("serving"), f"StatusText {s['StatusText']!r}")
    return {"seen": "+".join(sorted(seen)), "status": s["StatusText"], "pid": s["MainPID"]}


@step("template_serve", [TEMPLATE])
def _():
    sock_ok(f"{RUN}/t1.sock")
    pid = int(show(TEMPLATE, "MainPID")["MainPID"])
    released = served(f"{RUN}/t1.sock")
    d = hardening(pid)
    return {"released": released, **d}


@step("restart_on_sigkill", [TEMPLATE])
def _():
    old = int(show(TEMPLATE, "MainPID")["MainPID"])
    check(old > 0, "no main PID")
    os.kill(old, signal.SIGKILL)

    def back():
        s = show(TEMPLATE, "ActiveState", "MainPID", "NRestarts")
        return s if s["ActiveState"] == "active" and int(s["MainPID"]) not in (0, old) else None

    s = wait_for(back, 90, "the restarted daemon")
    check(int(s["NRestarts"]) >= 1, f"NRestarts={s['NRestarts']}")
    released = served(f"{RUN}/t1.sock")
    return {"old_pid": old, "new_pid": s["MainPID"], "nrestarts": s["NRestarts"],
            "released": released}


@step("session_survives_sigkill", [TEMPLATE])
def _():
    """systemd's fd store (FileDescriptorStoreMax=) keeps the frontend's fds: the
    restarted daemon takes the session back, and the same session reports again."""
    info = {}

    def kill():
        old = int(show(TEMPLATE, "MainPID")["MainPID"])
        os.kill(old, signal.SIGKILL)

        def back():
            s = show(TEMPLATE, "ActiveState", "MainPID", "NRestarts", "NFileDescriptorStore")
            return (s if s["ActiveState"] == "active" and int(s["MainPID"]) not in (0, old)
                    else None)
        s = wait_for(back, 90, "the restarted daemon")
        info.update(old_pid=old, new_pid=s["MainPID"], nrestarts=s["NRestarts"],
                    stored_fds=s.get("NFileDescriptorStore"))

    released = report_once(f"{RUN}/t1.sock", timeout=60, between=kill)
    check(released >= 2 * 4 * 1024 * 1024 - 65536, f"released {released} bytes over two chains")
    return {"released": released, **info}


@step("socket_activation", [SOCKET, ACTIVATED])
def _():
    run("systemctl", "start", SOCKET)
    check(show(SOCKET, "ActiveState")["ActiveState"] == "active", "socket unit not active")
    before = show(ACTIVATED, "ActiveState")["ActiveState"]
    check(before == "inactive", f"service is {before} before any connection")
    sock_ok(f"{RUN}/s1.sock")
    released = served(f"{RUN}/s1.sock", timeout=60)
    s = show(ACTIVATED, "ActiveState", "MainPID", "StatusText")
    check(s["ActiveState"] == "active", f"service is {s['ActiveState']} after the session")
    d = hardening(int(s["MainPID"]))
    released2 = served(f"{RUN}/s1.sock")
    return {"before": before, "after": s["ActiveState"], "released": released,
            "released2": released2, "status": s["StatusText"], **d}


@step("multi_serve", [MULTI])
def _():
    check("pid" in multi, "the multi-guest unit did not start")
    rel = {g: served(f"{RUN}/{g}.sock") for g in ("a", "b")}
    with urllib.request.urlopen("http://127.0.0.1:9464/metrics", timeout=20) as r:
        body = r.read().decode()
    names = sorted({ln.split("{")[0].split()[0] for ln in body.splitlines()
                    if ln.startswith("vub") or ln.startswith("vhost")})
    check(names, "no daemon metrics at 127.0.0.1:9464")
    d = hardening(int(multi["pid"]))
    return {"released_a": rel["a"], "released_b": rel["b"], "metrics": len(names), **d}


@step("multi_watchdog", [MULTI])
def _():
    check("t0" in multi, "the multi-guest unit did not start")
    props = ("ActiveState", "MainPID", "NRestarts", "WatchdogUSec", "WatchdogTimestampMonotonic")
    time.sleep(max(0.0, WATCH_WAIT - (time.monotonic() - multi["t0"])))
    s = show(MULTI, *props)
    now_us = time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6
    age = (now_us - int(s["WatchdogTimestampMonotonic"])) / 1e6
    check(s["ActiveState"] == "active", f"state {s['ActiveState']}")
    check(s["MainPID"] == multi["pid"], f"MainPID {multi['pid']} -> {s['MainPID']}")
    check(s["NRestarts"] == "0", f"NRestarts={s['NRestarts']}")
    check(s["WatchdogUSec"] == "30s", f"WatchdogUSec={s['WatchdogUSec']}")
    check(int(s["WatchdogTimestampMonotonic"]) > multi["ping0"] > 0,
          "no WATCHDOG=1 ping since the start")
    check(age < 30, f"last ping {age:.1f} s ago")
    rel = {g: served(f"{RUN}/{g}.sock") for g in ("a", "b")}
    return {"up_secs": f"{time.monotonic() - multi['t0']:.0f}", "nrestarts": s["NRestarts"],
            "watchdog": s["WatchdogUSec"], "last_ping_age": f"{age:.1f}",
            "released_a": rel["a"], "released_b": rel["b"]}


@step("multi_watchdog_fires", [MULTI])
def _():
    # A hung daemon (SIGSTOP: no more pings) is stopped by the watchdog
    # (Result=watchdog within WatchdogSec of its last ping) and restarted.
    pid = int(show(MULTI, "MainPID")["MainPID"])
    check(pid > 0, "no main PID")
    t0 = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: show(MULTI, "Result")["Result"] == "watchdog", 90,
                 "the watchdog timeout", interval=0.5)
        fired = time.monotonic() - t0
    finally:
        try:
            os.kill(pid, signal.SIGCONT)    # systemd sends SIGCONT after SIGABRT itself
        except ProcessLookupError:
            pass
    check(fired <= 45, f"fired {fired:.0f} s after the last possible ping")

    def back():
        s = show(MULTI, "ActiveState", "MainPID", "NRestarts")
        return s if s["ActiveState"] == "active" and int(s["MainPID"]) not in (0, pid) else None

    s = wait_for(back, 90, "the restarted daemon")
    check(s["NRestarts"] == "1", f"NRestarts={s['NRestarts']}")
    rel = {g: served(f"{RUN}/{g}.sock") for g in ("a", "b")}
    return {"fired_after": f"{fired:.0f}", "old_pid": pid, "new_pid": s["MainPID"],
            "nrestarts": s["NRestarts"], "released_a": rel["a"], "released_b": rel["b"]}


for unit in (TEMPLATE, ACTIVATED, MULTI):
    @step(f"security:{unit}")
    def _(unit=unit):
        out = run("systemd-analyze", "security", "--no-pager", unit, check=False)
        say("\n".join(f"VUB-SEC {unit}: {ln}" for ln in out.splitlines()))
        last = [ln for ln in out.splitlines() if "Overall exposure level" in ln]
        check(last, "no exposure level in the output")
        words = last[-1].split(":")[-1].split()
        mark("systemd-security", unit=unit, score=words[0], level=words[1])
        check(float(words[0]) <= MAX_EXPOSURE,
              f"{unit}: exposure {words[0]} {words[1]} > {MAX_EXPOSURE} (docs/operations.md "
              "lists 1.2-1.5): a hardening option was lost")
        return {"score": words[0]}


@step("clean_stop", [TEMPLATE, ACTIVATED, MULTI])
def _():
    run("systemctl", "stop", SOCKET, ACTIVATED, TEMPLATE, MULTI)
    res = {u: show(u, "ActiveState", "Result") for u in (TEMPLATE, ACTIVATED, MULTI)}
    for u, s in res.items():
        check(s["ActiveState"] == "inactive" and s["Result"] == "success", f"{u}: {s}")
    check(not os.path.exists(f"{RUN}/s1.sock"), "RemoveOnStop left s1.sock")
    return {"results": "all_success"}


mark("systemd-done", **{"pass": results["pass"], "fail": results["fail"]})
run("systemctl", "poweroff", "--no-block", check=False)
