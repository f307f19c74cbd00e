/*
 * discard.h - give guest memory back to the host (vhost-user-balloon).
 *
 * Small, pure helpers: callers pass pointers and lengths, get status codes.
 * Nothing here allocates memory or keeps global state.
 */
#ifndef VUB_DISCARD_H
#define VUB_DISCARD_H

#include <stdint.h>

/* One range to discard.  `offset` is the file offset (used by PUNCH_HOLE),
 * `hva` the address of the same bytes in this process (used by the madvise
 * modes).  The caller has already trimmed both to whole backing pages. */
struct vub_range {
    int32_t  fd;
    uint32_t pad;
    uint64_t offset;
    uint64_t hva;
    uint64_t len;
};

enum {
    VUB_PUNCH_HOLE = 0,   /* fallocate(PUNCH_HOLE | KEEP_SIZE) on fd        */
    VUB_REMOVE     = 1,   /* madvise(MADV_REMOVE) on hva                    */
    VUB_DONTNEED   = 2,   /* madvise(MADV_DONTNEED) on hva                  */
    VUB_FREE       = 3,   /* madvise(MADV_FREE) on hva                      */
};

/* Discard r[0..n) in order with `mode`.  Zero-length ranges are no-ops.
 * Stops at the first failing range: returns 0 if every range succeeded,
 * else -errno of the failing range; *done (if not NULL) is the number of
 * ranges completed, i.e. the index of the failing one on error.
 * Returns -EINVAL (done = 0) for an unknown mode. */
int vub_discard(const struct vub_range *r, uint32_t n, int mode,
                uint32_t *done);

/* Align [start, start+len) inward to `page` (a power of two).
 * Returns 0 and sets *out_start and *out_len if at least one whole page
 * remains, 1 if nothing remains (then *out_len = 0, *out_start = start),
 * -EINVAL if page is not a power of two or the end start+len does not
 * fit in 64 bits (an end of exactly 2^64 is refused too). */
int vub_trim(uint64_t start, uint64_t len, uint64_t page,
             uint64_t *out_start, uint64_t *out_len);

/* Benchmark reference: punch `count` holes of `piece` bytes each, one
 * fallocate per piece, starting at `offset`.  0 or -errno of the first
 * failure; *done = pieces completed. */
int vub_punch_loop(int fd, uint64_t offset, uint64_t piece, uint64_t count,
                   uint64_t *done);

/* ---- whole reporting chains --------------------------------------------
 *
 * vub_discard_segs() does, for a chain's segments, what MemoryTable.split
 * + DiscardEngine.discard do piece by piece in Python: split every
 * device-writable segment at region ends, trim each piece inward to the
 * region's page size (on the file offset for PUNCH_HOLE, on the host
 * address for the madvise modes) and discard it.  A segment any byte of
 * which is outside every region is skipped whole (nothing of it is
 * discarded).  The Python twin is balloon_device.discard.discard_segs_py;
 * keep both in step.
 */

/* One region of guest memory, as the discard engine needs it. */
struct vub_region {
    uint64_t gpa;
    uint64_t size;
    uint64_t hva;           /* host address of gpa in this process */
    uint64_t file_offset;   /* offset of gpa in fd's file */
    int32_t  fd;
    uint32_t page_size;     /* backing page size, a power of two */
};

/* Same layout as vhostuser's struct vu_seg (a popped chain's buffers). */
struct vub_seg {
    uint64_t addr;
    uint32_t len;
    uint32_t flags;         /* VUB_SEG_WRITE: device-writable */
};

#define VUB_SEG_WRITE 1u

/* Totals and cursor.  The caller zeroes it once per chain; the counters
 * accumulate over resumed calls.  seg/seg_done is where the next call
 * resumes (segment index, bytes of that segment already handled). */
struct vub_totals {
    uint64_t reported;              /* bytes of writable segments      */
    uint64_t discarded;             /* bytes released                  */
    uint64_t skipped_unaligned;     /* bytes trimmed away              */
    uint64_t skipped_out_of_range;  /* bytes of out-of-range segments  */
    uint64_t failed;                /* bytes whose discard failed      */
    uint32_t nsegs;                 /* writable segments seen          */
    uint32_t ranges;                /* ranges handed to system calls   */
    uint32_t seg;                   /* cursor: next segment            */
    uint32_t first_errno;           /* 0, or errno of the first failure */
    uint64_t seg_done;              /* cursor: bytes of segs[seg] done */
    uint32_t first_err_seg;         /* segment of the first failure    */
    /* the event that made the call return VUB_SEGS_OUT_OF_RANGE or
     * VUB_SEGS_FAILED: */
    uint32_t ev_seg;                /* its segment index               */
    uint32_t ev_region;             /* FAILED: region index            */
    int32_t  ev_errno;              /* FAILED: errno                   */
    uint64_t ev_gpa;                /* FAILED: trimmed range: gpa,     */
    uint64_t ev_len;                /*   length,                       */
    uint64_t ev_offset;             /*   file offset                   */
};

enum {
    VUB_SEGS_DONE = 0,          /* every segment handled                  */
    VUB_SEGS_OUT_OF_RANGE = 1,  /* segs[ev_seg] skipped; call again       */
    VUB_SEGS_FAILED = 2,        /* one range failed (ev_*); call again    */
    VUB_SEGS_EARG = -1,         /* bad mode, region table or cursor;
                                   nothing done                           */
};

/* Handle segs[t->seg..nsegs) (resuming inside segs[t->seg] after
 * t->seg_done bytes) until done or the next event; see above.  regs must
 * not overlap in gpa; each region's gpa+size, hva+size and
 * file_offset+size must fit in 64 bits and its page size must be a power
 * of two (else VUB_SEGS_EARG). */
int vub_discard_segs(const struct vub_region *regs, uint32_t nregs,
                     const struct vub_seg *segs, uint32_t nsegs, int mode,
                     struct vub_totals *t);

#endif
