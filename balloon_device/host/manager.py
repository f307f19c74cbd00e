"""The manager unit of a supervised multi-guest daemon: control socket, metrics and
policy, without guest memory.

Under the built-in supervisor every guest of a multi-guest daemon has its own
serving process (supervisor.py), with its own control socket (CONTROL.NAME,
config.guest_control_path). The manager owns the daemon's main control socket
and reaches each guest through that guest's control socket with a RemoteGuest,
which offers what ControlServer, MetricsServer and PolicyLoop use of multi.Guest.
A guest whose process is restarting (or hung) answers nothing: it shows as not
connected, with "unit": "unreachable" in its process info, and the manager
carries on. A guest whose frontend has not come yet has no process at all (the
supervisor starts it when its QEMU connects): its control socket does not exist and it
shows as waiting for its frontend ("unit": "waiting"), which is no error. Guests added or removed at run time (ctl add-guest / remove-guest)
are passed on to the supervisor with a notification from the manager's pid.
"""

import json
import logging
import os
import time

from . import notify
from .config import check_new_guest, guest_control_path
from .control import request
from .errors import ConfigError, ControlError
from .services import HostServices
from .status import GuestStatus

log = logging.getLogger("vhost-user-balloon.manager")

REQUEST_TIMEOUT = 2.0     # a guest's process that does not answer within this is unreachable
RETRY_AFTER = 5.0         # ... and, if it timed out, is not asked again for this long (a hung
#                           process is killed by the unit watchdog; a busy host is no reason
#                           to stall the manager on it at every request)


class GuestUnreachable(ControlError):
    pass


class GuestWaiting(GuestUnreachable):
    """The guest has no serving process yet: no frontend connected to its socket."""


class RemoteGuest:
    """One guest served by its own process, seen through its control socket."""

    remote = True

    def __init__(self, name, socket_path, control_path, timeout=REQUEST_TIMEOUT):
        self.name = name
        self.socket_path = socket_path
        self.control_path = control_path
        self.timeout = timeout
        self.session = None
        self._down_until = 0.0
        self._error = None

    def forward(self, req):
        """Send req (for this guest) to its process; its reply without "ok".
        A refusal raises ValueError with the process's message, no answer GuestUnreachable."""
        now = time.monotonic()
        if now < self._down_until:
            raise GuestUnreachable(self._unreachable(self._error))
        try:
            reply = request(self.control_path, dict(req, guest=self.name), timeout=self.timeout)
        except ControlError as e:
            self._error = str(e)
            if isinstance(e.__cause__, FileNotFoundError):   # no process: no frontend yet
                raise GuestWaiting(f"guest {self.name}: no frontend has connected to "
                                   f"{self.socket_path} yet; its serving process starts when "
                                   "one does") from e
            if isinstance(e.__cause__, TimeoutError):   # hung: do not wait on it again soon
                self._down_until = time.monotonic() + RETRY_AFTER
            raise GuestUnreachable(self._unreachable(e)) from e
        self._down_until = 0.0
        if not reply.get("ok"):
            self._error = reply.get("error", "refused")
            raise ValueError(self._error)
        reply.pop("ok", None)
        return reply

    def _unreachable(self, why):
        return (f"guest {self.name}: its serving process does not answer (restarting or "
                f"hung; the supervisor restarts it): {why}")

    def placeholder(self, error):
        if isinstance(error, GuestWaiting):
            return GuestStatus(name=self.name, socket=self.socket_path, process={
                "pid": None, "unit": "waiting", "restarts": 0})
        return GuestStatus(name=self.name, socket=self.socket_path, process={
            "pid": None, "unit": "unreachable", "error": str(error)})

    def status(self, rings=False):
        try:
            if rings:
                return GuestStatus.from_dict(self.forward({"cmd": "status"})["status"])
            return GuestStatus.from_dict(self.forward({"cmd": "list"})["guests"][0])
        except (GuestUnreachable, ValueError, KeyError, IndexError, TypeError) as e:
            return self.placeholder(e)

    def status_dict(self):
        """ctl status of this guest, as its own process answers it (rings included)."""
        try:
            return self.forward({"cmd": "status"})["status"]
        except GuestUnreachable as e:
            return self.placeholder(e).to_dict()

    def set_target(self, pages):
        return self.forward({"cmd": "target", "pages": pages}).get("notified", False)

    def request_stats(self):
        return self.forward({"cmd": "stats", "refresh": True}).get("refresh_requested", False)

    def set_stats_interval(self, seconds):
        self.forward({"cmd": "stats-interval", "seconds": seconds})

    def failed(self):
        log.warning("guest %s: a request to its serving process failed: %s", self.name,
                    self._error or "see above")


def unit_guests(cfg, env=None):
    """The guests the manager starts with: the supervisor's current list (it changes with
    add-guest / remove-guest and survives a restart of the manager), else the options."""
    text = (os.environ if env is None else env).get("VUB_UNIT_GUESTS")
    if text:
        try:
            return [(str(n), str(p)) for n, p in json.loads(text)]
        except (ValueError, TypeError):
            log.warning("ignoring a malformed VUB_UNIT_GUESTS")
    return [(n, p) for n, p in cfg.guests]


class Manager(HostServices):
    """The manager unit: RemoteGuests, control socket, metrics, policy."""

    def __init__(self, cfg, loop=None, host_reader=None, env=None):
        from vhostuser.loop import EventLoop
        self.cfg = cfg
        self.loop = loop or EventLoop()
        self._own_loop = loop is None
        self.guests = {}
        self.control = self.metrics = self.policy = None
        self._watchdog = None
        for name, path in unit_guests(cfg, env):
            self.guests[name] = RemoteGuest(name, path, guest_control_path(cfg.control_path, name))
        try:
            if cfg.policy is not None:
                from .policy import PolicyLoop
                self.policy = PolicyLoop(cfg.policy, self.guests, self.loop, host_reader)
                self.policy.open_sources()
            from .control import ControlServer
            self.control = ControlServer(cfg.control_path, guests=self.guests, loop=self.loop,
                                         policy=self.policy, admin=self)
            if cfg.metrics_port is not None:
                from .metrics import MetricsServer
                self.metrics = MetricsServer(self.guests, cfg.metrics_address,
                                             cfg.metrics_port, self.policy)
        except BaseException:
            self.close()
            raise

    # ---- ctl add-guest / remove-guest -----------------------------------------------

    def add_guest_live(self, name, path):
        check_new_guest(name, path, self.guests)
        if not notify.notify(f"VUB_ADD_GUEST={name}\nVUB_GUEST_PATH={path}"):
            raise ConfigError("cannot reach the supervisor to start the guest's process")
        ctl = guest_control_path(self.cfg.control_path, name)
        self.guests[name] = RemoteGuest(name, path, ctl)
        log.info("guest %s added on %s (its own serving process)", name, path)
        return {"guest": name, "socket": path, "control_socket": ctl, "added": True}

    def remove_guest_live(self, name):
        if name not in self.guests:
            raise ConfigError(f"no guest {name!r} here; this daemon serves "
                              f"{', '.join(self.guests) or 'no guest'}")
        if not notify.notify(f"VUB_REMOVE_GUEST={name}"):
            raise ConfigError("cannot reach the supervisor to stop the guest's process")
        del self.guests[name]
        log.info("guest %s removed: its serving process stops, its session ends", name)
        return {"guest": name, "removed": True}

    # ---- life ----------------------------------------------------------------------

    def describe(self):
        return f"managing {len(self.guests)} guest(s): {', '.join(self.guests)}"

    def start(self):
        if self.policy is not None:
            self.policy.start()
        self._announce()

    def close(self):
        self._close_services()
        self._close_loop()
