/* How the AVX2 one-token paths read a weight matrix from DRAM; shared with
 * bench/diagnostics/decode_standins.c, whose read4 stand-in reads the same way without the arithmetic. */
#ifndef MOEPLAN_STREAM_ACCESS_H
#define MOEPLAN_STREAM_ACCESS_H

/* Software prefetch this far ahead of the row being read, with the non-temporal hint since each weight byte
 * is read once per token (measured: K = 1024 rows went from 9 to about 16 GB/s on two AMD Zen 3 cores;
 * 512-4096 bytes and the T0 hint were within that machine's noise) */
#define PREFETCH_BYTES 1024
/* One token: each thread reads its share of the rows as this many far-apart streams (see stream_rows_avx2 in
 * gemv.c; 8 measured no better than 4, 2 about as good within the noise) */
#define STREAMS 4

#endif
