"""Checkpoints scored on the shipped tasks by lm-eval: CLI, Python API and scripts/eval.sh agree.

The CLI runs in a subprocess that cannot import ``uniattn`` (isolated
interpreter, clean environment, working directory outside the repo's Python
path, and an import blocker for good measure: an editable install would
otherwise make it importable), so a checkpoint that passes here loads where
this project is not installed, as ``docs/UNIATTN.md`` section 6 requires. The
API runs in-process. Both must give the same per-item log-likelihoods and the
same scores.

Models are tiny and random (4 layers, hidden 64) with SmolLM2's tokenizer, and
only ``LIMIT`` items per task are scored, so the numbers mean nothing; only
their agreement does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from uniattn.eval import TASKS_DIR

REPO = Path(__file__).resolve().parents[1]
LIMIT = 3
BATCH = 4
METRICS = ("acc,none", "acc_norm,none", "brier_score,none")

# Runs `python -m lm_eval ARGS` with `uniattn` made unimportable, and proves it first.
_CLI_BOOT = r"""
import importlib.abc, runpy, sys

class _NoUniAttn(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "uniattn" or name.startswith("uniattn."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None

sys.meta_path.insert(0, _NoUniAttn())
try:
    import uniattn  # noqa: F401
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("uniattn is importable in the CLI subprocess")
sys.argv = ["lm_eval", *sys.argv[1:]]
runpy.run_module("lm_eval", run_name="__main__", alter_sys=True)
"""


def _clean_env(hf_home: Path) -> dict:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "HF_HOME": str(hf_home),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def _model_args(ckpt: Path) -> str:
    return f"pretrained={ckpt},trust_remote_code=True,dtype=float32"


def run_cli(ckpt: Path, out: Path, hf_home: Path) -> tuple[dict, dict]:
    """lm_eval CLI in a subprocess that cannot import uniattn; returns (results, samples by task)."""
    args = [
        "--model", "hf", "--model_args", _model_args(ckpt), "--tasks", "uniattn",
        "--include_path", str(TASKS_DIR), "--device", "cpu", "--batch_size", str(BATCH),
        "--limit", str(LIMIT), "--output_path", str(out), "--log_samples",
    ]
    proc = subprocess.run(
        [sys.executable, "-I", "-c", _CLI_BOOT, *args],
        cwd=TASKS_DIR, env=_clean_env(hf_home), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"lm_eval CLI failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    (results_file,) = out.rglob("results_*.json")
    samples = {}
    for path in out.rglob("samples_*.jsonl"):
        task = path.name[len("samples_"):].rsplit("_", 1)[0]
        samples[task] = [json.loads(line) for line in path.read_text().splitlines()]
    return json.loads(results_file.read_text()), samples


def run_api(ckpt: Path) -> tuple[dict, dict]:
    """lm_eval.simple_evaluate in this process, from the task directory as eval.sh runs it."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    cwd = os.getcwd()
    os.chdir(TASKS_DIR)  # the YAMLs' data_files are relative to it
    try:
        results = lm_eval.simple_evaluate(
            model="hf", model_args=_model_args(ckpt), tasks=["uniattn"], device="cpu", batch_size=BATCH,
            limit=LIMIT, task_manager=TaskManager(include_path=str(TASKS_DIR)), log_samples=True,
        )
    finally:
        os.chdir(cwd)
    return results, results["samples"]


def assert_same_scores(cli: tuple[dict, dict], api: tuple[dict, dict]) -> None:
    cli_results, cli_samples = cli
    api_results, api_samples = api
    tasks = {t for t in api_results["results"] if t.startswith("uniattn_")}
    assert tasks and set(cli_results["results"]) == set(api_results["results"])
    for task in sorted(tasks):
        metrics = [m for m in METRICS if m in api_results["results"][task]]  # groups aggregate acc, acc_norm only
        assert "acc,none" in metrics
        for metric in metrics:
            assert cli_results["results"][task][metric] == pytest.approx(api_results["results"][task][metric], abs=1e-6), (task, metric)
        if task in api_samples:  # leaf tasks: compare every scored choice's log-likelihood
            assert cli_results["n-samples"][task] == api_results["n-samples"][task]
            by_doc = {s["doc_id"]: s for s in cli_samples[task]}
            assert len(by_doc) == len(api_samples[task]) == LIMIT
            for sample in api_samples[task]:
                ours = [float(r[0]) for r in sample["filtered_resps"]]
                theirs = [float(r[0]) for r in by_doc[sample["doc_id"]]["filtered_resps"]]
                assert theirs == pytest.approx(ours, rel=1e-5, abs=1e-5), (task, sample["doc_id"])


def save_tiny_llama(out: Path, layers: int = 4) -> Path:
    """A random 4-layer LlamaForCausalLM with SmolLM2's tokenizer, saved as a plain HF checkpoint."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from uniattn.tools.smollm2 import ensure_smollm2

    smollm2 = ensure_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("ckpt") / "tiny-llama")


@pytest.fixture(scope="module")
def tiny_llama_api(tiny_llama) -> tuple[dict, dict]:
    return run_api(tiny_llama)


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    """A fresh HF_HOME for the subprocesses, shared so the JSONL -> arrow conversion happens once."""
    return tmp_path_factory.mktemp("hf_home")


def test_cli_without_uniattn_and_api_agree_on_a_plain_llama(tiny_llama, tiny_llama_api, hf_home, tmp_path):
    cli = run_cli(tiny_llama, tmp_path / "out", hf_home)
    assert_same_scores(cli, tiny_llama_api)
    assert set(cli[0]["group_subtasks"]) == {"uniattn", "uniattn_medical", "uniattn_general"}


def test_eval_sh_writes_results_next_to_the_checkpoint(tiny_llama, tiny_llama_api, hf_home):
    env = {**_clean_env(hf_home), "DEVICE": "cpu", "BATCH_SIZE": str(BATCH), "LIMIT": str(LIMIT)}
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "eval.sh"), str(tiny_llama)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"eval.sh failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    eval_dir = tiny_llama / "eval"
    names = sorted(p.name for p in eval_dir.iterdir())
    assert names == [f"results_limit{LIMIT}.json", f"results_limit{LIMIT}.md"], "temporary files left behind"
    results = json.loads((eval_dir / f"results_limit{LIMIT}.json").read_text())
    api_results = tiny_llama_api[0]["results"]
    for task in api_results:
        for metric in METRICS:
            if metric in api_results[task]:
                assert results["results"][task][metric] == pytest.approx(api_results[task][metric], abs=1e-6)
    table = (eval_dir / f"results_limit{LIMIT}.md").read_text()
    assert f"limit {float(LIMIT)}" in table or f"limit {LIMIT}" in table
    assert "| &nbsp;&nbsp;&nbsp;&nbsp;uniattn_pubmedqa | 3 |" in table and "0.333" in table


def test_cli_without_uniattn_and_api_agree_on_a_uniattn_checkpoint(tiny_llama, hf_home, tmp_path):
    """UniAttn checkpoints load only with trust_remote_code; the CLI side cannot import this project."""
    try:
        from uniattn.convert import convert
    except ImportError:
        pytest.skip("uniattn.convert not available")
    # 4 layers, G=2 from layer 0: leaders 0 and 2, followers 1 and 3.
    ckpt = convert(tiny_llama, tmp_path / "tiny-uniattn", superblock=(2, 0, 4))
    config = json.loads((Path(ckpt) / "config.json").read_text())
    assert config["model_type"].startswith("uniattn_") and "auto_map" in config
    api = run_api(Path(ckpt))
    cli = run_cli(Path(ckpt), tmp_path / "out", hf_home)
    assert_same_scores(cli, api)
