#!/usr/bin/env bash
# The GPU checks, as one script for a CUDA machine: made to fit 12 of a 15-minute device lease on one
# H100 (BUDGET_S, 660 s by default, split into steps that each have their own time limit, and a step is
# skipped, saying so, when less time is left than it needs):
#  0. the Python environment: the project's .venv where there is one, else the image's python3 (it holds
#     torch and transformers) with the carried wheels of bench/device_wheels.sh (optuna) installed into
#     a temporary folder (mktemp -d); the versions it runs with go to $OUT/environment.txt;
#  1. host syncs of CUDA decode tokens under torch.cuda.set_sync_debug_mode("warn"), beside the seam's
#     own count (one per MoE layer per pass), for a plan with hits, CPU misses, promotions and prefetch
#     and for one whose misses are double-buffered transfers: bench/cuda_syncs.py;
#  2. the conformance tests with accelerator cuda:0 (tokens equal plain transformers) and the recorded
#     schedule test;
#  3. moeplan profile --quick on the GPU host (PCIe next to the published PCIe 5.0 rates, host sync round
#     trip, usable memory);
#  4. a Mixtral-shaped bf16 checkpoint with random weights (LAYERS layers), built into a temporary folder
#     and marked complete only once fully saved;
#  5. decode tokens/s measured and predicted for the tuned plan, the seed paper's configuration, all
#     experts on the CPU and copy-on-miss, with routing replayed from a synthetic trace
#     (bench/mixtral_replay.py).
# Results go to $OUT (or bench/results/device) as text.
#
#   bash bench/device_wheels.sh           # here, first: the wheels the device image lacks, into .whl/
#   bash bench/device_check.sh            # on the GPU machine (device run with carry [".whl"])
#   DRY_RUN=1 bash bench/device_check.sh  # anywhere: prints each step, its budget and command; runs nothing
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out=${OUT:-bench/results/device}
layers=${LAYERS:-4}
vram_budget=${VRAM_BUDGET:-3GB}  # about the share of a 4-layer model's experts a 12 GB card holds of all 32
trials=${TRIALS:-60}
budget=${BUDGET_S:-660}
dry=${DRY_RUN:-0}
start=$SECONDS
mkdir -p "$out"
# The interpreter: PYTHON, else the project's .venv, else the image's python3 with the carried wheels (the
# device machines reach no package registry, so scripts/setup.sh cannot run there).
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
if [ "$dry" != 1 ] && [ -d .whl ] && ! "$py" -c 'import optuna' 2>/dev/null; then
  site=$(mktemp -d)
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    > "$out/wheels.log" 2>&1 || { echo "installing the carried wheels failed:"; tail -5 "$out/wheels.log"; exit 1; }
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi

# step NAME SECONDS COMMAND...: run COMMAND under `timeout SECONDS` if the budget leaves that much
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((budget - (SECONDS - start)))
  echo "== $name (limit ${limit}s, ${left}s of the budget left)"
  if [ "$dry" = 1 ]; then
    printf '   would run:'
    printf ' %q' "$@"
    printf '\n'
    if [ "$1" = bash ] && [ "${2:-}" = -c ]; then
      declare -f "$3" | sed 's/^/     /'
    fi
    return 0
  fi
  if [ "$left" -lt "$limit" ]; then
    echo "   skipped: the budget has ${left}s left" | tee -a "$out/skipped.txt"
    return 0
  fi
  local t0=$SECONDS rc=0
  timeout "$limit" "$@" || rc=$?
  echo "   $name: exit $rc after $((SECONDS - t0))s" | tee -a "$out/steps.txt"
  return "$rc"
}

environment() {
  "$py" - <<'PY' 2>&1 | tee "$out/environment.txt"
import importlib, sys
import torch
print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "transformers", "tokenizers", "safetensors", "optuna", "yaml", "psutil", "pynvml", "pytest"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "present"))
    except ImportError as exc:
        print(name, "MISSING:", exc)
print("cuda", torch.version.cuda, "available", torch.cuda.is_available())
sys.exit(0 if torch.cuda.is_available() else 1)
PY
  local rc=${PIPESTATUS[0]}
  nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
  return "$rc"
}

conformance() {
  # the schedule tests that drive the recording stand-in with its streams drifted apart, or check the
  # memory accounting, run on the CPU whatever the machine: the CPU suite has them, they are left out here
  MOEPLAN_TEST_ACCELERATOR=cuda:0 "$py" -m pytest -q -x tests/runtime/test_conformance.py \
    tests/runtime/test_cuda_schedule.py -k "not lags and not removing and not promises" 2>&1 | tail -5 \
    | tee "$out/conformance.txt"
}

profile() {
  "$py" -m planner.cli profile --quick --model mixtral --out "$out/profile.yaml" 2>&1 | tail -3
  # PCIe 5.0 x16: 32 GT/s x 16 lanes x 128/130 / 8 = 63.0 GB/s per direction (the specification)
  { echo "published PCIe 5.0 x16: 63.0 GB/s per direction (32 GT/s x 16 lanes x 128/130 / 8)"
    grep -E '^ *(name|memory_bytes|free_memory_bytes|pcie_gen|pcie_width|h2d_|d2h_|host_sync_s)' "$out/profile.yaml"
  } | tee "$out/pcie.txt"
}

checkpoint() {
  "$py" bench/mixtral_replay.py --layers "$layers" --profile "$out/profile.yaml" --build-only
}

replay() {
  "$py" bench/mixtral_replay.py --layers "$layers" --profile "$out/profile.yaml" --vram-budget "$vram_budget" \
    --trials "$trials" --out "$out" 2>&1 | tail -30 | tee "$out/replay.txt"
}

export py out layers vram_budget trials
export -f environment conformance profile checkpoint replay
step "0. environment" 60 bash -c environment || { echo "no CUDA environment: stopping"; exit 1; }
step "1. host syncs under set_sync_debug_mode('warn')" 60 "$py" bench/cuda_syncs.py --out "$out" --tokens 16
step "2. conformance on cuda:0, recorded schedule" 150 bash -c conformance
step "3. profile --quick" 90 bash -c profile
step "4. Mixtral-shaped checkpoint, $layers layers" 120 bash -c checkpoint
step "5. tuned vs all-CPU vs seed paper, replayed routing" 170 bash -c replay
echo "== done in $((SECONDS - start))s of ${budget}s; results in $out"
