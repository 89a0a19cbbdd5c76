#!/usr/bin/env bash
# The AVX2 one-token kernel (gemv.c) of a base revision against the working tree's, side by side: each build
# times moe_token on a layer's two experts and gemv_one on a [2I, H] projection against a plain read of the
# same bytes, the builds alternating, on Mixtral-8x7B-sized experts and on the benchmark model's, in 2 MB and
# 4 KB pages. Prints a Markdown table of medians of the rounds.
#   bash bench/diagnostics/kernel_ab/run.sh [ROUNDS] [BASE_REVISION] > bench/results/kernel_ab_avx2.md
set -euo pipefail
cd "$(dirname "$0")"
rounds=${1:-3}
base=${2:-725d231}
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
src=../../../runtime/kernels
mkdir "$build/base"
for f in gemv.c bf16.h hsum.h stream_access.h; do  # a header the base did not have yet is left out
  if git cat-file -e "$base:runtime/kernels/$f" 2>/dev/null; then git show "$base:runtime/kernels/$f" > "$build/base/$f"; fi
done
gcc -O3 -fopenmp -mavx2 -mfma -I"$build/base" -o "$build/base.bin" harness.c "$build/base/gemv.c" -lm
gcc -O3 -fopenmp -mavx2 -mfma -I"$src" -o "$build/new.bin" harness.c "$src/gemv.c" -lm
echo "# One-token kernel (AVX2): $base against the working tree ($(git rev-parse --short HEAD)$(git diff --quiet -- "$src" || echo ' + changes'))"
echo
echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ); machine: $(hostname), $(nproc) logical CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "- command: \`bash bench/diagnostics/kernel_ab/run.sh $rounds $base\`; 2 threads; per run 30 rounds of: moe_token on 2 experts,"
echo "  a plain read of 2 other experts' bytes, gemv_one on another expert's [2I, H] rows, a read of as many bytes;"
echo "  the two builds alternate, $rounds runs each; cells: median over runs of each run's median GB/s and kernel / read"
echo
echo "| dtype | expert (hidden x intermediate) | pages | moe_token $base: GB/s | / read | working tree: GB/s | / read | [2I, H] projection $base: GB/s | / read | working tree: GB/s | / read |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
median() { sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
for shape in "4096 14336" "1024 3584"; do
  for dtype in 1 0; do
    for huge in 1 0; do
      : > "$build/base.txt"; : > "$build/new.txt"
      for r in $(seq "$rounds"); do
        for variant in base new; do
          "$build/$variant.bin" "$dtype" 30 $shape "$huge" 2 >> "$build/$variant.txt"
        done
      done
      name=$([ "$dtype" = 1 ] && echo bf16 || echo fp32); pages=$([ "$huge" = 1 ] && echo "2 MB" || echo "4 KB")
      row="| $name | ${shape/ / x } | $pages"
      for variant in base new; do
        row="$row | $(cut -d' ' -f1 "$build/$variant.txt" | median) | $(cut -d' ' -f2 "$build/$variant.txt" | median)"
      done
      for variant in base new; do
        row="$row | $(cut -d' ' -f3 "$build/$variant.txt" | median) | $(cut -d' ' -f4 "$build/$variant.txt" | median)"
      done
      echo "$row |"
    done
  done
done
