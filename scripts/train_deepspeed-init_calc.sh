#!/usr/bin/env bash
# Closed-form initialisation of the compensation W_c (the seed's interface):
#   bash scripts/train_deepspeed-init_calc.sh G B E L
# e.g. 4 16 33 32 for LLaMA-3.1-8B, 4 14 30 30 for the default SmolLM2-135M.
# Environment: MODEL_DIR, DATA_DIR, OUTPUT_DIR, NUM_GPUS (processes on this node); extra flags of
# `python -m uniattn.init_calc` (--num_samples, --max_length, --dtype, ...) go in EXTRA_ARGS.
# Several nodes (torchrun): run the same command on every node with NNODES, NODE_RANK, MASTER_ADDR
# (and MASTER_PORT) set; docs/train.md, "Several nodes".
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ $# -ne 4 ]; then
  echo "usage: $0 G B E L   (SuperBlock size, begin layer, end layer, number of layers; e.g. 4 16 33 32)" >&2
  exit 2
fi
source "$ROOT/scripts/common.sh" --functions  # require_int, before the defaults (which may build the model)
require_int G "$1"; require_int B "$2"; require_int E "$3"; require_int L "$4"
source "$ROOT/scripts/common.sh"
OUTPUT_DIR=${OUTPUT_DIR:-$ROOT/outputs/init_calc_$1_$2_$3}
INIT_PATH="$OUTPUT_DIR/uniattn_init.safetensors"

ARGS=(--model_dir "$MODEL_DIR" --data "$DATA_DIR" --superblock "$1" "$2" "$3" --num_layers "$4"
      --output "$INIT_PATH" --save_model "$OUTPUT_DIR/model" --overwrite ${EXTRA_ARGS:-})
if [ -n "${NNODES:-}" ]; then
  require_int NNODES "$NNODES"; require_int NODE_RANK "${NODE_RANK:-}" "this node's index, 0 on MASTER_ADDR"
  [ -n "${MASTER_ADDR:-}" ] || { echo "$(basename "$0"): error: NNODES=$NNODES needs MASTER_ADDR (node 0's address)" >&2; exit 2; }
  "$PY" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NUM_GPUS" \
    --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" -m uniattn.init_calc "${ARGS[@]}"
elif [ "$NUM_GPUS" -gt 1 ]; then
  "$PY" -m torch.distributed.run --nproc_per_node "$NUM_GPUS" -m uniattn.init_calc "${ARGS[@]}"
else
  "$PY" -m uniattn.init_calc "${ARGS[@]}"
fi
echo
echo "W_c written to $INIT_PATH (a ready UniAttn checkpoint: $OUTPUT_DIR/model)"
echo "next: INIT_PATH=$INIT_PATH bash scripts/train_deepspeed-ft_uniattn.sh $1 $2 $3"
