"""Validated, frozen daemon configuration, and size parsing."""

import os
import re
from dataclasses import dataclass
from fractions import Fraction

from ..discard import MODES, shared_memory_problem
from .errors import ConfigError
from ..features import MIN_REPORTING_QUEUE
from .policy import PolicyConfig

GUEST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1000, "KIB": 1 << 10, "M": 1 << 20, "MB": 10 ** 6,
          "MIB": 1 << 20, "G": 1 << 30, "GB": 10 ** 9, "GIB": 1 << 30, "T": 1 << 40,
          "TIB": 1 << 40}
LOG_LEVELS = ("debug", "info", "warning", "error")


def parse_size(text):
    """'512MiB', '1G', '1.5G', '4096' -> bytes (a whole number of them)."""
    mt = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not mt or mt.group(2).upper() not in _UNITS:
        raise ConfigError(f"cannot read size {text!r}: use a number with an optional unit "
                          "(K, M, G, KiB, MiB, GiB, ...), e.g. 512MiB or 1.5G")
    size = Fraction(mt.group(1)) * _UNITS[mt.group(2).upper()]
    if size.denominator != 1:
        raise ConfigError(f"size {text!r} is not a whole number of bytes")
    return int(size)


@dataclass(frozen=True)
class DaemonConfig:
    socket_path: str = None
    fd: int = None
    control_socket: str = None
    discard: str = "auto"
    no_discard: bool = False
    reporting: bool = True
    stats: bool = True
    stats_interval: float = 0.0
    deflate_on_oom: bool = False
    keep_listening: bool = False
    queue_size: int = 64
    log_level: str = "info"
    log_format: str = "text"        # text or json
    name: str = None                # the guest's name (single guest); default: socket file name
    guests: tuple = ()              # ((name, socket_path), ...): several guests, one daemon
    metrics_port: int = None
    metrics_address: str = "127.0.0.1"
    policy: PolicyConfig = None
    seccomp: str = None             # None, or the default action: errno, log, kill (sandbox.py)
    user: str = None                # drop to this user (and group) once the sockets exist
    group: str = None
    socket_group: str = None        # guest sockets: this group, mode 0660 (QEMU's group)
    control_socket_group: str = None  # control socket: this group, mode 0660 (operators)

    def __post_init__(self):
        given = (self.socket_path is not None) + (self.fd is not None) + bool(self.guests)
        if given != 1:
            if not self.guests:
                raise ConfigError("give exactly one of --socket-path PATH and --fd N "
                                  "(or --guest NAME=PATH / --socket-dir DIR --guests a,b)")
            raise ConfigError("--guest / --guests replace --socket-path and --fd: give one way")
        names = [n for n, _ in self.guests] + ([self.name] if self.name else [])
        for n in names:
            if not GUEST_NAME.fullmatch(n):
                raise ConfigError(f"guest name {n!r}: use letters, digits, '_', '.', '-' "
                                  "(up to 64, starting with a letter or digit)")
        if len(set(names)) != len(names):
            raise ConfigError("each guest needs its own name")
        if self.name and self.guests:
            raise ConfigError("--name names the single guest; with --guest give NAME=PATH")
        for n, path in self.guests:
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                raise ConfigError(f"--guest {n}={path}: folder {parent} does not exist")
        if len({os.path.abspath(p) for _, p in self.guests}) != len(self.guests):
            raise ConfigError("each guest needs its own socket path")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"--metrics-port {self.metrics_port}: a TCP port, 0 to 65535")
        if self.policy is not None and not self.stats:
            raise ConfigError("--policy reads the guests' memory statistics: "
                              "do not combine it with --no-stats")
        if self.fd is not None and self.fd < 0:
            raise ConfigError(f"--fd {self.fd}: a file descriptor is a number >= 0")
        if self.socket_path is not None:
            parent = os.path.dirname(os.path.abspath(self.socket_path))
            if not os.path.isdir(parent):
                raise ConfigError(f"--socket-path {self.socket_path}: folder {parent} does not exist")
        if self.discard not in MODES:
            raise ConfigError(f"--discard {self.discard}: choose one of {', '.join(MODES)}")
        shared = shared_memory_problem(
            self.discard, "guest memory (the daemon maps it MAP_SHARED from the frontend's fd)")
        if shared:
            raise ConfigError(shared)
        if self.stats_interval < 0:
            raise ConfigError("--stats-interval must be >= 0 seconds (0 = off)")
        if self.queue_size & (self.queue_size - 1) or not 1 <= self.queue_size <= 32768:
            raise ConfigError(f"--queue-size {self.queue_size}: a power of two up to 32768")
        if self.reporting and self.queue_size < MIN_REPORTING_QUEUE:
            raise ConfigError(f"--queue-size {self.queue_size}: Linux refuses a reporting "
                              f"queue smaller than {MIN_REPORTING_QUEUE}")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"--log-format {self.log_format}: choose text or json")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"--log-level {self.log_level}: choose one of {', '.join(LOG_LEVELS)}")

    @property
    def control_path(self):
        if self.control_socket:
            return self.control_socket
        if self.guests:  # next to the first guest's socket
            return os.path.join(os.path.dirname(os.path.abspath(self.guests[0][1])),
                                "control.sock")
        return self.socket_path + ".ctl" if self.socket_path else None

    @property
    def guest_specs(self):
        """[(name, socket_path, fd)] of every guest to serve."""
        if self.guests:
            return [(n, p, None) for n, p in self.guests]
        if self.name:
            name = self.name
        elif self.socket_path:
            name = os.path.splitext(os.path.basename(self.socket_path))[0] or "guest"
            if not GUEST_NAME.fullmatch(name):
                name = "guest"
        else:
            name = f"fd{self.fd}"
        return [(name, self.socket_path, self.fd)]


def guest_control_path(control_path, name):
    """The control socket of one guest's serving process under the supervisor:
    CONTROL.NAME beside the daemon's control socket (e.g. control.sock.web1)."""
    return f"{control_path}.{name}"


def check_new_guest(name, path, guests):
    """A guest added at run time (ctl add-guest): the same rules as --guest NAME=PATH.
    guests: {name: object with socket_path} already served."""
    if not isinstance(name, str) or not GUEST_NAME.fullmatch(name):
        raise ConfigError(f"guest name {name!r}: use letters, digits, '_', '.', '-' "
                          "(up to 64, starting with a letter or digit)")
    if not isinstance(path, str) or not path or "\n" in path or "\0" in path:
        raise ConfigError("add-guest needs a socket path, e.g. web1=/run/vub/web1.sock")
    if name in guests:
        raise ConfigError(f"guest {name!r} is already served")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfigError(f"add-guest {name}={path}: folder {parent} does not exist")
    taken = {os.path.abspath(g.socket_path) for g in guests.values() if g.socket_path}
    if os.path.abspath(path) in taken:
        raise ConfigError(f"add-guest {name}={path}: another guest is served on that socket")
