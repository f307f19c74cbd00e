"""C or pure Python: one switch for every hot path that has a twin.

The C modules (vhostuser._vring_c, balloon_device._discard_c) run by
default.  VUB_PURE_PYTHON=1 in the environment selects their pure-Python
twins instead; it is read once, at import.  The CLI (--python-hot-path) and
the tests change it with select().  A VirtQueue or discard engine reads the
switch when it is built and keeps its choice.
"""

import contextlib
import importlib
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


class Compiled:
    """A cffi module (dotted name), imported now, when its Python module is
    imported (not later, under a sandbox).  Calling it returns the module
    (.ffi, .lib) or raises ImportError saying how to build it with
    c_ext/`build_script`."""

    def __init__(self, module, build_script):
        self.name, self.build_script = module, build_script
        try:
            self._module, self._error = importlib.import_module(module), None
        except ImportError as exc:  # pragma: no cover - depends on the build
            self._module, self._error = None, exc

    def __call__(self):
        if self._module is None:
            raise ImportError(
                f"{self.name} (C) is not built: run `pip install -e .` in the project "
                f"root (or, for development, `python c_ext/{self.build_script}`); "
                f"import failed with: {self._error}")
        return self._module
