"""Local control socket: one JSON object per line, one reply line per request.

Requests:  {"cmd": "status"}
           {"cmd": "list"}                      (every guest's status, in a list)
           {"cmd": "target", "bytes": N}        (or "pages": N)
           {"cmd": "stats", "refresh": bool}
           {"cmd": "inhibit", "on": bool}
Every request but list takes "guest": NAME; it is needed when the daemon serves
several guests (then a status without it answers {"guests": {NAME: status}}).
Replies:   {"ok": true, ...} or {"ok": false, "error": "..."}
"""

import json
import logging
import socket

from vhostuser.connection import Listener
from vhostuser.errors import SetupError

from .errors import BalloonError, ControlError

log = logging.getLogger(__name__)
MAX_REQUEST = 64 * 1024
MAX_CLIENTS = 16


class ControlServer:
    """The control socket of a Daemon: JSON requests over a Unix socket,
    served on the daemon's event loop (anything with add_reader/remove_reader)."""

    def __init__(self, path, *, guests, loop, policy=None):
        self.guests = guests  # name -> multi.Guest
        self.policy = policy  # policy.PolicyLoop or None
        self.server = loop
        try:
            self.listener = Listener.at_path(path)
        except SetupError as e:
            raise ControlError(f"control socket: {e}") from e
        self.listener.sock.setblocking(False)
        self.clients = {}
        self.server.add_reader(self.listener.fileno(), self._accept)

    def _accept(self):
        try:
            sock, _ = self.listener.sock.accept()
        except OSError:
            return
        if len(self.clients) >= MAX_CLIENTS:
            sock.close()
            return
        sock.setblocking(False)
        self.clients[sock.fileno()] = (sock, bytearray())
        self.server.add_reader(sock.fileno(), lambda fd=sock.fileno(): self._read(fd))

    def _drop(self, fd):
        sock, _ = self.clients.pop(fd)
        self.server.remove_reader(fd)
        sock.close()

    def _read(self, fd):
        sock, buf = self.clients[fd]
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(fd)
            return
        buf += data
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            reply = self.dispatch(line)
            try:
                sock.sendall(json.dumps(reply).encode() + b"\n")
            except OSError:
                self._drop(fd)
                return
        if len(buf) > MAX_REQUEST:
            try:
                sock.sendall(b'{"ok": false, "error": "request too long"}\n')
            except OSError:
                pass
            self._drop(fd)

    def dispatch(self, line):
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("a request is a JSON object")
            cmd = req.get("cmd")
            fn = getattr(self, f"_cmd_{cmd}", None) if isinstance(cmd, str) else None
            if fn is None:
                raise ValueError(f"unknown command {cmd!r}; use status, list, target, stats "
                                 "or inhibit")
            return {"ok": True, **fn(req)}
        except (ValueError, TypeError, BalloonError) as e:
            return {"ok": False, "error": str(e)}
        except Exception as e:  # never let a request take the daemon down
            log.exception("control request failed")
            return {"ok": False, "error": f"internal error: {e}"}

    def _guest(self, req):
        name = req.get("guest")
        if name is None:
            if len(self.guests) == 1:
                return next(iter(self.guests.values()))
            raise ValueError(f"this daemon serves {len(self.guests)} guests "
                             f"({', '.join(self.guests)}): add \"guest\": NAME")
        guest = self.guests.get(name) if isinstance(name, str) else None
        if guest is None:
            raise ValueError(f"no guest {name!r} here; this daemon serves "
                             f"{', '.join(self.guests)}")
        return guest

    def _status(self, guest):
        d = guest.status(rings=True).to_dict()
        last = self.policy.last if self.policy is not None else None
        if last:   # what the policy saw of this guest on its last tick
            name = guest.name
            d["policy"] = {"host_pressure": last.get("host_pressure", {}).get(name),
                           "stalling": name in last.get("stalling", ()),
                           "busy": name in last.get("busy", ()),
                           "fast_reclaim_target_pages": last.get("fast", {}).get(name),
                           "fast_reclaims": last.get("fast_done", {}).get(name, 0),
                           "taskstats_error": last.get("taskstats_error")}
        return d

    def _cmd_status(self, req):
        if req.get("guest") is None and len(self.guests) > 1:
            return {"guests": {name: self._status(g) for name, g in self.guests.items()}}
        return {"status": self._status(self._guest(req))}

    def _cmd_list(self, req):
        out = {"guests": [g.status().to_dict() for g in self.guests.values()]}
        if self.policy is not None:
            out["policy"] = self.policy.last or {}   # {} until its first tick
        return out

    def _cmd_target(self, req):
        if "pages" in req:
            pages = req["pages"]
        else:
            size = req.get("bytes")
            if not isinstance(size, int) or size < 0:
                raise ValueError("target needs 'bytes' (int >= 0) or 'pages'")
            pages = size >> 12
        if not isinstance(pages, int) or isinstance(pages, bool):
            raise ValueError("pages must be an integer")
        guest = self._guest(req)
        sent = guest.set_target(pages)
        return {"guest": guest.name, "target_pages": pages, "notified": sent}

    def _cmd_stats(self, req):
        guest = self._guest(req)
        refreshed = guest.request_stats() if req.get("refresh") else False
        return {"guest": guest.name, "stats": guest.device.latest_stats,
                "time": guest.device.stats_time, "refresh_requested": refreshed}

    def _cmd_inhibit(self, req):
        on = req.get("on")
        if not isinstance(on, bool):
            raise ValueError("inhibit needs 'on': true or false")
        guest = self._guest(req)
        guest.device.inhibited = on
        log.info("guest %s: discards %s", guest.name,
                 "inhibited: reported memory stays with QEMU" if on else "allowed again")
        return {"guest": guest.name, "inhibited": on}

    def close(self):
        for fd in list(self.clients):
            self._drop(fd)
        self.server.remove_reader(self.listener.fileno())
        self.listener.close()


def request(path, req, timeout=10.0):
    """Client side: send one request, return the reply dict."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    except OSError as e:
        raise ControlError(f"cannot talk to the daemon at {path}: {e.strerror or e}") from e
    finally:
        s.close()
    try:
        return json.loads(buf)
    except ValueError as e:
        raise ControlError(f"daemon at {path} sent a malformed reply") from e
