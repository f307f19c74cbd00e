"""The small interface a device implements to be served by the backend.

The protocol handler owns the socket, the memory table and the queues;
the device sees only features, config bytes, queues and the memory table.
"""

import abc

VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30
VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_RING_F_INDIRECT_DESC = 1 << 28
VIRTIO_RING_F_EVENT_IDX = 1 << 29


class DeviceContext(abc.ABC):
    """What the backend gives a device (Device.attach): a config interrupt
    and the event loop's timers.  The device never sees the socket."""

    @abc.abstractmethod
    def notify_config_change(self):
        """Send BACKEND_CONFIG_CHANGE_MSG so that the guest re-reads config.
        True if it was sent (a driver and a backend channel are there)."""

    @abc.abstractmethod
    def call_later(self, delay, callback):
        """Run callback() once after delay seconds; returns a handle."""

    @abc.abstractmethod
    def cancel(self, handle):
        """Cancel a call_later() handle (None is ignored)."""

    def state_changed(self):
        """Persist the device's state now (write-ahead), if the host keeps it."""


class Device(abc.ABC):
    """A virtio device served over vhost-user."""

    #: virtio device id (informational)
    device_id = 0

    @abc.abstractmethod
    def features(self):
        """Virtio feature bits the device offers (without bit 30)."""

    @abc.abstractmethod
    def queue_sizes(self):
        """Maximum size of each queue, in queue-index order."""

    def config_size(self):
        return 0

    def read_config(self, offset, size):
        """Bytes of config space; raise ValueError for a bad range."""
        raise ValueError("device has no config space")

    def write_config(self, offset, data):
        raise ValueError("device has no writable config space")

    def set_features(self, features):
        """The driver's accepted features (subset of features())."""

    def attach(self, ctx):
        """Called once with the DeviceContext."""

    def check_memory(self, regions):
        """A proposed memory table (a list of regions), before it is installed.
        Raise to refuse it: the frontend gets an error reply and the table in
        place stays as it was."""

    def memory_changed(self, memory):
        """The memory table changed (after check_memory accepted it)."""

    def queue_started(self, queue):
        """queue is enabled and ready to pop."""

    def queue_stopping(self, queue):
        """SET_VRING_ENABLE(0) or GET_VRING_BASE is about to stop queue: give back
        chains held on purpose (queue.unpop), so that the frontend's next start
        offers them again (QEMU stops and restarts every queue when the VM is paused
        and resumed)."""

    def queue_stopped(self, queue):
        """queue was stopped (GET_VRING_BASE, disable, reset)."""

    @abc.abstractmethod
    def handle_queue(self, queue, memory):
        """Process available chains of queue after a kick (or a poll)."""

    def reset(self):
        """Device reset (RESET_DEVICE, RESET_OWNER, disconnect)."""

    def save_state(self):
        """Device state (plain data, JSON-able) a successor process needs to go on."""
        return None

    def restore_state(self, state):
        """Take back what save_state() returned, before the session is restored."""

    def timers(self):
        """List of (fd, callback) the event loop should also watch."""
        return []
