"""C or pure Python: one switch for every hot path that has a twin.

The C modules (vhostuser._vring_c, balloon_device._discard_c) run by
default.  VUB_PURE_PYTHON=1 in the environment selects their pure-Python
twins instead; it is read once, at import.  The CLI (--python-hot-path) and
the tests change it with select().  A VirtQueue or discard engine reads the
switch when it is built and keeps its choice.
"""

import contextlib
import os

ENV = "VUB_PURE_PYTHON"
_use_c = os.environ.get(ENV, "") != "1"


def use_c():
    """True if new objects use the C modules, False for the Python twins."""
    return _use_c


def select(c):
    """Use the C modules (True) or the pure-Python twins (False) from now on."""
    global _use_c
    _use_c = bool(c)


@contextlib.contextmanager
def selected(c):
    """select(c) inside a with block, then back to the previous choice."""
    old = _use_c
    select(c)
    try:
        yield
    finally:
        select(old)
