"""Local control socket: one JSON object per line, one reply line per request.

Requests:  {"cmd": "status"}
           {"cmd": "list"}                      (every guest's status, in a list)
           {"cmd": "target", "bytes": N}        (or "pages": N)
           {"cmd": "stats", "refresh": bool}
           {"cmd": "inhibit", "on": bool}
           {"cmd": "upgrade"}                   (hand over to a new process: see below)
           {"cmd": "stats-interval", "seconds": S}  (every guest unless "guest")
           {"cmd": "events"}                    (then a stream of event lines)
           {"cmd": "add-guest", "guest": NAME, "path": PATH}   (multi-guest daemons)
           {"cmd": "remove-guest", "guest": NAME}
Every request but list takes "guest": NAME; it is needed when the daemon serves
several guests (then a status without it answers {"guests": {NAME: status}}).
Replies:   {"ok": true, ...} or {"ok": false, "error": "..."}
status and list replies carry the daemon's "version".

events: after its reply the connection gets one line per balloon change,
{"event": "balloon-change", "guest", "target_bytes", "actual_bytes", "time"}
(like QMP's BALLOON_CHANGE, with the target too), first one per guest with
the current values ("initial": true). The daemon checks for changes every
EVENT_POLL seconds while someone listens, and drops a listener that does not
keep up.
"""

import json
import logging
import math
import os
import socket
import time

from vhostuser.connection import Listener
from vhostuser.errors import SetupError

from .errors import BalloonError, ControlError
from .version import version

log = logging.getLogger(__name__)
MAX_REQUEST = 64 * 1024
MAX_CLIENTS = 16
EVENT_POLL = 0.25
MAX_STATS_INTERVAL = 86400.0


class ControlServer:
    """The control socket of a Daemon: JSON requests over a Unix socket,
    served on the daemon's event loop (anything with add_reader/remove_reader)."""

    def __init__(self, path, *, guests, loop, policy=None, admin=None):
        self.guests = guests  # name -> multi.Guest or manager.RemoteGuest
        self.policy = policy  # policy.PolicyLoop or None
        self.admin = admin    # add_guest_live / remove_guest_live (Daemon, Manager) or None
        self.server = loop
        try:
            self.listener = Listener.at_path(path)
        except SetupError as e:
            raise ControlError(f"control socket: {e}") from e
        self.listener.sock.setblocking(False)
        self.clients = {}
        self.listeners = {}        # fd of a client that asked for events ->
        #                            {guest name: (target_pages, actual_pages) last sent}
        self._event_timer = None
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
        self.listeners.pop(fd, None)
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
            if reply.get("ok") and reply.get("events") and fd not in self.listeners:
                self._listen(fd, reply["guests"])
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
            fn = (getattr(self, "_cmd_" + cmd.replace("-", "_"), None)
                  if isinstance(cmd, str) and cmd.isascii() else None)
            if fn is None:
                raise ValueError(f"unknown command {cmd!r}; use status, list, target, stats, "
                                 "inhibit, stats-interval, events, upgrade, add-guest or "
                                 "remove-guest")
            return {"ok": True, **fn(req)}
        except (ValueError, TypeError, BalloonError) as e:
            return {"ok": False, "error": str(e)}
        except Exception as e:  # never let a request take the daemon down
            log.exception("control request failed")
            return {"ok": False, "error": f"internal error: {e}"}

    def _cmd_upgrade(self, req):
        """Hand every session over to a new serving process started from the installed
        program: the state is written, this process exits with EXIT_UPGRADE, and the
        supervisor (or systemd, Restart=on-failure) starts the successor at once."""
        from .supervisor import EXIT_UPGRADE
        remote = [g for g in self.guests.values() if getattr(g, "remote", False)]
        missing = [g.name for g in self.guests.values()
                   if g.session is None and g not in remote]
        if missing:
            raise ValueError("no fd store keeps this daemon's sessions (run it under the "
                             "built-in supervisor, or systemd with FileDescriptorStoreMax=): "
                             "an upgrade would drop " + ", ".join(missing))
        for g in self.guests.values():
            if g in remote:
                g.forward({"cmd": "upgrade"})   # each guest's own process hands over
            else:
                g.session.checkpoint()
        log.info("upgrade: handing over to a new process")

        def leave():
            logging.shutdown()
            os._exit(EXIT_UPGRADE)
        self.server.call_later(0.05, leave)
        return {"upgrade": "handing over", "pid": os.getpid()}

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
        if getattr(guest, "remote", False):
            d = guest.status_dict()   # its own process answers (or a not-serving placeholder)
        else:
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
            return {"version": version(),
                    "guests": {name: self._status(g) for name, g in self.guests.items()}}
        return {"version": version(), "status": self._status(self._guest(req))}

    def _cmd_list(self, req):
        out = {"version": version(), "guests": [g.status().to_dict() for g in self.guests.values()]}
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
        if getattr(guest, "remote", False):
            out = guest.forward({"cmd": "target", "pages": pages})
            out.pop("policy", None)
        else:
            out = self._target(guest, pages)
        if self.policy is not None:
            out["policy"] = (f"the host memory policy (--policy) also sets this guest's target: "
                             f"it may replace this one at its next decision (every "
                             f"{self.policy.cfg.interval:g}s)")
        return out

    @staticmethod
    def _target(guest, pages):
        guest.device.check_target(pages)
        sent = guest.set_target(pages)
        out = {"guest": guest.name, "target_pages": pages, "notified": sent}
        if guest.device.target_limit() is None:
            out["note"] = ("the guest's RAM is not known yet (no frontend): a target larger than "
                           "it can give is lowered when its memory table arrives")
        return out

    def _cmd_stats(self, req):
        guest = self._guest(req)
        if getattr(guest, "remote", False):
            return guest.forward({"cmd": "stats", "refresh": bool(req.get("refresh"))})
        refreshed = guest.request_stats() if req.get("refresh") else False
        return {"guest": guest.name, "stats": guest.device.latest_stats,
                "time": guest.device.stats_time, "refresh_requested": refreshed}

    def _cmd_inhibit(self, req):
        on = req.get("on")
        if not isinstance(on, bool):
            raise ValueError("inhibit needs 'on': true or false")
        guest = self._guest(req)
        if getattr(guest, "remote", False):
            return guest.forward({"cmd": "inhibit", "on": on})
        guest.device.inhibited = on
        if guest.session is not None:
            guest.session.checkpoint()
        log.info("guest %s: discards %s", guest.name,
                 "inhibited: reported memory stays with QEMU" if on else "allowed again")
        return {"guest": guest.name, "inhibited": on}

    def _cmd_stats_interval(self, req):
        seconds = req.get("seconds")
        if (not isinstance(seconds, (int, float)) or isinstance(seconds, bool)
                or not math.isfinite(seconds) or not 0 <= seconds <= MAX_STATS_INTERVAL):
            raise ValueError(f"stats-interval needs 'seconds' from 0 (off) to "
                             f"{MAX_STATS_INTERVAL:g}")
        guests = [self._guest(req)] if req.get("guest") is not None else self.guests.values()
        for guest in guests:
            guest.set_stats_interval(float(seconds))
        return {"guests": [g.name for g in guests], "stats_interval": float(seconds)}

    def _cmd_events(self, req):
        guests = [self._guest(req)] if req.get("guest") is not None else self.guests.values()
        return {"events": "balloon-change", "guests": [g.name for g in guests]}

    def _cmd_add_guest(self, req):
        if self.admin is None or not hasattr(self.admin, "add_guest_live"):
            raise ValueError("guests are added through the main control socket of a "
                             "multi-guest daemon (--guest / --socket-dir), not here")
        return self.admin.add_guest_live(req.get("guest"), req.get("path"))

    def _cmd_remove_guest(self, req):
        if self.admin is None or not hasattr(self.admin, "remove_guest_live"):
            raise ValueError("guests are removed through the main control socket of a "
                             "multi-guest daemon (--guest / --socket-dir), not here")
        name = req.get("guest")
        if not isinstance(name, str):
            raise ValueError("remove-guest needs \"guest\": NAME")
        return self.admin.remove_guest_live(name)

    # ---- events ------------------------------------------------------------

    def _listen(self, fd, names):
        self.listeners[fd] = {name: None for name in names}
        self._check_events(fd, initial=True)
        if self._event_timer is None and self.listeners:
            self._event_timer = self.server.call_later(EVENT_POLL, self._poll_events)

    def _check_events(self, fd, initial=False):
        """Send listener fd an event for each of its guests whose balloon changed."""
        seen = self.listeners[fd]
        for name in list(seen):
            guest = self.guests.get(name)
            if guest is None:        # removed at run time
                del seen[name]
                continue
            if getattr(guest, "remote", False):
                st = guest.status()
                if st.process.get("unit") in ("unreachable", "waiting"):
                    continue          # no process (restarting, or no frontend yet): no news
                now = (st.device.target_pages, st.device.actual_pages)
            else:
                now = (guest.device.target_pages, guest.device.actual)
            if seen[name] == now:
                continue
            seen[name] = now
            ev = {"event": "balloon-change", "guest": name, "target_bytes": now[0] << 12,
                  "actual_bytes": now[1] << 12, "time": time.time()}
            if initial:
                ev["initial"] = True
            line = json.dumps(ev).encode() + b"\n"
            try:
                sent = self.clients[fd][0].send(line)
            except OSError:
                sent = -1
            if sent != len(line):     # a full socket buffer: the listener does not keep up
                self._drop(fd)
                return

    def _poll_events(self):
        self._event_timer = None
        for fd in list(self.listeners):
            self._check_events(fd)
        if self.listeners:
            self._event_timer = self.server.call_later(EVENT_POLL, self._poll_events)

    def close(self):
        if self._event_timer is not None:
            self.server.cancel(self._event_timer)
            self._event_timer = None
        for fd in list(self.clients):
            self._drop(fd)
        self.server.remove_reader(self.listener.fileno())
        self.listener.close()


def stream(path, req, timeout=10.0):
    """Client side of events: send the request, then yield each event until the
    daemon closes the connection. A refusal is yielded as is ({"ok": false, ...})."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(json.dumps(req).encode() + b"\n")
        f = s.makefile("rb")
        first = f.readline()
        try:
            reply = json.loads(first)
        except ValueError as e:
            raise ControlError(f"daemon at {path} sent a malformed reply") from e
        if not reply.get("ok"):
            yield reply
            return
        s.settimeout(None)
        for line in f:
            try:
                yield json.loads(line)
            except ValueError as e:
                raise ControlError(f"daemon at {path} sent a malformed event") from e
    except OSError as e:
        raise ControlError(f"cannot talk to the daemon at {path}: {e.strerror or e}") from e
    finally:
        s.close()


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
