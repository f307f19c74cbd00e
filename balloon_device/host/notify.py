"""sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET.

    notify("READY=1\\nSTATUS=serving 2 guests")
    notify("STOPPING=1")

A leading '@' in the address names a socket in the abstract namespace. Without
$NOTIFY_SOCKET (not started by systemd with Type=notify) every call is a no-op.
Failures are logged and never raised: notification must not stop the daemon.
"""

import array
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
    return _send(message, (), env, "cannot notify systemd")


def notify_fds(message, fds, env=None):
    """Send message with fds attached (SCM_RIGHTS), e.g. 'FDSTORE=1\nFDNAME=x'.
    True if sent; False without $NOTIFY_SOCKET or on failure (logged)."""
    return _send(message, fds, env, "cannot send fds to the fd store")


def _send(message, fds, env, failure):
    addr = _address(os.environ if env is None else env)
    if addr is None:
        return False
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    if _sock is not None and env is None:   # connected before the sandbox
        try:
            _sock.sendmsg([message.encode()], anc)
            return True
        except OSError as e:
            log.warning("%s: %s", failure, e.strerror or e)
            return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendmsg([message.encode()], anc, 0, addr)
    except OSError as e:
        log.warning("%s at %s: %s", failure, addr.lstrip("\0"), e.strerror or e)
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
