#!/usr/bin/env bash
# Cross-layer KV sharing (CLA) baseline: SuperBlocks G B E whose followers reuse the leader's K and V
# (own Q, no compensation); everything trains in one stage.
#
#   bash scripts/train_deepspeed-ft_cla.sh G B E            e.g. 4 16 33 for LLaMA-3.1 8B, 4 14 30 for SmolLM2
#
# Environment: MODEL_DIR DATA_DIR OUTPUT_DIR NUM_GPUS EXTRA_ARGS (see scripts/_train_launch.sh).
# Result: OUTPUT_DIR/final (loads with trust_remote_code=True).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_train_launch.sh"
parse_layout "$@"
OUTPUT_DIR="${OUTPUT_DIR:-$ROOT/outputs/ft_cla_$1_$2_$3}"
launch_train --mode cla --superblock "$1" "$2" "$3"
