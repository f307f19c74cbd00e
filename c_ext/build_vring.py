"""cffi build script for the split-virtqueue hot path (out-of-line API mode).

setup.py lists "c_ext/build_vring.py:ffi" in cffi_modules, so
`pip install .` / `pip install -e .` compiles vhostuser._vring_c.
For development, `python c_ext/build_vring.py` builds the extension in
place (vhostuser/_vring_c.*.so) from any working directory.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _build  # noqa: E402

MODULE, SOURCE = "vhostuser._vring_c", "vring.c"
ffi = _build.make_ffi(MODULE, ["vu_types.h", "vring.h"], SOURCE,
                      extra_args=["-fno-strict-aliasing"])

if __name__ == "__main__":
    _build.build_in_place(ffi, MODULE, SOURCE)
