#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtualenv in .venv with lowrank and its test extras.
# On a machine without an NVIDIA GPU, install the CPU build of torch first: a bare `torch`
# requirement would otherwise pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        .venv/bin/python -m pip install --quiet torch
    else
        .venv/bin/python -m pip install --quiet torch==2.13.0
    fi
fi
.venv/bin/python -m pip install --quiet -e ".[dev${EXTRAS:+,$EXTRAS}]"
