#!/usr/bin/env bash
# Layer-dropping (LLMDrop) baseline: SuperBlocks G B E whose followers lose their attention sub-layer
# (h = x + MLP part only: no Q/K/V/O projections, no KV cache, no compensation); everything trains in one stage.
#
#   bash scripts/train_deepspeed-ft_drop.sh G B E           e.g. 4 16 33 for LLaMA-3.1 8B, 4 14 30 for SmolLM2
#
# Environment: MODEL_DIR DATA_DIR OUTPUT_DIR NUM_GPUS EXTRA_ARGS (see scripts/_train_launch.sh).
# Result: OUTPUT_DIR/final (loads with trust_remote_code=True).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_train_launch.sh"
parse_layout "$@"
OUTPUT_DIR="${OUTPUT_DIR:-$ROOT/outputs/ft_drop_$1_$2_$3}"
launch_train --mode drop --superblock "$1" "$2" "$3"
