/* vu_types.h - the records shared by the C modules and Python.
 *
 * vring.c (vhostuser._vring_c) writes struct vu_seg records when it pops a
 * chain; discard.c (balloon_device._discard_c) reads them back.  Both look
 * up regions in the same struct vu_region table with vu_region_find().
 * Python packs vu_seg with vhostuser.vring.SEG ("<QII").  The build
 * scripts feed this file (minus preprocessor lines and static asserts) to
 * cffi, so the layouts are written here only.
 */
#ifndef VU_TYPES_H
#define VU_TYPES_H

#include <stddef.h>
#include <stdint.h>

/* One region of guest memory.  Arrays of regions are sorted by gpa and do
 * not overlap.  The virtqueue reads gpa, size and hva; the discard engine
 * also the file offset, fd, backing page size and discard mode. */
struct vu_region {
    uint64_t gpa;
    uint64_t size;
    uint64_t hva;           /* host address of gpa in this process */
    uint64_t file_offset;   /* offset of gpa in fd's file */
    int32_t  fd;
    uint32_t page_size;     /* backing page size, a power of two */
    uint32_t mode;          /* discard mode (VUB_PUNCH_HOLE ...) */
    uint32_t pad;
};

/* One buffer of a popped chain (guest-physical). */
struct vu_seg {
    uint64_t addr;
    uint32_t len;
    uint32_t flags;         /* VU_SEG_WRITE: device-writable */
};

#define VU_SEG_WRITE 1

/* ---- C only below: the build scripts stop reading here ---- */

_Static_assert(sizeof(struct vu_seg) == 16, "vu_seg is <QII");
_Static_assert(offsetof(struct vu_seg, len) == 8, "vu_seg.len");
_Static_assert(offsetof(struct vu_seg, flags) == 12, "vu_seg.flags");
_Static_assert(sizeof(struct vu_region) == 48, "vu_region size");
_Static_assert(offsetof(struct vu_region, hva) == 16, "vu_region.hva");
_Static_assert(offsetof(struct vu_region, fd) == 32, "vu_region.fd");
_Static_assert(offsetof(struct vu_region, mode) == 40, "vu_region.mode");

/* Index of the region holding gpa, or -1 (binary search: the last region
 * whose start is <= gpa). */
static inline int64_t vu_region_find(const struct vu_region *r, uint32_t n,
                                     uint64_t gpa)
{
    uint32_t lo = 0, hi = n;

    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (r[mid].gpa <= gpa)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0)
        return -1;
    if (gpa - r[lo - 1].gpa >= r[lo - 1].size)
        return -1;
    return (int64_t)lo - 1;
}

#endif
