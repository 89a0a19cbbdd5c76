#!/usr/bin/env bash
# The GPU checks, as one script for a CUDA machine (fits in about 10 minutes on an H200 host):
#  1. set-up, and the conformance tests with accelerator cuda:0 (tokens equal plain transformers);
#  2. moeplan profile --quick on the GPU host (PCIe, GPU expert and dense timings);
#  3. a Mixtral-shaped bf16 checkpoint with random weights (as many layers as the budget allows) and a
#     synthetic trace rescaled to its shape, tuned for a 12 GB accelerator budget (an RTX 4070's);
#  4. decode tokens/s measured and predicted for the tuned plan, the seed paper's hand configuration,
#     all experts on the CPU, and copy-on-miss, with routing replayed from the trace.
# Results go to $OUT (or bench/results/device) as text.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results/device}
mkdir -p "$out"
layers=${LAYERS:-8}
bash scripts/setup.sh test > "$out/setup.log" 2>&1 || { echo "setup failed"; tail -20 "$out/setup.log"; exit 1; }
py=.venv/bin/python
nvidia-smi > "$out/nvidia-smi.txt" 2>&1

echo "== 1. conformance on cuda:0"
MOEPLAN_TEST_ACCELERATOR=cuda:0 timeout 240 $py -m pytest tests/runtime/test_conformance.py -q 2>&1 | tail -5 | tee "$out/conformance.txt"
echo "== 1b. int8/int4 experts conformance on cuda:0 (slots, promotions, prefetch of quantized bytes)"
MOEPLAN_TEST_ACCELERATOR=cuda:0 timeout 240 $py -m pytest tests/runtime/test_quant_conformance.py -q 2>&1 | tail -5 | tee "$out/quant_conformance.txt"

echo "== 2. profile"
timeout 120 .venv/bin/moeplan profile --quick --model mixtral --out "$out/profile.yaml" 2>&1 | tail -3
grep -A12 '^accelerator:' "$out/profile.yaml" | tee "$out/pcie.txt"

echo "== 3-4. Mixtral-shaped checkpoint, tune for 12 GB, run four plans with replayed routing"
timeout 420 $py bench/mixtral_replay.py --layers "$layers" --profile "$out/profile.yaml" \
  --vram-budget 12GB --out "$out" 2>&1 | tail -30 | tee "$out/replay.txt"
