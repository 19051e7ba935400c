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
#   HOSTFILE    multi-node: a DeepSpeed hostfile ("node0 slots=8" a line); the launcher starts every node
#               over ssh/pdsh, or, with NODE_RANK set, each node runs the command itself (no ssh)
#               (docs/train.md, "Several nodes"). NUM_GPUS, when set, caps the processes per node;
#               NUM_NODES caps the nodes; MASTER_ADDR names the rendezvous node.
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
  local where=(--num_gpus "$NUM_GPUS")
  if [ -n "${HOSTFILE:-}" ]; then
    [ -f "$HOSTFILE" ] || die "HOSTFILE=$HOSTFILE is not a file; write a DeepSpeed hostfile (a line per node: 'node0 slots=8')"
    where=(--hostfile "$HOSTFILE")
    local hosts first
    hosts=$(grep -cE '^[[:space:]]*[^#[:space:]]' "$HOSTFILE" || true)
    first=$(grep -E '^[[:space:]]*[^#[:space:]]' "$HOSTFILE" | head -n 1 | awk '{print $1}')
    [ -n "${NUM_GPUS_SET:-}" ] && where+=(--num_gpus "$NUM_GPUS")
    [ -n "${NUM_NODES:-}" ] && where+=(--num_nodes "$NUM_NODES")
    if [ -n "${NODE_RANK:-}" ]; then
      where+=(--no_ssh --node_rank "$NODE_RANK")  # each node runs this command itself, no ssh
    elif [ "$hosts" -eq 1 ]; then
      where+=(--no_ssh_check)  # one node: nothing to reach over ssh
    fi
    local master=${MASTER_ADDR:-}
    [ -z "$master" ] && [ "$hosts" -eq 1 ] && master=$first
    [ -n "$master" ] && where+=(--master_addr "$master")
    echo "launching on the nodes of $HOSTFILE; model $MODEL_DIR; data $DATA_DIR; output $OUTPUT_DIR" >&2
  else
    echo "launching $NUM_GPUS process(es); model $MODEL_DIR; data $DATA_DIR; output $OUTPUT_DIR" >&2
  fi
  exec "$PY" -m deepspeed.launcher.runner "${where[@]}" --master_port "${MASTER_PORT:-29500}" \
    --module uniattn.train --model_dir "$MODEL_DIR" --data "$DATA_DIR" --output_dir "$OUTPUT_DIR" \
    "$@" "${extra[@]}"
}
