"""Evaluate one checkpoint (plain HF or UniAttn) on the repo's offline lm-eval tasks.

    python -m uniattn.eval.run [--limit N] CKPT [TASKS] [-- EXTRA_LM_EVAL_ARGS...]
    bash scripts/eval.sh ...            # the same, installing the evaluation extras on first use

CKPT is a saved checkpoint directory (config.json + weights + tokenizer). TASKS: comma-separated task
or group names from uniattn/eval/tasks/ (default: uniattn, i.e. every task); the "uniattn_" prefix may be
left out (pubmedqa = uniattn_pubmedqa). Writes CKPT/eval/results.json (lm-eval's JSON) and
CKPT/eval/results.md (markdown table with chance levels), each atomically; with a limit they are
results_limitN.{json,md}, so a quick run never overwrites a full one.

Environment (all optional): LIMIT=N (as --limit N); DEVICE (default cuda if torch sees a GPU, else
cpu); DTYPE (bfloat16 on GPU, float32 on CPU); BATCH_SIZE (auto on GPU, 8 on CPU); OUT_DIR (default
CKPT/eval).

lm_eval runs in a child process with uniattn/eval/tasks/ as its working directory (lm-eval resolves the
task YAMLs' relative ``data_files`` against it), isolated (``-I``: this project is not importable there,
so the checkpoint loads exactly as where it is not installed; UniAttn code comes from the checkpoint
through trust_remote_code), with datasets and the hub offline: nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from . import TASKS_DIR
from .report import publish


class EvalError(ValueError):
    """Bad input; the message names the value and the fix."""


def known_tasks() -> list[str]:
    names = set()
    for yaml in TASKS_DIR.glob("*.yaml"):
        names.update(re.findall(r"^(?:task|group): *([A-Za-z0-9_]+) *$", yaml.read_text(), flags=re.M))
    if not names:
        raise EvalError(f"no task YAMLs in {TASKS_DIR}; rebuild them with python -m uniattn.eval.prepare")
    return sorted(names)


def resolve_tasks(text: str) -> list[str]:
    known, tasks = known_tasks(), []
    for name in (n.strip() for n in text.split(",")):
        if not name:
            continue
        match = next((c for c in (name, f"uniattn_{name}") if c in known), None)
        if match is None:
            raise EvalError(f"unknown task '{name}'; known tasks and groups: {' '.join(known)}")
        tasks.append(match)
    if not tasks:
        raise EvalError(f"no task names in '{text}'")
    return tasks


def check_checkpoint(path: str) -> Path:
    ckpt = Path(path)
    if not ckpt.is_dir():
        raise EvalError(f"checkpoint directory '{path}' does not exist; pass a directory saved with save_pretrained")
    if not (ckpt / "config.json").is_file():
        raise EvalError(f"'{path}' has no config.json, so it is not a Hugging Face checkpoint directory")
    ckpt = ckpt.resolve()
    if "," in str(ckpt) or "=" in str(ckpt):
        raise EvalError(f"checkpoint path '{ckpt}' contains ',' or '=', which lm_eval's --model_args cannot carry; "
                        "rename or symlink it")
    return ckpt


def parse(argv: list[str]) -> tuple[Path, list[str], str | None, list[str]]:
    """(checkpoint, tasks, limit, extra lm_eval args) from ``[--limit N] CKPT [TASKS] [-- EXTRA...]``."""
    limit, positional, extra = os.environ.get("LIMIT") or None, [], []
    args = list(argv)
    while args:
        a = args.pop(0)
        if a == "--":
            extra = args
            break
        if a == "--limit":
            if not args:
                raise EvalError("--limit needs a number")
            limit = args.pop(0)
        elif a.startswith("--limit="):
            limit = a.split("=", 1)[1]
        else:
            positional.append(a)
    if not 1 <= len(positional) <= 2:
        raise EvalError("usage: scripts/eval.sh [--limit N] CKPT [TASKS] [-- EXTRA_LM_EVAL_ARGS...]")
    ckpt = check_checkpoint(positional[0])
    if limit is not None and not re.fullmatch(r"[1-9][0-9]*", limit):
        raise EvalError(f"limit '{limit}' is not a positive whole number of items per task")
    return ckpt, resolve_tasks(positional[1] if len(positional) > 1 else "uniattn"), limit, extra


def _kernel_arg(ckpt: Path) -> str:
    """``,attn_implementation=eager`` for a stock soft-capped (Gemma-2) checkpoint: transformers' default
    SDPA drops its cap, and lm-eval's process has not imported UniAttn's fused kernel. UniAttn
    checkpoints choose an exact kernel themselves."""
    try:
        config = json.loads((Path(ckpt) / "config.json").read_text())
    except (OSError, ValueError):
        return ""
    stock_capped = config.get("attn_logit_softcapping") is not None and "superblock_size" not in config
    return ",attn_implementation=eager" if stock_capped else ""


def run(argv: list[str]) -> Path:
    ckpt, tasks, limit, extra = parse(argv)
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise EvalError(f"{sys.executable} cannot import lm_eval; run bash scripts/setup_env.sh eval "
                        "(or pip install -r requirements-eval.txt)") from None
    import torch

    device = os.environ.get("DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    cpu = device == "cpu"
    dtype = os.environ.get("DTYPE") or ("float32" if cpu else "bfloat16")
    batch = os.environ.get("BATCH_SIZE") or ("8" if cpu else "auto")
    out_dir = Path(os.environ.get("OUT_DIR") or ckpt / "eval")
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"results_limit{limit}" if limit else "results"
    with tempfile.TemporaryDirectory(prefix=".lm_eval.", dir=out_dir) as raw:
        cmd = [sys.executable, "-I", "-m", "lm_eval", "--model", "hf",
               "--model_args", f"pretrained={ckpt},trust_remote_code=True,dtype={dtype}{_kernel_arg(ckpt)}",
               "--tasks", ",".join(tasks), "--include_path", str(TASKS_DIR), "--device", device,
               "--batch_size", batch, "--output_path", raw, *(["--limit", limit] if limit else []), *extra]
        print(f"eval: (cd {TASKS_DIR} && {' '.join(cmd)})", file=sys.stderr, flush=True)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
        proc = subprocess.run(cmd, cwd=TASKS_DIR, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"lm_eval exited with {proc.returncode}")
        results = sorted(Path(raw).rglob("results_*.json"))
        if not results:
            raise RuntimeError(f"lm_eval finished but wrote no results_*.json under {raw}")
        json_path, md_path = publish(results[-1], out_dir, name)
    print(md_path.read_text())
    return json_path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        path = run(argv)
    except EvalError as err:
        print(f"eval: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"eval: error: {err}", file=sys.stderr)
        return 1
    print(f"results: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
