"""Memory cgroup v1 helpers (``/sys/fs/cgroup/memory``)."""
from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path
from typing import Dict, List, Optional

CGROUP_MEMORY_ROOT = Path(os.environ.get("VUB_CGROUP_MEMORY_ROOT", "/sys/fs/cgroup/memory"))


class CgroupError(RuntimeError):
    pass


class MemCgroup:
    """A memory cgroup v1 directory ``CGROUP_MEMORY_ROOT/<rel>``.

    ``MemCgroup("a/b", limit_bytes=...)`` does nothing until :meth:`create`.
    Parents are created as needed with ``memory.use_hierarchy=1`` (so a
    limit on a parent covers its children).  :meth:`remove` kills what is
    left inside (only processes in this cgroup) and removes the directory,
    retrying while the kernel still reports it busy.
    """

    def __init__(self, rel: str, limit_bytes: Optional[int] = None):
        rel = rel.strip("/")
        if not rel or ".." in rel.split("/"):
            raise ValueError(f"bad cgroup name {rel!r}")
        self.rel = rel
        self.path = CGROUP_MEMORY_ROOT / rel
        self.limit_bytes = limit_bytes
        self.created = False

    # -- life cycle ---------------------------------------------------------
    def create(self) -> "MemCgroup":
        if not (CGROUP_MEMORY_ROOT / "cgroup.procs").exists():
            raise CgroupError(f"memory cgroup v1 not mounted at {CGROUP_MEMORY_ROOT}")
        cur = CGROUP_MEMORY_ROOT
        for part in self.rel.split("/"):
            cur = cur / part
            if not cur.exists():
                cur.mkdir()
                # Must be set before the cgroup has children; harmless if the
                # kernel forces it (cgroup v1 on recent kernels always is 1).
                try:
                    (cur / "memory.use_hierarchy").write_text("1")
                except OSError:
                    pass
        self.created = True
        if self.limit_bytes is not None:
            self.set_limit(self.limit_bytes)
        return self

    def set_limit(self, limit_bytes: int) -> None:
        (self.path / "memory.limit_in_bytes").write_text(str(int(limit_bytes)))
        self.limit_bytes = limit_bytes

    def child(self, name: str, limit_bytes: Optional[int] = None) -> "MemCgroup":
        return MemCgroup(f"{self.rel}/{name}", limit_bytes)

    def procs(self) -> List[int]:
        try:
            return [int(x) for x in (self.path / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return []

    def kill_all(self, timeout: float = 5.0) -> None:
        """SIGKILL every process in this cgroup (and child cgroups)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids: List[int] = []
            for d in self._dirs():
                try:
                    pids += [int(x) for x in (d / "cgroup.procs").read_text().split()]
                except FileNotFoundError:
                    pass
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)

    def _dirs(self) -> List[Path]:
        if not self.path.exists():
            return []
        return [self.path] + [p for p in self.path.rglob("*") if p.is_dir()]

    def remove(self, timeout: float = 10.0, remove_empty_parents: bool = False) -> None:
        """Kill leftovers, then rmdir (children first), retrying up to ``timeout`` s."""
        if not self.path.exists():
            return
        self.kill_all(timeout=min(5.0, timeout))
        dirs = sorted(self._dirs(), key=lambda p: -len(p.parts))
        deadline = time.monotonic() + timeout
        for d in dirs:
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno not in (errno.EBUSY, errno.ENOTEMPTY) or time.monotonic() > deadline:
                        raise CgroupError(f"cannot remove {d}: {e}") from e
                    time.sleep(0.1)
        if remove_empty_parents:
            parent = self.path.parent
            while parent != CGROUP_MEMORY_ROOT and parent.is_relative_to(CGROUP_MEMORY_ROOT):
                try:
                    parent.rmdir()
                except OSError:
                    break
                parent = parent.parent

    # -- samplers -------------------------------------------------------------
    def _read_int(self, name: str) -> Optional[int]:
        try:
            return int((self.path / name).read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None

    def usage(self) -> Optional[int]:
        """memory.usage_in_bytes"""
        return self._read_int("memory.usage_in_bytes")

    def max_usage(self) -> Optional[int]:
        return self._read_int("memory.max_usage_in_bytes")

    def failcnt(self) -> Optional[int]:
        return self._read_int("memory.failcnt")

    def stat(self) -> Dict[str, int]:
        """memory.stat as a dict of ints (bytes for the size fields)."""
        out: Dict[str, int] = {}
        try:
            for line in (self.path / "memory.stat").read_text().splitlines():
                k, _, v = line.partition(" ")
                try:
                    out[k] = int(v)
                except ValueError:
                    pass
        except FileNotFoundError:
            pass
        return out

    def oom_control(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        try:
            for line in (self.path / "memory.oom_control").read_text().splitlines():
                k, _, v = line.partition(" ")
                out[k] = int(v)
        except (FileNotFoundError, ValueError):
            pass
        return out

    def __repr__(self) -> str:
        return f"MemCgroup({self.rel!r})"
