"""Exception hierarchy of the host side (balloon_device.host): everything
that runs devices on a host.  Option errors reuse the device layer's
ConfigError, so one ``except BalloonError`` in the CLI catches both layers."""

from ..errors import BalloonError, ConfigError

__all__ = ["BalloonError", "ConfigError", "HostError", "ControlError",
           "MetricsError", "SandboxError"]


class HostError(BalloonError):
    """Base class of the host side's own errors."""


class ControlError(HostError):
    """The control socket could not be reached or answered with an error."""


class MetricsError(HostError):
    """The metrics endpoint cannot start."""


class SandboxError(HostError):
    """The sandbox (privilege drop, seccomp) cannot be applied."""
