#!/usr/bin/env bash
# Evaluate one checkpoint (plain HF or UniAttn) on the repo's offline lm-eval tasks.
#
#   scripts/eval.sh [--limit N] CKPT [TASKS] [-- EXTRA_LM_EVAL_ARGS...]
#
# CKPT   a saved checkpoint directory (config.json + weights + tokenizer).
# TASKS  comma-separated task or group names from uniattn/eval/tasks/ (default: uniattn,
#        i.e. every task); the "uniattn_" prefix may be left out (pubmedqa = uniattn_pubmedqa).
#
# Writes CKPT/eval/results.json (lm-eval's JSON) and CKPT/eval/results.md (markdown table with
# chance levels), each atomically; with a limit they are results_limitN.{json,md}, so a quick
# run never overwrites a full one. A run on a task subset does overwrite results.{json,md}.
#
# Environment (all optional):
#   LIMIT=N         items per task (same as --limit N), for quick runs
#   DEVICE          cuda / cuda:0 / cpu (default: cuda if torch sees a GPU, else cpu)
#   DTYPE           default bfloat16 on GPU, float32 on CPU
#   BATCH_SIZE      default auto on GPU, 8 on CPU
#   OUT_DIR         default CKPT/eval
#   PYTHON          interpreter with lm_eval installed (default: the repo's .venv, else python3)
#
# lm_eval runs with uniattn/eval/tasks/ as its working directory, because lm-eval resolves the
# task YAMLs' relative `data_files` (data/*.jsonl) against the working directory, and with
# PYTHONPATH cleared, so the checkpoint is loaded exactly as it would be where this project is
# not installed (UniAttn code comes from the checkpoint through trust_remote_code). Datasets and
# the hub are set offline: nothing is downloaded.
set -euo pipefail

die() { echo "eval.sh: error: $*" >&2; exit 2; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TASKS_DIR="$ROOT/uniattn/eval/tasks"

limit="${LIMIT:-}"
positional=()
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --limit) [[ $# -ge 2 ]] || die "--limit needs a number"; limit="$2"; shift 2 ;;
    --limit=*) limit="${1#--limit=}"; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) positional+=("$1"); shift ;;
  esac
done
[[ ${#positional[@]} -ge 1 && ${#positional[@]} -le 2 ]] \
  || die "usage: scripts/eval.sh [--limit N] CKPT [TASKS] [-- EXTRA_LM_EVAL_ARGS...]"
ckpt="${positional[0]}"
tasks_arg="${positional[1]:-uniattn}"

[[ -d "$ckpt" ]] || die "checkpoint directory '$ckpt' does not exist; pass a directory saved with save_pretrained"
[[ -f "$ckpt/config.json" ]] || die "'$ckpt' has no config.json, so it is not a Hugging Face checkpoint directory"
ckpt="$(cd "$ckpt" && pwd)"
[[ "$ckpt" != *,* && "$ckpt" != *=* ]] \
  || die "checkpoint path '$ckpt' contains ',' or '=', which lm_eval's --model_args cannot carry; rename or symlink it"
if [[ -n "$limit" ]]; then
  [[ "$limit" =~ ^[1-9][0-9]*$ ]] || die "limit '$limit' is not a positive whole number of items per task"
fi

# Task names are checked here, against the YAMLs, so a typo fails at once with the list of valid names.
mapfile -t known < <(sed -n 's/^\(task\|group\): *\([A-Za-z0-9_][A-Za-z0-9_]*\) *$/\2/p' "$TASKS_DIR"/*.yaml | sort -u)
[[ ${#known[@]} -gt 0 ]] || die "no task YAMLs in $TASKS_DIR; rebuild them with python -m uniattn.eval.prepare"
tasks=()
IFS=',' read -ra requested <<< "$tasks_arg"
for name in "${requested[@]}"; do
  name="${name// /}"
  [[ -n "$name" ]] || continue
  match=""
  for candidate in "$name" "uniattn_$name"; do
    for k in "${known[@]}"; do [[ "$k" == "$candidate" ]] && match="$k" && break 2; done
  done
  [[ -n "$match" ]] || die "unknown task '$name'; known tasks and groups: ${known[*]}"
  tasks+=("$match")
done
[[ ${#tasks[@]} -gt 0 ]] || die "no task names in '$tasks_arg'"
tasks_csv="$(IFS=,; echo "${tasks[*]}")"

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
"$PYTHON" -c "import lm_eval" 2>/dev/null \
  || die "$PYTHON cannot import lm_eval; install it with pip install -r $ROOT/requirements-eval.txt"

device="${DEVICE:-}"
if [[ -z "$device" ]]; then
  if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    device=cuda
  else
    device=cpu
  fi
fi
if [[ "$device" == cpu ]]; then
  dtype="${DTYPE:-float32}"; batch="${BATCH_SIZE:-8}"
else
  dtype="${DTYPE:-bfloat16}"; batch="${BATCH_SIZE:-auto}"
fi

out_dir="${OUT_DIR:-$ckpt/eval}"
name=results
[[ -n "$limit" ]] && name="results_limit$limit"
mkdir -p "$out_dir"
raw="$(mktemp -d "$out_dir/.lm_eval.XXXXXX")"
trap 'rm -rf "$raw"' EXIT

cmd=("$PYTHON" -I -m lm_eval --model hf
     --model_args "pretrained=$ckpt,trust_remote_code=True,dtype=$dtype"
     --tasks "$tasks_csv" --include_path "$TASKS_DIR"
     --device "$device" --batch_size "$batch" --output_path "$raw")
[[ -n "$limit" ]] && cmd+=(--limit "$limit")
cmd+=("${extra[@]}")
echo "eval.sh: (cd $TASKS_DIR && ${cmd[*]})" >&2
(cd "$TASKS_DIR" && env -u PYTHONPATH HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 "${cmd[@]}")

result="$(find "$raw" -name 'results_*.json' -type f | sort | tail -n 1)"
[[ -n "$result" ]] || die "lm_eval finished but wrote no results_*.json under $raw"
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m uniattn.eval.report "$result" --out-dir "$out_dir" --name "$name"
