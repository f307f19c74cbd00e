"""One switch picks C or the pure-Python twins (vhostuser.implementation),
and the C records have the layout Python packs (c_ext/vu_types.h)."""

import os
import subprocess
import sys

from balloon_device.discard import DiscardEngine
from balloon_device.discard.engine import c_module as discard_c
from vhostuser import implementation
from vhostuser.vring import SEG, VirtQueue, c_module as vring_c

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_select_is_read_when_objects_are_built():
    before = implementation.use_c()
    for c in (True, False):
        with implementation.selected(c):
            vq, engine = VirtQueue(0, 8), DiscardEngine()
        assert vq.use_c is c and engine.use_c is c
        assert implementation.use_c() is before


def test_environment_variable_selects_the_twins():
    code = ("from vhostuser.vring import VirtQueue; "
            "from balloon_device.discard import DiscardEngine; "
            "print(VirtQueue(0, 8).use_c, DiscardEngine().use_c)")
    for value, want in (("1", "False False"), ("", "True True")):
        env = dict(os.environ, VUB_PURE_PYTHON=value, PYTHONPATH=ROOT)
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == want.split()


def test_both_modules_share_the_record_layouts():
    for mod in (vring_c(), discard_c()):
        ffi = mod.ffi
        assert ffi.sizeof("struct vu_seg") == SEG.size == 16
        assert [ffi.offsetof("struct vu_seg", f) for f in ("addr", "len", "flags")] == [0, 8, 12]
        assert ffi.sizeof("struct vu_region") == 48
        assert mod.lib.VU_SEG_WRITE == 1
    seg = discard_c().ffi.from_buffer("struct vu_seg[]", SEG.pack(0x1234, 77, 1))[0]
    assert (seg.addr, seg.len, seg.flags) == (0x1234, 77, 1)
