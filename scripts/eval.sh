#!/usr/bin/env bash
# Evaluate one checkpoint (plain HF or UniAttn) on the repo's offline lm-eval tasks:
#   scripts/eval.sh [--limit N] CKPT [TASKS] [-- EXTRA_LM_EVAL_ARGS...]
# A thin wrapper over `python -m uniattn.eval.run` (its docstring, or --help, gives the arguments and
# the environment: LIMIT, DEVICE, DTYPE, BATCH_SIZE, OUT_DIR). On first use it installs the evaluation
# extras (lm-eval, datasets) into .venv through scripts/setup_env.sh. PYTHON: another interpreter,
# which must already have them.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY=${PYTHON:-}
[ -z "$PY" ] && [ -x "$ROOT/.venv/bin/python" ] && PY="$ROOT/.venv/bin/python"
if [ -z "$PY" ] || ! "$PY" -c "import lm_eval" 2>/dev/null; then
  if [ -n "${PYTHON:-}" ]; then
    echo "eval.sh: error: PYTHON=$PYTHON cannot import lm_eval; pip install -r $ROOT/requirements-eval.txt there" >&2
    exit 2
  fi
  echo "eval.sh: installing the evaluation extras into $ROOT/.venv (first use)" >&2
  bash "$ROOT/scripts/setup_env.sh" eval
  PY="$ROOT/.venv/bin/python"
fi
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m uniattn.eval.run "$@"
