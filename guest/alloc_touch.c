/* alloc_touch SIZE_MIB [HOLD_SECONDS]
 * Map SIZE_MIB MiB of anonymous memory, write a non-zero byte to every page,
 * print "VUB-MARK alloc-done mib=N elapsed_ms=T", hold it for HOLD_SECONDS
 * (default 0), then unmap it and exit ("VUB-MARK alloc-freed mib=N"). */
#include "common.h"

int main(int argc, char **argv)
{
    if (argc < 2 || argc > 3) {
        fprintf(stderr, "usage: %s SIZE_MIB [HOLD_SECONDS]\n", argv[0]);
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    unsigned long mib = vub_parse_ul(argv[1], "SIZE_MIB");
    unsigned long hold = argc > 2 ? vub_parse_ul(argv[2], "HOLD_SECONDS") : 0;
    size_t len = mib * MIB;
    long ps = vub_page_size();

    double t0 = vub_now();
    unsigned char *p = len ? vub_map(len) : NULL;
    if (len && !p) {
        vub_mark("alloc-failed", "mib=%lu errno=%d", mib, errno);
        return 1;
    }
    for (size_t off = 0; off < len; off += (size_t)ps)
        p[off] = (unsigned char)(1 + (off / (size_t)ps) % 255);
    vub_mark("alloc-done", "mib=%lu elapsed_ms=%.0f", mib, (vub_now() - t0) * 1000.0);

    if (hold) {
        vub_sleep_ms(hold * 1000UL);
        /* read back so the pages are really still in use after the hold */
        unsigned long bad = 0;
        for (size_t off = 0; off < len; off += (size_t)ps)
            if (p[off] != (unsigned char)(1 + (off / (size_t)ps) % 255))
                bad++;
        vub_mark("alloc-held", "mib=%lu seconds=%lu bad_pages=%lu", mib, hold, bad);
        if (bad) {
            munmap(p, len);
            return 1;
        }
    }
    if (len)
        munmap(p, len);
    vub_mark("alloc-freed", "mib=%lu", mib);
    return 0;
}
