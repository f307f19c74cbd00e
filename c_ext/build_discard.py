"""cffi build script for the discard engine (out-of-line API mode).

setup.py lists "c_ext/build_discard.py:ffi" in cffi_modules, so
`pip install .` / `pip install -e .` compiles balloon_device._discard_c.
For development, `python c_ext/build_discard.py` builds the extension in
place (balloon_device/_discard_c.*.so) from any working directory.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _build  # noqa: E402

MODULE, SOURCE = "balloon_device._discard_c", "discard.c"
ffi = _build.make_ffi(MODULE, ["vu_types.h", "discard.h"], SOURCE)

if __name__ == "__main__":
    _build.build_in_place(ffi, MODULE, SOURCE)
