"""The fd store protocol (systemd's; also spoken by the built-in supervisor).

    FdStore().push("vub.web1.kick.0.7", fd)    # sd_notify FDSTORE=1, FDNAME=..., fd attached
    FdStore().remove("vub.web1.kick.0.7")      # FDSTOREREMOVE=1, FDNAME=...
    take_listen_fds()                          # [(name, fd)] from LISTEN_FDS/LISTEN_FDNAMES

Names: ``vub.<guest>.<kind>.<index>.<generation>`` for the session's fds (see
vhostuser/restart.py for the kinds), ``vub.<guest>.listen`` for the listening
socket and ``vub.<guest>.state`` for the state memfd (state.py). A guest name is
escaped (%XX for anything but letters, digits, '-' and '_') so that it never holds
a '.' or a ':' (the separator of LISTEN_FDNAMES).
"""

import ctypes
import logging
import os
import re

from . import notify

log = logging.getLogger(__name__)

LISTEN_FDS_START = 3
PREFIX = "vub"


def escape(name):
    return re.sub(r"[^A-Za-z0-9_-]", lambda m: "".join(f"%{b:02X}" for b in m.group().encode()),
                  name)


def fd_name(guest, *parts):
    name = ".".join([PREFIX, escape(guest), *(str(p) for p in parts)])
    if len(name) > 255:
        raise ValueError(f"fd name {name[:40]}... is longer than 255 characters")
    return name


def parse_name(name):
    """'vub.g.kick.0.7' -> ('g' escaped, ['kick', '0', '7']); None if not ours."""
    parts = name.split(".")
    if len(parts) < 3 or parts[0] != PREFIX:
        return None
    return parts[1], parts[2:]


def take_listen_fds(env=None, unset=True):
    """The fds passed by the service manager: [(name, fd)], marked close-on-exec.
    Empty unless LISTEN_PID is this process (systemd's sd_listen_fds_with_names)."""
    env = os.environ if env is None else env
    try:
        pid = int(env.get("LISTEN_PID", "0"))
        n = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    names = env.get("LISTEN_FDNAMES", "")
    if unset and env is os.environ:
        for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(k, None)
    if pid != os.getpid() or n <= 0:
        return []
    names = names.split(":") if names else []
    out = []
    for i in range(n):
        fd = LISTEN_FDS_START + i
        name = names[i] if i < len(names) else "unknown"
        if parse_name(name) is not None:
            os.set_inheritable(fd, False)  # ours; others (socket activation) are left as given
        out.append((name, fd))
    return out


_KCMP = {"x86_64": 312, "aarch64": 272}.get(os.uname().machine)
_libc = ctypes.CDLL(None, use_errno=True)


def same_fd(a, b):
    """Do fds a and b refer to the same open file? (systemd's same_fd: fstat, then kcmp)"""
    try:
        sa, sb = os.fstat(a), os.fstat(b)
    except OSError:
        return False
    if (sa.st_dev, sa.st_ino, sa.st_mode, sa.st_rdev) != (sb.st_dev, sb.st_ino, sb.st_mode,
                                                        sb.st_rdev):
        return False
    if _KCMP is not None:
        pid = os.getpid()
        r = _libc.syscall(_KCMP, pid, pid, 0, a, b)  # KCMP_FILE
        if r >= 0:
            return r == 0
    return not os.readlink(f"/proc/self/fd/{a}").startswith("anon_inode:")



class FdStore:
    """Pushes fds to the store at $NOTIFY_SOCKET (systemd or the built-in supervisor)."""

    def __init__(self, env=None):
        self.env = env  # None: the process environment (and notify.prepare()'s socket)
        self.enabled = bool((os.environ if env is None else env).get("NOTIFY_SOCKET"))
        self.pushed = 0
        self.removed = 0

    def push(self, name, fd):
        if not self.enabled:
            return False
        ok = notify.notify_fds(f"FDSTORE=1\nFDNAME={name}", [fd], self.env)
        self.pushed += ok
        return ok

    def remove(self, name):
        if not self.enabled:
            return False
        ok = notify.notify(f"FDSTOREREMOVE=1\nFDNAME={name}", self.env)
        self.removed += ok
        return ok
