/* Shared helpers for the static guest workload programs.
 * Output: one marker per line on stdout, "VUB-MARK <name> key=value ...". */
#ifndef VUB_COMMON_H
#define VUB_COMMON_H

#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MIB (1024UL * 1024UL)

static inline long vub_page_size(void)
{
    long ps = sysconf(_SC_PAGESIZE);
    return ps > 0 ? ps : 4096;
}

static inline double vub_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Print one marker line with a single write so it is not interleaved. */
__attribute__((format(printf, 2, 3)))
static inline void vub_mark(const char *name, const char *fmt, ...)
{
    char buf[512];
    int n = snprintf(buf, sizeof buf, "VUB-MARK %s", name);
    if (fmt && *fmt && n < (int)sizeof buf - 2) {
        buf[n++] = ' ';
        va_list ap;
        va_start(ap, fmt);
        int m = vsnprintf(buf + n, sizeof buf - (size_t)n - 1, fmt, ap);
        va_end(ap);
        if (m > 0)
            n += m;
        if (n > (int)sizeof buf - 2)
            n = (int)sizeof buf - 2;
    }
    buf[n++] = '\n';
    fflush(stdout);
    ssize_t off = 0;
    while (off < n) {
        ssize_t w = write(STDOUT_FILENO, buf + off, (size_t)(n - off));
        if (w < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        off += w;
    }
}

static inline unsigned long vub_parse_ul(const char *s, const char *what)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 10);
    if (errno || end == s || *end) {
        fprintf(stderr, "bad %s: %s\n", what, s);
        exit(2);
    }
    return v;
}

/* Anonymous private mapping; MAP_POPULATE is not used so that the caller
 * touches (and so faults in) every page itself. */
static inline void *vub_map(size_t len)
{
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        return NULL;
    }
    return p;
}

static inline void vub_sleep_ms(unsigned long ms)
{
    struct timespec ts = { (time_t)(ms / 1000), (long)(ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

#endif
