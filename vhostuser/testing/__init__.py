"""Test doubles for vhost-user backends: a driver-side virtqueue over real
shared memory (driver) and a socketpair frontend (frontend).  Shared by the
tests, the benchmarks and the fuzzers; nothing in the daemon imports it."""

import fcntl
import os


def sealed_memfd(name, size=0, flags=0):
    """A memfd of `size` bytes sealed against shrinking and growing, as QEMU's
    memory-backend-memfd makes them (the daemon refuses memfds that can shrink)."""
    fd = os.memfd_create(name, flags | os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    if size:
        os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd
