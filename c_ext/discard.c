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

/* Trim [base, base+n) inward to whole pages (mask = page - 1): the first
 * whole page's start in *lo, the bytes of whole pages returned (0: none). */
static inline uint64_t trim(uint64_t base, uint64_t n, uint64_t mask,
                            uint64_t *lo)
{
    uint64_t hi;

    *lo = base;
    if (base > UINT64_MAX - mask)       /* rounding up would overflow */
        return 0;
    *lo = (base + mask) & ~mask;
    hi = (base + n) & ~mask;
    return hi > *lo ? hi - *lo : 0;
}

static int discard_one(uint32_t mode, int fd, uint64_t offset, uint64_t hva,
                       uint64_t len)
{
    switch (mode) {
    case VUB_PUNCH_HOLE:
        return punch(fd, offset, len);
    case VUB_REMOVE:
        return advise(hva, len, MADV_REMOVE);
    case VUB_DONTNEED:
        return advise(hva, len, MADV_DONTNEED);
    default:
        return advise(hva, len, MADV_FREE);
    }
}

/* 1 if every byte of [addr, addr+len) is in some region (len > 0), else 0
 * and *outside = the first byte that is not (addr if the range runs past
 * 2^64). */
static int covered(const struct vu_region *regs, uint32_t nregs,
                   uint64_t addr, uint64_t len, uint64_t *outside)
{
    uint64_t g = addr, rem = len, room;
    int64_t k;

    if (addr > UINT64_MAX - (len - 1)) {    /* end beyond 2^64 */
        *outside = addr;
        return 0;
    }
    while (rem > 0) {
        k = vu_region_find(regs, nregs, g);
        if (k < 0) {
            *outside = g;
            return 0;
        }
        room = regs[k].size - (g - regs[k].gpa);
        if (room >= rem)
            return 1;
        g += room;
        rem -= room;
    }
    return 1;
}

/* 0 if the region table is one vub_discard_segs() can use. */
static int check_regions(const struct vu_region *regs, uint32_t nregs)
{
    uint32_t i;

    for (i = 0; i < nregs; i++) {
        const struct vu_region *r = &regs[i];
        uint64_t page = r->page_size;

        if (page == 0 || (page & (page - 1)) != 0 || r->mode > VUB_FREE)
            return -1;
        if (i > 0 && (r->gpa < regs[i - 1].gpa ||
                      r->gpa - regs[i - 1].gpa < regs[i - 1].size))
            return -1;                               /* unsorted, overlap */
        if (r->size == 0)
            continue;
        if (r->gpa > UINT64_MAX - (r->size - 1) ||   /* gpa end <= 2^64 */
            r->hva > UINT64_MAX - r->size ||         /* hva end < 2^64 */
            r->file_offset > UINT64_MAX - r->size)   /* offset end < 2^64 */
            return -1;
    }
    return 0;
}

int vub_discard_segs(const struct vu_region *regs, uint32_t nregs,
                     const struct vu_seg *segs, uint32_t nsegs,
                     struct vub_totals *t)
{
    if (t->seg > nsegs || check_regions(regs, nregs) != 0)
        return VUB_SEGS_EARG;
    if (t->seg < nsegs && t->seg_done > segs[t->seg].len)
        return VUB_SEGS_EARG;

    for (; t->seg < nsegs; t->seg++, t->seg_done = 0) {
        const struct vu_seg *s = &segs[t->seg];
        uint64_t g, rem;

        if (!(s->flags & VU_SEG_WRITE))
            continue;
        if (t->seg_done == 0) {
            t->nsegs++;
            t->reported += s->len;
            if (s->len == 0)
                continue;
            if (!covered(regs, nregs, s->addr, s->len, &t->ev_gpa)) {
                t->skipped_out_of_range += s->len;
                t->ev_seg = t->seg;
                t->seg++;
                t->seg_done = 0;
                return VUB_SEGS_OUT_OF_RANGE;
            }
        }
        g = s->addr + t->seg_done;
        rem = s->len - t->seg_done;
        while (rem > 0) {
            int64_t k = vu_region_find(regs, nregs, g);
            const struct vu_region *r;
            uint64_t rel, n, off, hva, base, lo, m, delta;
            int rc;

            if (k < 0)             /* cannot happen: covered() said so */
                return VUB_SEGS_EARG;
            r = &regs[k];
            rel = g - r->gpa;
            n = r->size - rel;
            if (n > rem)
                n = rem;
            off = r->file_offset + rel;
            hva = r->hva + rel;
            base = r->mode == VUB_PUNCH_HOLE ? off : hva;
            m = trim(base, n, (uint64_t)r->page_size - 1, &lo);
            t->skipped_unaligned += n - m;
            g += n;
            rem -= n;
            t->seg_done += n;
            if (m == 0)
                continue;
            delta = lo - base;
            t->ranges++;
            rc = discard_one(r->mode, r->fd, off + delta, hva + delta, m);
            if (rc == 0) {
                t->discarded += m;
                continue;
            }
            t->failed += m;
            if (t->first_errno == 0) {
                t->first_errno = (uint32_t)-rc;
                t->first_err_seg = t->seg;
            }
            t->ev_seg = t->seg;
            t->ev_region = (uint32_t)k;
            t->ev_errno = -rc;
            t->ev_gpa = g - n + delta;
            t->ev_len = m;
            t->ev_offset = off + delta;
            if (rem == 0) {
                t->seg++;
                t->seg_done = 0;
            }
            return VUB_SEGS_FAILED;
        }
    }
    return VUB_SEGS_DONE;
}
