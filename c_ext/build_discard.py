"""cffi build script for the discard engine (out-of-line API mode).

setup.py lists "c_ext/build_discard.py:ffi" in cffi_modules, so
`pip install .` / `pip install -e .` compiles balloon_device._discard_c.
For development, `python c_ext/build_discard.py` builds the extension in
place (balloon_device/_discard_c.*.so) from any working directory.
"""

import os

from cffi import FFI

ffi = FFI()

ffi.cdef("""
struct vub_range {
    int32_t  fd;
    uint32_t pad;
    uint64_t offset;
    uint64_t hva;
    uint64_t len;
};

#define VUB_PUNCH_HOLE 0
#define VUB_REMOVE 1
#define VUB_DONTNEED 2
#define VUB_FREE 3

int vub_discard(const struct vub_range *r, uint32_t n, int mode,
                uint32_t *done);
int vub_trim(uint64_t start, uint64_t len, uint64_t page,
             uint64_t *out_start, uint64_t *out_len);
int vub_punch_loop(int fd, uint64_t offset, uint64_t piece, uint64_t count,
                   uint64_t *done);

struct vub_region {
    uint64_t gpa;
    uint64_t size;
    uint64_t hva;
    uint64_t file_offset;
    int32_t  fd;
    uint32_t page_size;
};
struct vub_seg {
    uint64_t addr;
    uint32_t len;
    uint32_t flags;
};
struct vub_totals {
    uint64_t reported;
    uint64_t discarded;
    uint64_t skipped_unaligned;
    uint64_t skipped_out_of_range;
    uint64_t failed;
    uint32_t nsegs;
    uint32_t ranges;
    uint32_t seg;
    uint32_t first_errno;
    uint64_t seg_done;
    uint32_t first_err_seg;
    uint32_t ev_seg;
    uint32_t ev_region;
    int32_t  ev_errno;
    uint64_t ev_gpa;
    uint64_t ev_len;
    uint64_t ev_offset;
};
#define VUB_SEG_WRITE 1
#define VUB_SEGS_DONE 0
#define VUB_SEGS_OUT_OF_RANGE 1
#define VUB_SEGS_FAILED 2
#define VUB_SEGS_EARG -1
int vub_discard_segs(const struct vub_region *regs, uint32_t nregs,
                     const struct vub_seg *segs, uint32_t nsegs, int mode,
                     struct vub_totals *t);
""")

ffi.set_source(
    "balloon_device._discard_c",
    '#include "discard.h"\n',
    sources=["c_ext/discard.c"],
    include_dirs=["c_ext"],
    extra_compile_args=["-O2", "-Wall", "-Wextra"],
)


if __name__ == "__main__":
    # The paths above are relative to the project root; build from there so
    # the module lands at balloon_device/_discard_c.*.so.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.chdir(root)
    so = ffi.compile(tmpdir=".", verbose=False)
    # Leave only the .so: drop the generated C source and object files.
    for junk in ("balloon_device/_discard_c.c", "balloon_device/_discard_c.o",
                 "c_ext/discard.o"):
        try:
            os.unlink(junk)
        except FileNotFoundError:
            pass
    print(os.path.relpath(so))
