#!/usr/bin/env bash
# Fine-tuning with Softmax unification only: SuperBlocks G B E, followers without the compensation W_c.
#
#   bash scripts/train_deepspeed-ft_softmax.sh G B E        e.g. 4 16 33 for LLaMA-3.1 8B, 4 14 30 for SmolLM2
#
# Environment: MODEL_DIR DATA_DIR OUTPUT_DIR NUM_GPUS EXTRA_ARGS (see scripts/_train_launch.sh).
# Result: OUTPUT_DIR/final, a UniAttn checkpoint (loads with trust_remote_code=True).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_train_launch.sh"
parse_layout "$@"
OUTPUT_DIR="${OUTPUT_DIR:-$ROOT/outputs/ft_softmax_$1_$2_$3}"
launch_train --mode softmax --superblock "$1" "$2" "$3"
