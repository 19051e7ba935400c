#!/usr/bin/env bash
# UniAttn fine-tuning: W_c from init calc, stage 1 trains only W_c, stage 2 trains everything.
#
#   bash scripts/train_deepspeed-init_calc.sh G B E L      # first: writes INIT_PATH
#   bash scripts/train_deepspeed-ft_uniattn.sh G B E       e.g. 4 16 33 for LLaMA-3.1 8B, 4 14 30 for SmolLM2
#
# Environment: MODEL_DIR DATA_DIR OUTPUT_DIR NUM_GPUS INIT_PATH EXTRA_ARGS (see scripts/_train_launch.sh).
# INIT_PATH defaults to outputs/init_calc_G_B_E/uniattn_init.safetensors, where the init-calc script writes it;
# INIT_PATH=zero skips init calc and starts W_c at zero (the "no init" ablation).
# Result: OUTPUT_DIR/stage1/final (after stage 1) and OUTPUT_DIR/final (after stage 2).
# A restart skips a finished stage 1 and resumes the unfinished stage from its newest checkpoint.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_train_launch.sh"
parse_layout "$@"
INIT_PATH="${INIT_PATH:-$ROOT/outputs/init_calc_$1_$2_$3/uniattn_init.safetensors}"
OUTPUT_DIR="${OUTPUT_DIR:-$ROOT/outputs/ft_uniattn_$1_$2_$3}"
if [ "$INIT_PATH" = zero ]; then
  launch_train --mode uniattn --superblock "$1" "$2" "$3" --zero_init
else
  launch_train --mode uniattn --superblock "$1" "$2" "$3" --init_path "$INIT_PATH"
fi
