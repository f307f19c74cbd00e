/* Split virtqueue hot path (device side).  See vring.h. */
#include <stddef.h>
#include <stdint.h>

#include "vring.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "vring.c assumes a little-endian host (virtio 1.0 rings are little-endian)"
#endif

/* Guest memory may be written concurrently by the driver: every load of a
 * guest-written field goes through a volatile access so that the compiler
 * reads it exactly once, into a local that is then validated.  Indirect
 * tables have no alignment guarantee, hence the aligned(1) type. */
typedef uint64_t __attribute__((aligned(1), may_alias)) vu_u64_una;

static inline uint64_t ld64_una(uint64_t hva)
{
    return *(const volatile vu_u64_una *)(uintptr_t)hva;
}

static inline uint16_t ld16(uint64_t hva)
{
    return *(const volatile uint16_t *)(uintptr_t)hva;
}

static inline void st16(uint64_t hva, uint16_t v)
{
    *(volatile uint16_t *)(uintptr_t)hva = v;
}

static inline void st32(uint64_t hva, uint32_t v)
{
    *(volatile uint32_t *)(uintptr_t)hva = v;
}

static inline uint16_t load_avail_idx(uint64_t avail_hva)
{
    return __atomic_load_n((const uint16_t *)(uintptr_t)(avail_hva + 2),
                           __ATOMIC_RELAXED);
}

static inline int qsize_ok(uint32_t qsize)
{
    return qsize >= 1 && qsize <= VU_MAX_QSIZE && (qsize & (qsize - 1)) == 0;
}

int vu_translate(const struct vu_region *r, uint32_t n, uint64_t gpa,
                 uint64_t len, uint64_t *hva)
{
    int64_t i = vu_region_find(r, n, gpa);
    uint64_t off;

    if (i < 0)
        return -1;
    off = gpa - r[i].gpa;
    if (len > r[i].size - off)
        return -1;
    *hva = r[i].hva + off;
    return 0;
}

int vu_range_ok(const struct vu_region *r, uint32_t n, uint64_t gpa,
                uint64_t len)
{
    if (len > UINT64_MAX - gpa)
        return 0;
    for (;;) {
        int64_t i = vu_region_find(r, n, gpa);
        uint64_t room;

        if (i < 0)
            return 0;
        room = r[i].size - (gpa - r[i].gpa);
        if (len <= room)
            return 1;
        /* The range ends at or below UINT64_MAX, so this cannot wrap. */
        len -= room;
        gpa += room;
    }
}

struct walk {
    const struct vu_region *r;
    uint32_t n;
    struct vu_seg *out;
    uint32_t max_out;
    uint32_t nout;
    int seen_write;
};

static int add_buf(struct walk *w, uint64_t addr, uint32_t len,
                   uint16_t flags)
{
    if (len == 0)
        return VU_E_BUF_EMPTY;
    if (!vu_range_ok(w->r, w->n, addr, len))
        return VU_E_BUF_ADDR;
    if (flags & VU_DESC_F_WRITE)
        w->seen_write = 1;
    else if (w->seen_write)
        return VU_E_ORDER;
    if (w->nout >= w->max_out)
        return VU_E_FULL;
    w->out[w->nout].addr = addr;
    w->out[w->nout].len = len;
    w->out[w->nout].flags = (flags & VU_DESC_F_WRITE) ? VU_SEG_WRITE : 0;
    w->nout++;
    return VU_OK;
}

static int walk_indirect(struct walk *w, uint64_t addr, uint32_t len)
{
    uint64_t tbl;
    uint32_t cnt, i = 0, count = 0;

    if (len == 0 || len % 16 != 0 || len / 16 > VU_MAX_INDIRECT)
        return VU_E_INDIRECT_LEN;
    if (vu_translate(w->r, w->n, addr, len, &tbl) != 0)
        return VU_E_INDIRECT_ADDR;
    cnt = len / 16;
    for (;;) {
        uint64_t d = tbl + 16ull * i;
        uint64_t baddr, hi;
        uint32_t blen;
        uint16_t flags, next;
        int rc;

        if (++count > cnt)
            return VU_E_LOOP;
        baddr = ld64_una(d);
        hi = ld64_una(d + 8);
        blen = (uint32_t)hi;
        flags = (uint16_t)(hi >> 32);
        next = (uint16_t)(hi >> 48);
        if (flags & VU_DESC_F_INDIRECT)
            return VU_E_NESTED;
        rc = add_buf(w, baddr, blen, flags);
        if (rc != VU_OK)
            return rc;
        if (!(flags & VU_DESC_F_NEXT))
            return VU_OK;
        if (next >= cnt)
            return VU_E_NEXT;
        i = next;
    }
}

static int walk_chain(struct walk *w, uint64_t desc_hva, uint32_t qsize,
                      uint16_t head)
{
    uint32_t i = head, count = 0;

    for (;;) {
        uint64_t d = desc_hva + 16ull * i;
        uint64_t addr, hi;
        uint32_t len;
        uint16_t flags, next;
        int rc;

        if (++count > qsize)
            return VU_E_LOOP;
        addr = ld64_una(d);
        hi = ld64_una(d + 8);
        len = (uint32_t)hi;
        flags = (uint16_t)(hi >> 32);
        next = (uint16_t)(hi >> 48);
        if (flags & VU_DESC_F_INDIRECT) {
            /* Zero or more direct descriptors, then one indirect one
             * (without F_NEXT) ends the chain; its F_WRITE is ignored. */
            if (flags & VU_DESC_F_NEXT)
                return VU_E_INDIRECT_NEXT;
            return walk_indirect(w, addr, len);
        }
        rc = add_buf(w, addr, len, flags);
        if (rc != VU_OK)
            return rc;
        if (!(flags & VU_DESC_F_NEXT))
            return VU_OK;
        if (next >= qsize)
            return VU_E_NEXT;
        i = next;
    }
}

int vu_pop(const struct vu_region *r, uint32_t n, uint64_t desc_hva,
           uint64_t avail_hva, uint32_t qsize, uint16_t *last_avail,
           uint16_t *head, struct vu_seg *out, uint32_t max_out,
           uint32_t *nout)
{
    struct walk w;
    uint16_t la, aidx, pending, h;
    int rc;

    *nout = 0;
    if (!qsize_ok(qsize))
        return VU_E_ARG;
    la = *last_avail;
    aidx = load_avail_idx(avail_hva);
    pending = (uint16_t)(aidx - la);
    if (pending == 0)
        return VU_EMPTY;
    if (pending > qsize)
        return VU_E_AVAIL_IDX;
    /* Ring entry and descriptors are read after the index. */
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    h = ld16(avail_hva + 4 + 2ull * (la & (qsize - 1)));
    *head = h;
    if (h >= qsize)
        return VU_E_HEAD;
    *last_avail = (uint16_t)(la + 1);

    w.r = r;
    w.n = n;
    w.out = out;
    w.max_out = max_out;
    w.nout = 0;
    w.seen_write = 0;
    rc = walk_chain(&w, desc_hva, qsize, h);
    if (rc == VU_OK)
        *nout = w.nout;
    return rc;
}

int vu_push(uint64_t used_hva, uint32_t qsize, uint16_t *used_idx,
            uint32_t id, uint32_t len)
{
    uint16_t u;
    uint64_t e;

    if (!qsize_ok(qsize))
        return VU_E_ARG;
    if (id >= qsize)
        return VU_E_HEAD;
    u = *used_idx;
    e = used_hva + 4 + 8ull * (u & (qsize - 1));
    st32(e, id);
    st32(e + 4, len);
    u = (uint16_t)(u + 1);
    /* The element is visible before the index that publishes it. */
    __atomic_store_n((uint16_t *)(uintptr_t)(used_hva + 2), u,
                     __ATOMIC_RELEASE);
    *used_idx = u;
    return VU_OK;
}

int vu_push_n(uint64_t used_hva, uint32_t qsize, uint16_t *used_idx,
              const struct vu_used_elem *elems, uint32_t n)
{
    uint16_t u;
    uint32_t k;

    if (!qsize_ok(qsize))
        return VU_E_ARG;
    for (k = 0; k < n; k++)
        if (elems[k].id >= qsize)
            return VU_E_HEAD;
    if (n == 0)
        return VU_OK;
    u = *used_idx;
    for (k = 0; k < n; k++) {
        uint64_t e = used_hva + 4 + 8ull * ((uint16_t)(u + k) & (qsize - 1));
        st32(e, elems[k].id);
        st32(e + 4, elems[k].len);
    }
    u = (uint16_t)(u + n);
    __atomic_store_n((uint16_t *)(uintptr_t)(used_hva + 2), u,
                     __ATOMIC_RELEASE);
    *used_idx = u;
    return VU_OK;
}

int vu_need_signal(uint64_t avail_hva, uint64_t used_hva, uint32_t qsize,
                   int event_idx, uint16_t old_used, uint16_t new_used)
{
    (void)used_hva;
    if (!qsize_ok(qsize))
        return VU_E_ARG;
    if (old_used == new_used)
        return 0;
    /* Full barrier: our used idx store must be visible before we read
     * what the driver wants, or both sides may miss each other. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (event_idx) {
        uint16_t ev = ld16(avail_hva + 4 + 2ull * qsize);
        return (uint16_t)(new_used - ev - 1) < (uint16_t)(new_used - old_used);
    }
    return !(ld16(avail_hva) & VU_AVAIL_F_NO_INTERRUPT);
}

int vu_set_avail_event(uint64_t used_hva, uint32_t qsize, uint16_t val)
{
    if (!qsize_ok(qsize))
        return VU_E_ARG;
    st16(used_hva + 4 + 8ull * qsize, val);
    return VU_OK;
}

int vu_arm(uint64_t avail_hva, uint64_t used_hva, uint32_t qsize,
           uint16_t last_avail)
{
    if (!qsize_ok(qsize))
        return VU_E_ARG;
    st16(used_hva + 4 + 8ull * qsize, last_avail);
    /* Full barrier: avail_event store before the avail idx load, else a
     * kick may be lost (driver reads the old event, we read the old idx). */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return load_avail_idx(avail_hva) != last_avail;
}

uint16_t vu_avail_idx(uint64_t avail_hva)
{
    return __atomic_load_n((const uint16_t *)(uintptr_t)(avail_hva + 2),
                           __ATOMIC_ACQUIRE);
}
