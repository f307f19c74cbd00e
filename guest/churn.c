/* churn TOTAL_MIB CHUNK_MIB ROUNDS
 * Each round maps TOTAL_MIB MiB in chunks of CHUNK_MIB MiB, touches every
 * page of every chunk, then unmaps all chunks.  Prints
 * "VUB-MARK churn-round round=R elapsed_ms=T" per round and
 * "VUB-MARK churn-done total_mib=.. chunk_mib=.. rounds=.. elapsed_ms=.. mib_per_s=..". */
#include "common.h"

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s TOTAL_MIB CHUNK_MIB ROUNDS\n", argv[0]);
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    unsigned long total = vub_parse_ul(argv[1], "TOTAL_MIB");
    unsigned long chunk = vub_parse_ul(argv[2], "CHUNK_MIB");
    unsigned long rounds = vub_parse_ul(argv[3], "ROUNDS");
    if (chunk == 0 || chunk > total) {
        fprintf(stderr, "CHUNK_MIB must be in 1..TOTAL_MIB\n");
        return 2;
    }
    long ps = vub_page_size();
    size_t nchunks = (total + chunk - 1) / chunk;
    unsigned char **chunks = calloc(nchunks, sizeof *chunks);
    if (!chunks)
        return 3;

    double t0 = vub_now();
    for (unsigned long r = 1; r <= rounds; r++) {
        double tr = vub_now();
        for (size_t c = 0; c < nchunks; c++) {
            size_t len = chunk * MIB;
            chunks[c] = vub_map(len);
            if (!chunks[c]) {
                vub_mark("churn-failed", "round=%lu chunk=%zu errno=%d", r, c, errno);
                return 3;
            }
            for (size_t off = 0; off < len; off += (size_t)ps)
                chunks[c][off] = (unsigned char)(r | 1);
        }
        for (size_t c = 0; c < nchunks; c++)
            munmap(chunks[c], chunk * MIB);
        vub_mark("churn-round", "round=%lu elapsed_ms=%.0f", r, (vub_now() - tr) * 1000.0);
    }
    double el = vub_now() - t0;
    vub_mark("churn-done", "total_mib=%lu chunk_mib=%lu rounds=%lu elapsed_ms=%.0f mib_per_s=%.1f",
             total, chunk, rounds, el * 1000.0, el > 0 ? (double)(total * rounds) / el : 0.0);
    free(chunks);
    return 0;
}
