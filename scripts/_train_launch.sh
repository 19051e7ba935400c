#!/usr/bin/env bash
# Shared part of the fine-tuning scripts (sourced, not run): checks and the DeepSpeed launch.
# Defaults come from scripts/common.sh, shared with the other entry points.
#
# Environment (all optional):
#   MODEL_DIR   plain HF checkpoint (default: the embedded SmolLM2-135M-Instruct, built once and cached)
#   DATA_DIR    SFT records, a JSON/JSONL file or a folder holding one (default: dataset/pmc_llama_instructions_1000.json)
#   OUTPUT_DIR  checkpoints and OUTPUT_DIR/final (default: outputs/<mode>[_G_B_E])
#   NUM_GPUS    processes to launch (default: every visible GPU, one CPU process when there is none;
#               NUM_GPUS=2 on a CPU-only machine runs two CPU processes over gloo)
#   INIT_PATH   init-calc output, for train_deepspeed-ft_uniattn.sh
#   EXTRA_ARGS  more uniattn.train flags, e.g. "--max_steps 5 --learning_rate 1e-5"
#   MASTER_PORT rendezvous port (default 29500; change it to run two trainings at once)
#   PYTHON      interpreter (default: the repo's .venv, else python3)
#
# Running the same command again resumes from the newest checkpoint in OUTPUT_DIR.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() { echo "$(basename "$0"): error: $*" >&2; exit 2; }
source "$ROOT/scripts/common.sh" --functions  # require_int; the defaults are read in launch_train

# G B E must be non-negative integers here; whether they fit the model is checked by uniattn.train.
parse_layout() {
  [[ $# -eq 3 ]] || die "expected 3 numbers G B E (SuperBlock size, first layer, end layer), e.g. 4 14 30; got $# argument(s)"
  local hint="SuperBlock numbers G B E, e.g. 4 14 30"
  require_int G "$1" "$hint"; require_int B "$2" "$hint"; require_int E "$3" "$hint"
}

# launch_train ARGS... : uniattn.train on NUM_GPUS processes through the DeepSpeed launcher.
launch_train() {
  source "$ROOT/scripts/common.sh"  # PY, MODEL_DIR, DATA_DIR, NUM_GPUS
  local extra=()
  read -r -a extra <<< "${EXTRA_ARGS:-}"
  echo "launching $NUM_GPUS process(es); model $MODEL_DIR; data $DATA_DIR; output $OUTPUT_DIR" >&2
  exec "$PY" -m deepspeed.launcher.runner --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" \
    --module uniattn.train --model_dir "$MODEL_DIR" --data "$DATA_DIR" --output_dir "$OUTPUT_DIR" \
    "$@" "${extra[@]}"
}
