"""sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET.

    notify("READY=1\\nSTATUS=serving 2 guests")
    notify("STOPPING=1")

A leading '@' in the address names a socket in the abstract namespace. Without
$NOTIFY_SOCKET (not started by systemd with Type=notify) every call is a no-op.
Failures are logged and never raised: notification must not stop the daemon.
"""

import logging
import os
import socket

log = logging.getLogger(__name__)
_sock = None  # connected by prepare(): --seccomp allows neither socket() nor connect()


def _address(env):
    addr = env.get("NOTIFY_SOCKET")
    if not addr:
        return None
    if addr[0] == "@":
        return "\0" + addr[1:]
    if addr[0] == "/":
        return addr
    log.warning("NOTIFY_SOCKET=%s is not a Unix socket path; not notifying systemd", addr)
    return None


def prepare(env=None):
    """Open and connect the notification socket now, before the sandbox forbids it."""
    global _sock
    addr = _address(os.environ if env is None else env)
    if addr is None or _sock is not None:
        return
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        s.connect(addr)
    except OSError as e:
        s.close()
        log.warning("cannot connect to systemd at %s: %s", addr.lstrip("\0"), e.strerror or e)
        return
    _sock = s


def notify(message, env=None):
    """Send message (e.g. 'READY=1'); True if it was sent."""
    addr = _address(os.environ if env is None else env)
    if addr is None:
        return False
    if _sock is not None and env is None:
        try:
            _sock.send(message.encode())
            return True
        except OSError as e:
            log.warning("cannot notify systemd: %s", e.strerror or e)
            return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(message.encode())
    except OSError as e:
        log.warning("cannot notify systemd at %s: %s", addr.lstrip("\0"), e.strerror or e)
        return False
    return True


def watchdog_interval(env=None):
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec=), or None if not asked for."""
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
        pid = int(env.get("WATCHDOG_PID", str(os.getpid())))
    except ValueError:
        return None
    if usec <= 0 or pid != os.getpid():
        return None
    return usec / 2e6
