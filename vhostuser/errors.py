"""Exception hierarchy of the vhost-user layer."""


class VhostUserError(Exception):
    """Base class of every error raised by the vhostuser package."""


class ConnectionClosed(VhostUserError):
    """The peer closed the socket (at a message boundary or inside one)."""


class ProtocolError(VhostUserError):
    """The frontend broke the protocol; the connection must be dropped."""


class RequestError(VhostUserError):
    """One request was invalid; it gets an error reply, the session goes on."""


class GuestMemoryError(RequestError):
    """An address or range is not (wholly) inside the guest memory table."""


class VringError(VhostUserError):
    """A virtqueue holds something a correct driver never writes."""


class SetupError(VhostUserError):
    """The backend cannot start (socket path, permissions, options)."""
