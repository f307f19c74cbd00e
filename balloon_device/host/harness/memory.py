"""Host-side memory samplers for a QEMU process."""
from __future__ import annotations

import os
from typing import Dict, Optional, Sequence, Union


def smaps_rollup(pid: int) -> Dict[str, int]:
    """/proc/PID/smaps_rollup as bytes: {'Rss': .., 'Pss': .., 'Shmem'...}.
    Empty dict when the process is gone."""
    out: Dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[0].endswith(":") and parts[2] == "kB":
                    out[parts[0][:-1]] = int(parts[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    # smaps_rollup has no "Shmem" line; RssShmem is in /proc/PID/status.
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("RssAnon:", "RssFile:", "RssShmem:", "VmHWM:", "VmRSS:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out


MEMFD_NAMES = ("memory-backend-memfd", "mem")


def find_memfd(pid: int, names: Union[str, Sequence[str]] = MEMFD_NAMES) -> Optional[int]:
    """fd number of the guest-RAM memfd in process ``pid`` (link
    "/memfd:<name> (deleted)"; QEMU names it "memory-backend-memfd"); the
    largest one when there are several; None if there is none."""
    if isinstance(names, str):
        names = (names,)
    wants = [f"/memfd:{n}" for n in names]
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except (FileNotFoundError, PermissionError):
        return None
    best, best_size = None, -1
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if any(link == w or link.startswith(w + " ") for w in wants):
            try:
                size = os.stat(f"/proc/{pid}/fd/{fd}").st_size
            except OSError:
                continue
            if size > best_size:
                best, best_size = int(fd), size
    return best


def memfd_allocated(pid: int, fd: Optional[int] = None) -> Optional[int]:
    """Allocated bytes (st_blocks * 512) of the guest-RAM memfd of ``pid``
    (``fd``: its number in that process, found with find_memfd if None)."""
    if fd is None:
        fd = find_memfd(pid)
        if fd is None:
            return None
    try:
        st = os.stat(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None
    return st.st_blocks * 512


def find_ram_fds(pid: int, prefixes: Sequence[str]) -> list:
    """fd numbers in process ``pid`` whose link starts with one of ``prefixes``
    (e.g. "/memfd:memory-backend-memfd", or a hugetlbfs mount "/mnt/x/"), sorted."""
    out = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except (FileNotFoundError, PermissionError):
        return out
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if any(link.startswith(p) for p in prefixes):
            out.append(int(fd))
    return sorted(out)
