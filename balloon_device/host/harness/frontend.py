"""The socketpair test frontend connected to one guest of an in-process Daemon
(tests and the fairness benchmark)."""

from vhostuser.testing.frontend import SocketFrontend


def guest_frontend(daemon, name):
    """vhostuser.testing.frontend.SocketFrontend connected to guest `name`."""
    g = daemon.guests[name]
    fe = SocketFrontend(g.server, g.socket_path, daemon.loop)
    fe.guest = g
    return fe
