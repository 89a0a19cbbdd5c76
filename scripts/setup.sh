#!/usr/bin/env bash
# Create .venv and install moeplan into it (torch pinned to 2.13.0). Quick when nothing changed.
# Usage: scripts/setup.sh [test]   ("test" also installs the test tools)
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-}
py=${PYTHON:-}
if [ -z "$py" ]; then
  for cand in python3.11 python3 python; do command -v "$cand" >/dev/null 2>&1 && { py=$cand; break; }; done
fi
stamp=.venv/.moeplan-setup
want="$(sha256sum pyproject.toml | cut -c1-16) $extras"
hash_only="${want% *}"
if [ -x .venv/bin/moeplan ] && [ -f "$stamp" ]; then
  # a set-up with the test tools also serves a plain one
  if grep -qxF "$want" "$stamp" || { [ -z "$extras" ] && grep -qxF "$hash_only test" "$stamp"; }; then
    exit 0
  fi
fi
echo "setting up .venv (first run takes a few minutes)..." >&2
[ -x .venv/bin/python ] || "$py" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >&2
# torch alone first, pinned: letting pip choose would pull a multi-GB CUDA build on a CPU-only host.
.venv/bin/python -m pip install -q "torch==2.13.0" >&2
if [ "$extras" = "test" ]; then spec=".[test]"; else spec="."; fi
.venv/bin/python -m pip install -q -e "$spec" >&2
echo "$want" >> "$stamp"
