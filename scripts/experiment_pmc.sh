#!/usr/bin/env bash
# The comparison of docs/results.md: base, plain FT, softmax-only FT, UniAttn (init calc + two stages),
# UniAttn with W_c = 0, and cross-layer KV sharing (CLA), on SmolLM2-135M-Instruct and PMC-LLaMA records.
#
#   bash scripts/experiment_pmc.sh                  # CPU size: ~1.5 h on 2 cores, +45 min with EXTRA_ARGS=--search_lr
#   SIZE=full bash scripts/experiment_pmc.sh        # full size: the preset schedule, lr grid, 3 seeds, on GPUs
#
# Environment (all optional):
#   SIZE        cpu (default) or full
#   MODEL_DIR   base checkpoint (default: the embedded SmolLM2-135M-Instruct, built once and cached)
#   DATA_DIR    PMC-LLaMA records, JSON/JSONL (default: dataset/pmc_llama_instructions_1000.json)
#   OUTPUT_DIR  default outputs/experiment_pmc_<size>
#   SUPERBLOCK  default "4 14 30"
#   EXTRA_ARGS  more uniattn.tools.experiment flags, e.g. "--seeds 0 1 2" or "--lrs 5e-5 1e-4"
#
# Rerunning the same command resumes: finished runs and evaluations are kept. At the end the table
# and plot are written to OUTPUT_DIR/results.md and results.png (docs/results.md is made from them).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ ! -x "$ROOT/.venv/bin/python" ] && [ -z "${PYTHON:-}" ]; then
  bash "$ROOT/scripts/setup_env.sh"
fi
source "$ROOT/scripts/common.sh"  # PY, MODEL_DIR, DATA_DIR
SIZE="${SIZE:-cpu}"
OUTPUT_DIR="${OUTPUT_DIR:-$ROOT/outputs/experiment_pmc_$SIZE}"
read -r -a superblock <<< "${SUPERBLOCK:-4 14 30}"
read -r -a extra <<< "${EXTRA_ARGS:-}"
"$PY" -m uniattn.tools.experiment --size "$SIZE" --out "$OUTPUT_DIR" --model_dir "$MODEL_DIR" --data "$DATA_DIR" \
  --superblock "${superblock[@]}" "${extra[@]}"
"$PY" -m uniattn.tools.experiment_report "$OUTPUT_DIR/results.json" --out-dir "$OUTPUT_DIR"
