"""What the two cffi build scripts share (c_ext/build_vring.py, build_discard.py).

The cdefs are read from the C headers, so that every struct and prototype is
written once: comments and preprocessor lines are dropped (integer #defines
are kept), and each header is read up to its "C only below" line (static
asserts and inline helpers follow it).
"""

import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
C_ONLY = "---- C only below"
_DEFINE = re.compile(r"#define\s+(\w+)\s+(-?\d+)[uUlL]*\s*$")


def cdef_text(header):
    """The cffi declarations of c_ext/<header>."""
    with open(os.path.join(HERE, header)) as f:
        text = f.read()
    cut = text.find(C_ONLY)
    if cut >= 0:
        text = text[:text.rfind("/*", 0, cut)]
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    lines = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            m = _DEFINE.match(line.strip())
            if m:
                lines.append(f"#define {m.group(1)} {m.group(2)}")
            continue
        lines.append(line)
    return "\n".join(lines)


def make_ffi(module, headers, source, extra_args=()):
    """An FFI for `module` (dotted name) built from c_ext/<source> and
    declared by c_ext/<headers> (in order; the last one is #included)."""
    ffi = FFI()
    for h in headers:
        ffi.cdef(cdef_text(h))
    ffi.set_source(
        module,
        f'#include "{headers[-1]}"\n',
        sources=[f"c_ext/{source}"],
        include_dirs=["c_ext"],
        extra_compile_args=["-O2", "-Wall", "-Wextra", *extra_args],
    )
    return ffi


def build_in_place(ffi, module, source):
    """`python c_ext/build_x.py`: compile next to the package, keep only the .so."""
    os.chdir(ROOT)
    so = ffi.compile(tmpdir=".", verbose=False)
    stem = module.replace(".", "/")
    for junk in (f"{stem}.c", f"{stem}.o", f"c_ext/{source[:-2]}.o"):
        try:
            os.unlink(junk)
        except FileNotFoundError:
            pass
    print(os.path.relpath(so))
