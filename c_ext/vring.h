/* Split virtqueue hot path for the vhost-user backend (device side).
 *
 * Rules: pure functions over guest memory that the caller has mapped;
 * pointers, lengths and indices in, status codes out; no allocation, no
 * globals.  Every host address (hva) of a ring passed in must have been
 * checked by the caller to cover the whole ring (desc 16*qsize bytes,
 * avail 6+2*qsize, used 6+8*qsize); everything *inside* guest memory is
 * treated as hostile.  Guest-written fields are read exactly once and the
 * copy is validated (no time-of-check/time-of-use).
 *
 * The Python twin (vhostuser/vring_py.py) implements the same functions
 * with the same return codes; keep both in step.
 */
#ifndef VHOSTUSER_VRING_H
#define VHOSTUSER_VRING_H

#include <stdint.h>

#include "vu_types.h"   /* struct vu_region, struct vu_seg, vu_region_find() */

/* One used-ring element, for vu_push_n(). */
struct vu_used_elem {
    uint32_t id;
    uint32_t len;
};

#define VU_DESC_F_NEXT 1u
#define VU_DESC_F_WRITE 2u
#define VU_DESC_F_INDIRECT 4u
#define VU_AVAIL_F_NO_INTERRUPT 1u

#define VU_MAX_QSIZE 32768u
/* Largest indirect table accepted, in descriptors. */
#define VU_MAX_INDIRECT 32768u

/* Return codes.  0 and 1 are normal.  The "ring" errors leave
 * *last_avail untouched (the ring is broken: stop the queue); the "chain"
 * errors have consumed the avail entry and set *head, so the caller
 * completes that head with length 0 and goes on. */
enum {
    VU_OK = 0,                /* popped a chain */
    VU_EMPTY = 1,             /* nothing available */
    /* ring errors */
    VU_E_ARG = -1,            /* qsize not a power of two in 1..32768 */
    VU_E_AVAIL_IDX = -2,      /* avail idx is more than qsize ahead */
    VU_E_HEAD = -3,           /* head index >= qsize */
    /* chain errors */
    VU_E_LOOP = -10,          /* chain longer than its table: a loop */
    VU_E_NEXT = -11,          /* next index outside the table */
    VU_E_NESTED = -12,        /* indirect descriptor inside an indirect table */
    VU_E_INDIRECT_NEXT = -13, /* indirect descriptor with F_NEXT */
    VU_E_INDIRECT_LEN = -14,  /* indirect len 0, not a multiple of 16, too big */
    VU_E_INDIRECT_ADDR = -15, /* indirect table not inside one memory region */
    VU_E_BUF_ADDR = -16,      /* buffer not inside guest memory */
    VU_E_BUF_EMPTY = -17,     /* buffer of length 0 */
    VU_E_ORDER = -18,         /* device-readable buffer after a writable one */
    VU_E_FULL = -19,          /* more buffers than the output array holds */
};

/* 0 and *hva set if [gpa, gpa+len) lies inside one region, else -1. */
int vu_translate(const struct vu_region *r, uint32_t n, uint64_t gpa,
                 uint64_t len, uint64_t *hva);

/* 1 if every byte of [gpa, gpa+len) is inside some region (possibly
 * several gpa-adjacent ones), else 0.  len 0: gpa must be in a region. */
int vu_range_ok(const struct vu_region *r, uint32_t n, uint64_t gpa,
                uint64_t len);

/* Pop one chain.  See the return codes above. */
int vu_pop(const struct vu_region *r, uint32_t n, uint64_t desc_hva,
           uint64_t avail_hva, uint32_t qsize, uint16_t *last_avail,
           uint16_t *head, struct vu_seg *out, uint32_t max_out,
           uint32_t *nout);

/* Write one used element and publish the used index (release).
 * 0, VU_E_ARG (bad qsize) or VU_E_HEAD (id >= qsize; nothing written). */
int vu_push(uint64_t used_hva, uint32_t qsize, uint16_t *used_idx,
            uint32_t id, uint32_t len);

/* Write n used elements, then publish the used index once.  Checks every
 * id first: on VU_E_HEAD nothing is written. */
int vu_push_n(uint64_t used_hva, uint32_t qsize, uint16_t *used_idx,
              const struct vu_used_elem *elems, uint32_t n);

/* 1 if the driver wants an interrupt for the used entries
 * [old_used, new_used), else 0 (always 0 when old_used == new_used);
 * VU_E_ARG for a bad qsize.
 * Issues a full barrier first (the used idx store must be visible before
 * the driver's used_event / flags are read). */
int vu_need_signal(uint64_t avail_hva, uint64_t used_hva, uint32_t qsize,
                   int event_idx, uint16_t old_used, uint16_t new_used);

/* Write avail_event (used->ring[qsize]) for EVENT_IDX.  0 or VU_E_ARG. */
int vu_set_avail_event(uint64_t used_hva, uint32_t qsize, uint16_t val);

/* EVENT_IDX re-arm after the queue was found empty: write
 * avail_event = last_avail, full barrier, re-read avail idx.
 * Returns 1 if buffers arrived meanwhile (pop again), 0 if still empty,
 * VU_E_ARG for a bad qsize. */
int vu_arm(uint64_t avail_hva, uint64_t used_hva, uint32_t qsize,
           uint16_t last_avail);

/* Current avail idx (acquire). */
uint16_t vu_avail_idx(uint64_t avail_hva);

#endif
