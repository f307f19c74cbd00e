"""Run our daemon (vhost-user-balloon) for tests and benchmarks.

    with Daemon(workdir, args=["--stats-interval", "1"]) as d:
        d.socket_path          # give to Guest(balloon="vhost-user", vhost_socket=...)
        d.ctl({"cmd": "status"})
        d.status()["counters"]
        d.log_text()
"""

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from balloon_device.host.control import request as control_request

from .proc import pid_alive, start_process, stop_process

ROOT = Path(__file__).resolve().parents[3]


class DaemonError(RuntimeError):
    pass


class Daemon:
    def __init__(self, workdir=None, args=(), cgroup=None, name="vub", log_level="debug"):
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="vub-daemon-"))
        self.socket_path = str(self.workdir / f"{name}.sock")
        self.control_path = self.socket_path + ".ctl"
        self.log_path = self.workdir / f"{name}-daemon.log"
        self.args = list(args)
        self.cgroup = cgroup
        self.log_level = log_level
        self.proc = None

    def argv(self):
        return [sys.executable, "-m", "balloon_device.host.cli", "--socket-path", self.socket_path,
                "--log-level", self.log_level, *self.args]

    def start(self, timeout=20):
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = start_process(self.argv(), cgroup=self.cgroup, log_path=self.log_path,
                                  env=env, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.path.exists(self.control_path) and os.path.exists(self.socket_path):
                try:  # a path left by a killed daemon exists too: ask the new one
                    control_request(self.control_path, {"cmd": "status"}, timeout=2)
                    return self
                except Exception:
                    pass
            if self.proc.poll() is not None:
                raise DaemonError(f"daemon exited with {self.proc.returncode}:\n{self.log_text()}")
            time.sleep(0.05)
        raise DaemonError(f"daemon did not create {self.socket_path} in {timeout}s:\n"
                          f"{self.log_text()}")

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def serving_pid(self):
        """The process that serves the guest (pid is its supervisor's, which maps no
        guest memory): measure CPU and memory here."""
        return self.status().get("process", {}).get("pid") or self.pid

    def alive(self):
        return self.proc is not None and self.proc.poll() is None and pid_alive(self.proc.pid)

    def ctl(self, req, timeout=10):
        reply = control_request(self.control_path, req, timeout=timeout)
        if not reply.get("ok"):
            raise DaemonError(f"control request {req} failed: {reply.get('error')}")
        return reply

    def status(self):
        return self.ctl({"cmd": "status"})["status"]

    def set_target(self, nbytes):
        return self.ctl({"cmd": "target", "bytes": int(nbytes)})

    def wait_actual(self, nbytes, timeout=60):
        """Wait until the guest's balloon holds exactly nbytes; returns the last status."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if st["actual_bytes"] == nbytes or time.monotonic() >= deadline:
                return st
            time.sleep(0.2)

    def wait_exit(self, timeout=10):
        try:
            return self.proc.wait(timeout=timeout)
        except Exception:
            return None

    def kill(self, sig=9):
        os.kill(self.proc.pid, sig)
        self.proc.wait(timeout=10)

    def log_text(self, tail=200):
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no daemon log)"
        return "\n".join(lines[-tail:])

    def stop(self):
        if self.proc is not None:
            rc = stop_process(self.proc)
            return rc
        return None

    def __enter__(self):
        return self.start()

    def __exit__(self, exc_type, *exc):
        self.stop()
        if self._own_workdir and exc_type is None:
            shutil.rmtree(self.workdir, ignore_errors=True)
