#!/usr/bin/env bash
# The AVX2 one-token kernel with and without the four-row path for long rows (gemv.c, LONG_ROW_BYTES),
# each against a plain read of the same bytes, alternating builds, on Mixtral-8x7B-sized experts and on
# the benchmark model's, in 4 KB and 2 MB pages. Prints a Markdown table of medians of the rounds.
#   bash bench/kernel_rows_ab/run.sh [ROUNDS] > bench/results/kernel_rows_ab_avx2.md
set -euo pipefail
cd "$(dirname "$0")"
rounds=${1:-3}
build=$(mktemp -d)
src=../../runtime/kernels
gcc -O3 -fopenmp -mavx2 -mfma -I"$src" -o "$build/four" harness.c "$src/gemv.c" -lm
gcc -O3 -fopenmp -mavx2 -mfma -I"$src" -DLONG_ROW_BYTES=1000000000 -o "$build/one" harness.c "$src/gemv.c" -lm
echo "# One-token expert kernel (AVX2): long rows four at a time against one at a time"
echo
echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ); machine: $(hostname), $(nproc) logical CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "- command: \`bash bench/kernel_rows_ab/run.sh $rounds\`; 2 threads, 2 experts per call, 30 calls per run,"
echo "  each call followed by a plain read of two other experts' bytes; the two builds alternate, $rounds rounds;"
echo "  cells: median over rounds of each run's median kernel GB/s and kernel / read"
echo
echo "| dtype | expert (hidden x intermediate) | pages | one row: GB/s | one row / read | four rows: GB/s | four rows / read |"
echo "|---|---|---|---|---|---|---|"
median() { sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
for shape in "4096 14336" "1024 3584"; do
  for dtype in 1 0; do
    for huge in 1 0; do
      : > "$build/one.txt"; : > "$build/four.txt"
      for r in $(seq "$rounds"); do
        for variant in one four; do
          "$build/$variant" "$dtype" 30 $shape "$huge" 2 >> "$build/$variant.txt"
        done
      done
      name=$([ "$dtype" = 1 ] && echo bf16 || echo fp32); pages=$([ "$huge" = 1 ] && echo "2 MB" || echo "4 KB")
      echo "| $name | ${shape/ / x } | $pages | $(cut -d' ' -f1 "$build/one.txt" | median) | $(cut -d' ' -f3 "$build/one.txt" | median) | $(cut -d' ' -f1 "$build/four.txt" | median) | $(cut -d' ' -f3 "$build/four.txt" | median) |"
    done
  done
done
rm -rf "$build"
