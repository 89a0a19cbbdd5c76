#!/usr/bin/env bash
# The wheels bench/device_check.sh needs on a device machine, downloaded HERE (where the package registry
# can be reached) into .whl/ (git-ignored), to be carried with the working tree: `run` with carry [".whl"].
#
# The device machines (nvidia-h100-x1, nvidia-h200) reach no registry. Their image's python3 (3.12) holds
# torch, transformers, tokenizers, safetensors, pyyaml, psutil, nvidia-ml-py, tqdm, numpy, pytest and
# hypothesis (the tool library's device/KINDS.md lists the image), but not optuna, which `tune` needs:
# optuna and what it needs beyond the image are fetched here, at the versions the project's .venv holds,
# for CPython 3.12 on x86-64 Linux. About 6 MB.
#
#   bash bench/device_wheels.sh            # then: device run, carry [".whl"], command bash bench/device_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
pins=(optuna==5.1.0 alembic==1.20.1 sqlalchemy==2.1.9 greenlet==3.5.6 mako==1.4.3 colorlog==6.12.0)
rm -rf .whl.partial
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl.partial "${pins[@]}"
rm -rf .whl && mv .whl.partial .whl  # whole or not at all
ls -1 .whl
