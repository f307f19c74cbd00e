"""What a daemon process and the manager unit share: the policy, control socket and
metrics they may hold, systemd's READY/WATCHDOG/STOPPING, and closing them."""

from . import notify


class HostServices:
    """Mixin: needs self.loop, self._own_loop, self.policy, self.control, self.metrics,
    self._watchdog and describe()."""

    def _announce(self):
        """Everything is listening: tell systemd, start the watchdog pings."""
        notify.notify(f"READY=1\nSTATUS={self.describe()}")
        interval = notify.watchdog_interval()
        if interval:
            self._watchdog_tick(interval)

    def _watchdog_tick(self, interval):
        notify.notify("WATCHDOG=1")
        self._watchdog = self.loop.call_later(interval, lambda: self._watchdog_tick(interval))

    def serve_forever(self):
        self.start()
        try:
            self.loop.run()
        finally:
            notify.notify("STOPPING=1")

    def _close_services(self):
        if self.policy is not None:
            self.policy.stop()
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.control is not None:
            self.control.close()
            self.control = None

    def _close_loop(self):
        self.loop.cancel(self._watchdog)
        if self._own_loop:
            self.loop.close()
            self._own_loop = False
