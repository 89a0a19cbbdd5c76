#!/usr/bin/env bash
# The whole pipeline on the embedded model, in one command: set up .venv (first run only), measure
# this host (quick profile), tune a plan with a budget that holds a quarter of the model's experts (on
# a host without a GPU the tuner gives no cache slots: README), run it, and print the generated text,
# measured decode tokens/s and hit rate beside the plan's predictions;
# then tune the same model for an RTX 4070 box (published profile) and explain that plan.
# Usage: scripts/demo.sh ["prompt"]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
prompt=${1:-$'def read_file(path):\n    with open('}
work=.moeplan-demo
mkdir -p "$work"
moeplan=.venv/bin/moeplan
new_tokens=48
# The plan predicts what this run does: the prompt's tokens (as `run` encodes it) and the mean KV cache
# length over the decode steps.
prompt_tokens=$(.venv/bin/python -c 'import sys; from transformers import AutoTokenizer
print(len(AutoTokenizer.from_pretrained("models/tiny-moe")(sys.argv[1])["input_ids"]))' "$prompt" 2>/dev/null)
context=$((prompt_tokens + new_tokens / 2))
echo "== 1/4 moeplan profile --quick (this host)" >&2
$moeplan profile --quick --model models/tiny-moe --out "$work/profile.yaml"
echo "== 2/4 moeplan tune (a budget that holds a quarter of the experts)" >&2
$moeplan tune --model models/tiny-moe --profile "$work/profile.yaml" --expert-budget-fraction 0.25 \
  --trials 60 --context "$context" --prompt-tokens "$prompt_tokens" --out "$work/plan.yaml"
echo "== 3/4 moeplan run $work/plan.yaml" >&2
$moeplan run "$work/plan.yaml" --model models/tiny-moe --prompt "$prompt" --max-new-tokens "$new_tokens"
echo "== 4/4 the same tuning for an RTX 4070 box (published profile), and what it predicts" >&2
$moeplan tune --model models/tiny-moe --profile profiles/rtx4070.yaml --expert-budget-fraction 0.25 \
  --trials 60 --out "$work/rtx4070-plan.yaml" --no-progress
$moeplan explain "$work/rtx4070-plan.yaml" --profile profiles/rtx4070.yaml
