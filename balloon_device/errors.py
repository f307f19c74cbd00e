"""Exception hierarchy of the balloon layer (balloon_device package)."""


class BalloonError(Exception):
    """Base class of every error raised by the balloon_device package."""


class ConfigError(BalloonError):
    """A command-line or configuration option is invalid."""


class DiscardModeError(BalloonError):
    """The discard mode cannot free the memory backing it would be used on.

    The message names the region, says why the mode frees nothing there and
    which mode to use instead.
    """
