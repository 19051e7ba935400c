"""Turn an lm-eval results JSON into the files ``scripts/eval.sh`` leaves next to a checkpoint.

``publish`` copies lm-eval's results JSON to ``OUT_DIR/NAME.json`` and writes
``OUT_DIR/NAME.md``, a markdown table of every task and group with its item
count, accuracy (with standard error), length-normalised accuracy, Brier score,
and the chance and majority levels recorded in ``tasks/data/MANIFEST.json``.
Both files appear atomically (temporary name, then rename), so a crashed or
interrupted evaluation never leaves a half-written result behind.

The readers here (``load_results``, ``task_scores``) are shared with
``compare.py``.

    python -m uniattn.eval.report RAW_RESULTS_JSON --out-dir CKPT/eval [--name results]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from uniattn.eval import TASKS_DIR
from uniattn.io import write_text

MANIFEST = TASKS_DIR / "data" / "MANIFEST.json"
METRICS = ("acc", "acc_norm", "brier_score")


def resolve_results(path: str | os.PathLike) -> Path:
    """Accept a results JSON, an eval directory, or a checkpoint directory holding ``eval/results.json``."""
    p = Path(path)
    for candidate in (p, p / "results.json", p / "eval" / "results.json"):
        if candidate.is_file():
            return candidate
    if p.suffix == ".json" or not p.is_dir():
        raise FileNotFoundError(f"results file {p} does not exist; pass an lm-eval results JSON or an evaluated checkpoint")
    raise FileNotFoundError(
        f"{p} has neither results.json nor eval/results.json; run scripts/eval.sh {p} first "
        "(a --limit run writes eval/results_limitN.json: pass that file instead)"
    )


def load_results(path: str | os.PathLike) -> dict:
    resolved = resolve_results(path)
    data = json.loads(resolved.read_text())
    if "results" not in data:
        raise ValueError(f"{resolved} has no 'results' key, so it is not an lm-eval results JSON")
    return data


def load_manifest() -> dict:
    return json.loads(MANIFEST.read_text())["tasks"] if MANIFEST.is_file() else {}


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not math.isnan(value) else None


def task_scores(results: dict) -> dict[str, dict[str, float | None]]:
    """``{task_or_group: {metric: value, metric_stderr: value}}`` for the metrics in METRICS."""
    out = {}
    for name, entry in {**results.get("results", {}), **results.get("groups", {})}.items():
        row = {}
        for metric in METRICS:
            if f"{metric},none" in entry:
                row[metric] = _number(entry[f"{metric},none"])
                row[f"{metric}_stderr"] = _number(entry.get(f"{metric}_stderr,none"))
        out[name] = row
    return out


def task_order(results: dict) -> list[tuple[str, int]]:
    """Tasks and groups as lm-eval nests them: ``[(name, depth), ...]``, groups before their members."""
    subtasks = results.get("group_subtasks", {})
    members = {m for ms in subtasks.values() for m in ms}
    order: list[tuple[str, int]] = []

    def visit(name: str, depth: int) -> None:
        order.append((name, depth))
        for member in subtasks.get(name, []):
            visit(member, depth + 1)

    for name in sorted(set(subtasks) | set(results.get("results", {}))):
        if name not in members:
            visit(name, 0)
    return order


def _fmt(value: float | None, stderr: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if stderr is None else f"{value:.4f} ± {stderr:.4f}"


def group_chance(results: dict, manifest: dict) -> dict[str, float]:
    """Chance level per task, and per group the unweighted mean of its members' (as lm-eval scores groups)."""
    chance = {e["task"]: e["chance"] for e in manifest.values() if e.get("chance") is not None}
    subtasks = results.get("group_subtasks", {})

    def level(name: str) -> float | None:
        if name in chance:
            return chance[name]
        members = [level(m) for m in subtasks.get(name, [])]
        if members and all(m is not None for m in members):
            chance[name] = sum(members) / len(members)
            return chance[name]
        return None

    for name in subtasks:
        level(name)
    return chance


def markdown_table(results: dict, manifest: dict | None = None) -> str:
    """One row per task or group: items, acc ± stderr, acc_norm, Brier, chance, majority."""
    manifest = load_manifest() if manifest is None else manifest
    by_task = {entry["task"]: entry for entry in manifest.values()}
    chance = group_chance(results, manifest)
    scores = task_scores(results)
    n_samples = results.get("n-samples", {})
    subtasks = results.get("group_subtasks", {})

    def items(name: str) -> int | None:
        if name in n_samples:
            return n_samples[name].get("effective")
        counts = [items(m) for m in subtasks.get(name, [])]
        return sum(counts) if counts and None not in counts else None

    lines = [
        "| task | items | acc | acc_norm | brier (lower is better) | chance | majority |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, depth in task_order(results):
        row = scores.get(name, {})
        majority = by_task.get(name, {}).get("majority")
        n = items(name)
        lines.append(
            f"| {'&nbsp;&nbsp;' * depth}{name} | {'' if n is None else n} "
            f"| {_fmt(row.get('acc'), row.get('acc_stderr'))} | {_fmt(row.get('acc_norm'))} "
            f"| {_fmt(row.get('brier_score'))} | {_fmt(chance.get(name)) if name in chance else ''} "
            f"| {(_fmt(majority) + ' (' + by_task[name]['majority_answer'] + ')') if majority is not None else ''} |"
        )
    note = (
        "\nChance: mean of 1/#choices (groups: mean over their tasks). Majority: always the most common "
        "correct answer, where all items share the choices. Both are over each task's full item set.\n"
    )
    return "\n".join(lines) + "\n" + note


def run_summary(results: dict) -> str:
    config = results.get("config", {})
    model_args = config.get("model_args", {})
    if isinstance(model_args, str):
        model_args = dict(kv.split("=", 1) for kv in model_args.split(",") if "=" in kv)
    limit = config.get("limit")
    if isinstance(limit, float) and limit.is_integer():
        limit = int(limit)
    seconds = _number(results.get("total_evaluation_time_seconds"))
    if seconds is None:
        try:
            seconds = float(results.get("total_evaluation_time_seconds"))
        except (TypeError, ValueError):
            seconds = None
    return (
        f"- checkpoint: `{model_args.get('pretrained', results.get('model_name', '?'))}`\n"
        f"- dtype {model_args.get('dtype', '?')}, device {config.get('device', '?')}, "
        f"batch size {config.get('batch_size', '?')}, limit {limit if limit is not None else 'none (all items)'}\n"
        f"- lm_eval {results.get('lm_eval_version', '?')}, transformers {results.get('transformers_version', '?')}, "
        f"evaluation time {'?' if seconds is None else f'{seconds:.0f}'} s\n"
    )


def publish(raw_json: Path, out_dir: Path, name: str = "results") -> tuple[Path, Path]:
    """Write ``OUT_DIR/NAME.json`` (lm-eval's JSON, unchanged) and ``OUT_DIR/NAME.md``."""
    results = load_results(raw_json)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    md = f"# lm-eval results\n\n{run_summary(results)}\n{markdown_table(results)}"
    write_text(json_path, json.dumps(results, indent=2, ensure_ascii=False, default=str) + "\n")
    write_text(md_path, md)
    return json_path, md_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("raw_json", type=Path, help="results JSON written by lm_eval --output_path")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--name", default="results", help="base name of the two files (default %(default)s)")
    args = parser.parse_args(argv)
    json_path, md_path = publish(args.raw_json, args.out_dir, args.name)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
