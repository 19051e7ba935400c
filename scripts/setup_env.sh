#!/usr/bin/env bash
# Create (or update) the project's virtual environment on a CPU machine.
#   bash scripts/setup_env.sh [train] [eval] [test]     # no argument: all three
# train: uniattn.train through DeepSpeed and the seed's scripts (the quick start needs only this);
# eval:  lm-eval, datasets and plotting for scripts/eval.sh (which installs it on first use);
# test:  pytest and the exact versions the test suite runs on, plus the Triton interpreter kit
#        (requirements-interpreter.txt, in $VENV/triton-interpreter: the CPU test of the GPU decode kernels).
# Run by scripts/test.sh (all), scripts/quickstart.sh (train) and scripts/eval.sh (eval); VENV overrides
# the location. A rerun with the same extras is a quick no-op check.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VENV:-.venv}
extras=("$@")
[ ${#extras[@]} -eq 0 ] && extras=(train eval test)
reqs=()
for e in "${extras[@]}"; do
  case "$e" in
    train|eval|test) reqs+=(-r "requirements-$e.txt") ;;
    *) echo "setup_env.sh: error: unknown extra '$e'; pass any of: train eval test (none: all)" >&2; exit 2 ;;
  esac
done
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build. Every later install
# names the pins again, so pip can never move them.
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q "${reqs[@]}" torch==2.13.0 transformers==5.17.0 -e .
# The interpreter kit lives apart from the environment (its numpy pin must not move the project's);
# only tests/test_triton_decode.py puts it on a subprocess's path. The marker makes a rerun a no-op.
KIT="$VENV/triton-interpreter"
if [[ " ${extras[*]} " == *" test "* ]] && [ ! -f "$KIT/.complete" ]; then
  rm -rf "$KIT"
  "$VENV/bin/python" -m pip install -q --no-deps --target "$KIT" -r requirements-interpreter.txt
  touch "$KIT/.complete"
fi
