/* How the AVX2 one-token paths read a weight matrix from DRAM; shared with
 * bench/diagnostics/decode_standins.c, whose read4 stand-in reads the same way without the arithmetic. */
#ifndef MOEPLAN_STREAM_ACCESS_H
#define MOEPLAN_STREAM_ACCESS_H

/* Software prefetch this far ahead of the row being read, with the non-temporal hint since each weight byte
 * is read once per token (measured: K = 1024 rows went from 9 to about 16 GB/s on two AMD Zen 3 cores;
 * 512-4096 bytes and the T0 hint were within that machine's noise) */
#define PREFETCH_BYTES 1024
/* One token: each thread reads its share of the rows as this many far-apart streams (see stream_rows in
 * gemv.c; 8 measured no better than 4, 2 about as good within the noise) */
#define STREAMS 4

#include <stdint.h>

/* One thread's share of `total` rows (thread t of `threads`): the contiguous rows [lo, hi), cut into
 * STREAMS segments of `segment` rows that are read side by side, one row of each at a time. */
typedef struct {
    int64_t lo, hi, segment;
} StreamShare;

static inline StreamShare stream_share(int64_t total, int64_t threads, int64_t t) {
    StreamShare s = {total * t / threads, total * (t + 1) / threads, 0};
    s.segment = (s.hi - s.lo + STREAMS - 1) / STREAMS;
    return s;
}

/* The rows read at `step` (0 .. segment - 1): one from each segment that still has one; returns how many
 * (STREAMS but at the end of the share). */
static inline int stream_rows_at(const StreamShare *s, int64_t step, int64_t *rows) {
    int n = 0;
    for (int i = 0; i < STREAMS && s->lo + i * s->segment + step < s->hi; i++) rows[n++] = s->lo + i * s->segment + step;
    return n;
}

#endif
