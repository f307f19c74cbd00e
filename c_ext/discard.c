/*
 * discard.c - see discard.h.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <sys/mman.h>

#include "discard.h"

#ifndef FALLOC_FL_KEEP_SIZE
#define FALLOC_FL_KEEP_SIZE 0x01
#endif
#ifndef FALLOC_FL_PUNCH_HOLE
#define FALLOC_FL_PUNCH_HOLE 0x02
#endif
#ifndef MADV_REMOVE
#define MADV_REMOVE 9
#endif
#ifndef MADV_FREE
#define MADV_FREE 8
#endif

static int punch(int fd, uint64_t offset, uint64_t len)
{
    int rc;

    if (offset > INT64_MAX || len > INT64_MAX - offset)
        return -EINVAL;
    do {
        rc = fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                       (off_t)offset, (off_t)len);
    } while (rc != 0 && errno == EINTR);
    return rc == 0 ? 0 : -errno;
}

static int advise(uint64_t hva, uint64_t len, int advice)
{
    int rc;

    if (hva > UINTPTR_MAX || len > UINTPTR_MAX - hva)
        return -EINVAL;
    do {
        rc = madvise((void *)(uintptr_t)hva, (size_t)len, advice);
    } while (rc != 0 && errno == EINTR);
    return rc == 0 ? 0 : -errno;
}

int vub_discard(const struct vub_range *r, uint32_t n, int mode,
                uint32_t *done)
{
    uint32_t i;
    int rc = 0;

    if (done)
        *done = 0;
    if (mode < VUB_PUNCH_HOLE || mode > VUB_FREE)
        return -EINVAL;
    for (i = 0; i < n; i++) {
        if (r[i].len == 0)
            continue;
        switch (mode) {
        case VUB_PUNCH_HOLE:
            rc = punch(r[i].fd, r[i].offset, r[i].len);
            break;
        case VUB_REMOVE:
            rc = advise(r[i].hva, r[i].len, MADV_REMOVE);
            break;
        case VUB_DONTNEED:
            rc = advise(r[i].hva, r[i].len, MADV_DONTNEED);
            break;
        default:
            rc = advise(r[i].hva, r[i].len, MADV_FREE);
            break;
        }
        if (rc != 0)
            break;
    }
    if (done)
        *done = i;
    return rc;
}

int vub_trim(uint64_t start, uint64_t len, uint64_t page,
             uint64_t *out_start, uint64_t *out_len)
{
    uint64_t lo, hi, mask;

    *out_start = start;
    *out_len = 0;
    if (page == 0 || (page & (page - 1)) != 0)
        return -EINVAL;
    if (len > UINT64_MAX - start)
        return -EINVAL;
    mask = page - 1;
    if (start > UINT64_MAX - mask)     /* rounding up would overflow */
        return 1;
    lo = (start + mask) & ~mask;
    hi = (start + len) & ~mask;
    if (hi <= lo)
        return 1;
    *out_start = lo;
    *out_len = hi - lo;
    return 0;
}

int vub_punch_loop(int fd, uint64_t offset, uint64_t piece, uint64_t count,
                   uint64_t *done)
{
    uint64_t i;
    int rc = 0;

    for (i = 0; i < count; i++) {
        rc = punch(fd, offset + i * piece, piece);
        if (rc != 0)
            break;
    }
    if (done)
        *done = i;
    return rc;
}
