#!/usr/bin/env bash
# Create (or update) the project's virtual environment on a CPU machine.
# Sourced by scripts/test.sh and scripts/quickstart.sh; VENV overrides the location.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q -r requirements-test.txt -r requirements-eval.txt -r requirements-train.txt -e .
