/*
 * discard.h - give guest memory back to the host (vhost-user-balloon).
 *
 * Small, pure helpers: callers pass pointers and lengths, get status codes.
 * Nothing here allocates memory or keeps global state.
 *
 * vub_discard_segs() takes a chain's segments (struct vu_seg, as the C
 * ring pop writes them; inflate's page runs are packed the same way) and
 * a region table (struct vu_region, sorted by gpa, each region with its
 * own discard mode).  For every device-writable segment it splits at
 * region ends, trims each piece inward to whole pages of its region (on
 * the file offset for PUNCH_HOLE, on the host address for the madvise
 * modes; never outward) and discards it.  A segment any byte of which is
 * outside every region is skipped whole.  It returns to the caller at
 * each out-of-range segment and each failed range (an event), and the
 * caller calls again to resume.  The pure-Python twin is
 * balloon_device.discard.twin.discard_segs; keep both in step.
 */
#ifndef VUB_DISCARD_H
#define VUB_DISCARD_H

#include <stdint.h>

#include "vu_types.h"

enum {
    VUB_PUNCH_HOLE = 0,   /* fallocate(PUNCH_HOLE | KEEP_SIZE) on fd        */
    VUB_REMOVE     = 1,   /* madvise(MADV_REMOVE) on hva                    */
    VUB_DONTNEED   = 2,   /* madvise(MADV_DONTNEED) on hva                  */
    VUB_FREE       = 3,   /* madvise(MADV_FREE) on hva                      */
};

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
    uint64_t ev_gpa;                /* OUT_OF_RANGE: first byte outside
                                       guest memory (the segment's addr
                                       if it runs past 2^64);
                                       FAILED: trimmed range: gpa,     */
    uint64_t ev_len;                /*   length,                       */
    uint64_t ev_offset;             /*   file offset                   */
};

enum {
    VUB_SEGS_DONE = 0,          /* every segment handled                  */
    VUB_SEGS_OUT_OF_RANGE = 1,  /* segs[ev_seg] skipped; call again       */
    VUB_SEGS_FAILED = 2,        /* one range failed (ev_*); call again    */
    VUB_SEGS_EARG = -1,         /* bad region table or cursor; nothing
                                   done                                   */
};

/* Handle segs[t->seg..nsegs) (resuming inside segs[t->seg] after
 * t->seg_done bytes) until done or the next event; see above.  Regions
 * must be sorted by gpa without overlap; each one's gpa+size, hva+size
 * and file_offset+size must fit in 64 bits, its page size must be a power
 * of two and its mode one of VUB_PUNCH_HOLE..VUB_FREE (else
 * VUB_SEGS_EARG). */
int vub_discard_segs(const struct vu_region *regs, uint32_t nregs,
                     const struct vu_seg *segs, uint32_t nsegs,
                     struct vub_totals *t);

/* Benchmark reference: punch `count` holes of `piece` bytes each, one
 * fallocate per piece, starting at `offset`.  0 or -errno of the first
 * failure; *done = pieces completed. */
int vub_punch_loop(int fd, uint64_t offset, uint64_t piece, uint64_t count,
                   uint64_t *done);

#endif
