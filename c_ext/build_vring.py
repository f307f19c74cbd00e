"""cffi build script for the split-virtqueue hot path (out-of-line API mode).

setup.py lists "c_ext/build_vring.py:ffi" in cffi_modules, so
`pip install .` / `pip install -e .` compiles vhostuser._vring_c.
For development, `python c_ext/build_vring.py` builds the extension in
place (vhostuser/_vring_c.*.so) from any working directory.
"""

import os

from cffi import FFI

ffi = FFI()

ffi.cdef("""
struct vu_region { uint64_t gpa; uint64_t size; uint64_t hva; };
struct vu_seg { uint64_t addr; uint32_t len; uint32_t flags; };
struct vu_used_elem { uint32_t id; uint32_t len; };

#define VU_MAX_QSIZE 32768
#define VU_MAX_INDIRECT 32768

int vu_translate(const struct vu_region *r, uint32_t n, uint64_t gpa,
                 uint64_t len, uint64_t *hva);
int vu_range_ok(const struct vu_region *r, uint32_t n, uint64_t gpa,
                uint64_t len);
int vu_pop(const struct vu_region *r, uint32_t n, uint64_t desc_hva,
           uint64_t avail_hva, uint32_t qsize, uint16_t *last_avail,
           uint16_t *head, struct vu_seg *out, uint32_t max_out,
           uint32_t *nout);
int vu_push(uint64_t used_hva, uint32_t qsize, uint16_t *used_idx,
            uint32_t id, uint32_t len);
int vu_push_n(uint64_t used_hva, uint32_t qsize, uint16_t *used_idx,
              const struct vu_used_elem *elems, uint32_t n);
int vu_need_signal(uint64_t avail_hva, uint64_t used_hva, uint32_t qsize,
                   int event_idx, uint16_t old_used, uint16_t new_used);
int vu_set_avail_event(uint64_t used_hva, uint32_t qsize, uint16_t val);
int vu_arm(uint64_t avail_hva, uint64_t used_hva, uint32_t qsize,
           uint16_t last_avail);
uint16_t vu_avail_idx(uint64_t avail_hva);
""")

ffi.set_source(
    "vhostuser._vring_c",
    '#include "vring.h"\n',
    sources=["c_ext/vring.c"],
    include_dirs=["c_ext"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-fno-strict-aliasing"],
)


if __name__ == "__main__":
    # The paths above are relative to the project root; build from there so
    # the module lands at vhostuser/_vring_c.*.so.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.chdir(root)
    so = ffi.compile(tmpdir=".", verbose=False)
    # Leave only the .so: drop the generated C source and object files.
    for junk in ("vhostuser/_vring_c.c", "vhostuser/_vring_c.o",
                 "c_ext/vring.o"):
        try:
            os.unlink(junk)
        except FileNotFoundError:
            pass
    print(os.path.relpath(so))
