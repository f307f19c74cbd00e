/* integrity SIZE_MIB ROUNDS [SLEEP_MS]
 *
 * Checks that the guest's memory keeps its contents while free page
 * reporting (and a balloon device) is at work.
 *
 * A "held" buffer of SIZE_MIB/4 MiB is filled once with a pattern and
 * verified every round.  Each round also maps a "churn" buffer of SIZE_MIB
 * MiB, fills every page with a pattern that depends on the page index, the
 * word index and the round, sleeps a little, verifies it, unmaps it and
 * sleeps SLEEP_MS (default 3000 ms, longer than the kernel's 2 s reporting
 * delay) so that the freed pages get reported before the next round
 * re-allocates them.
 *
 * Prints "VUB-MARK integrity-round round=R bad_bytes=N held_bad_bytes=M" per
 * round and "VUB-MARK integrity-done rounds=R bad_bytes=N" at the end; exits
 * 1 if any byte was corrupted, 2 on usage errors, 3 when memory is short. */
#include "common.h"

static inline uint64_t pattern(uint64_t page, uint64_t word, uint64_t round)
{
    uint64_t x = (page << 20) ^ (word << 3) ^ (round * 0x9E3779B97F4A7C15ULL);
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 29;
    return x | 1; /* never zero: a discarded (zeroed) page always mismatches */
}

static void fill(uint64_t *buf, size_t len, uint64_t round, long ps)
{
    size_t words_per_page = (size_t)ps / sizeof(uint64_t);
    size_t pages = len / (size_t)ps;
    for (size_t pg = 0; pg < pages; pg++) {
        uint64_t *w = buf + pg * words_per_page;
        for (size_t i = 0; i < words_per_page; i++)
            w[i] = pattern(pg, i, round);
    }
}

/* Returns the number of corrupted bytes. */
static unsigned long verify(const uint64_t *buf, size_t len, uint64_t round, long ps,
                            unsigned long *bad_pages)
{
    size_t words_per_page = (size_t)ps / sizeof(uint64_t);
    size_t pages = len / (size_t)ps;
    unsigned long bad = 0;
    for (size_t pg = 0; pg < pages; pg++) {
        const uint64_t *w = buf + pg * words_per_page;
        unsigned long page_bad = 0;
        for (size_t i = 0; i < words_per_page; i++) {
            uint64_t want = pattern(pg, i, round);
            if (w[i] != want) {
                const unsigned char *a = (const unsigned char *)&w[i];
                const unsigned char *b = (const unsigned char *)&want;
                for (int k = 0; k < 8; k++)
                    page_bad += a[k] != b[k];
            }
        }
        if (page_bad) {
            if (*bad_pages < 5)
                vub_mark("integrity-badpage", "page=%zu bad_bytes=%lu round=%lu",
                         pg, page_bad, (unsigned long)round);
            (*bad_pages)++;
            bad += page_bad;
        }
    }
    return bad;
}

int main(int argc, char **argv)
{
    if (argc < 3 || argc > 4) {
        fprintf(stderr, "usage: %s SIZE_MIB ROUNDS [SLEEP_MS]\n", argv[0]);
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    unsigned long mib = vub_parse_ul(argv[1], "SIZE_MIB");
    unsigned long rounds = vub_parse_ul(argv[2], "ROUNDS");
    unsigned long sleep_ms = argc > 3 ? vub_parse_ul(argv[3], "SLEEP_MS") : 3000;
    long ps = vub_page_size();
    size_t len = mib * MIB;
    size_t held_len = (mib / 4) * MIB;
    unsigned long total_bad = 0, bad_pages = 0;
    double t0 = vub_now();

    uint64_t *held = NULL;
    if (held_len) {
        held = vub_map(held_len);
        if (!held)
            return 3;
        fill(held, held_len, 0xABCDEFULL, ps);
    }

    for (unsigned long r = 1; r <= rounds; r++) {
        unsigned long round_bad = 0, held_bad = 0;
        uint64_t *buf = len ? vub_map(len) : NULL;
        if (len && !buf) {
            vub_mark("integrity-failed", "round=%lu reason=mmap errno=%d", r, errno);
            return 3;
        }
        if (len) {
            fill(buf, len, r, ps);
            vub_sleep_ms(200);
            round_bad = verify(buf, len, r, ps, &bad_pages);
            munmap(buf, len);
        }
        if (held)
            held_bad = verify(held, held_len, 0xABCDEFULL, ps, &bad_pages);
        total_bad += round_bad + held_bad;
        vub_mark("integrity-round", "round=%lu bad_bytes=%lu held_bad_bytes=%lu",
                 r, round_bad, held_bad);
        if (r < rounds)
            vub_sleep_ms(sleep_ms);
    }
    if (held)
        munmap(held, held_len);
    vub_mark("integrity-done", "rounds=%lu mib=%lu bad_bytes=%lu bad_pages=%lu elapsed_ms=%.0f",
             rounds, mib, total_bad, bad_pages, (vub_now() - t0) * 1000.0);
    return total_bad ? 1 : 0;
}
