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

#endif
