"""Process helpers: start a process (optionally inside a memory cgroup from
its very first instruction) and stop it reliably."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import IO, Mapping, Optional, Sequence, Union

from .cgroup import MemCgroup

# Puts the shell into the cgroup, then execs the real program, so the program
# is accounted to the cgroup from exec on (all its memory is charged there).
_CG_EXEC = 'echo $$ > "$1" && shift && exec "$@"'


def start_process(
    argv: Sequence[str],
    cgroup: Optional[MemCgroup] = None,
    log_path: Union[str, Path, None] = None,
    env: Optional[Mapping[str, str]] = None,
    cwd: Union[str, Path, None] = None,
    stdin: Union[int, IO, None] = subprocess.DEVNULL,
) -> subprocess.Popen:
    """Start ``argv`` in a new session (own process group).

    ``cgroup``: a created :class:`MemCgroup`; the process joins it before
    exec.  ``log_path``: stdout and stderr are appended to that file
    (otherwise they are discarded).  The returned Popen's pid is the program's
    pid (the helper shell execs it).  Stop it with :func:`stop_process`.
    """
    argv = [str(a) for a in argv]
    if cgroup is not None:
        argv = ["/bin/sh", "-c", _CG_EXEC, "sh", str(cgroup.path / "cgroup.procs")] + argv
    out = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL
    try:
        return subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=str(cwd) if cwd is not None else None,
            start_new_session=True,
            close_fds=True,
        )
    finally:
        if log_path is not None:
            out.close()


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # state is the field after the parenthesised comm
    state = stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3]
    return state not in (b"Z", b"X", b"")


def stop_process(proc: Union[subprocess.Popen, int, None], term_timeout: float = 5.0,
                 kill_timeout: float = 5.0) -> Optional[int]:
    """SIGTERM, wait up to ``term_timeout`` s, then SIGKILL and wait up to
    ``kill_timeout`` s.  Accepts a Popen (reaped, returns its exit code) or a
    bare pid (returns None).  Never raises for an already gone process."""
    if proc is None:
        return None
    if isinstance(proc, subprocess.Popen):
        if proc.poll() is not None:
            return proc.returncode
        for sig, timeout in ((signal.SIGTERM, term_timeout), (signal.SIGKILL, kill_timeout)):
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                return proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                continue
        return proc.poll()
    pid = int(proc)
    for sig, timeout in ((signal.SIGTERM, term_timeout), (signal.SIGKILL, kill_timeout)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return None
            time.sleep(0.05)
    return None
