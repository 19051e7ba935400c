#!/usr/bin/env bash
# Plain full fine-tuning of the base model (the seed's baseline).
#
#   bash scripts/train_deepspeed-ft.sh
#   MODEL_DIR=/models/Llama-3.1-8B DATA_DIR=dataset/pmc_llama_instructions.json bash scripts/train_deepspeed-ft.sh
#
# Environment: MODEL_DIR DATA_DIR OUTPUT_DIR NUM_GPUS EXTRA_ARGS (see scripts/_train_launch.sh).
# Hyper-parameters: the preset in configs/ that matches the model. Result: OUTPUT_DIR/final.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_train_launch.sh"
[[ $# -eq 0 ]] || die "takes no arguments (got: $*); set MODEL_DIR, DATA_DIR, OUTPUT_DIR, EXTRA_ARGS instead"
OUTPUT_DIR="${OUTPUT_DIR:-$ROOT/outputs/ft}"
launch_train --mode plain
