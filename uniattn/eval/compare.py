"""Print several checkpoints' lm-eval scores side by side and draw them as a bar plot.

Each argument is a results JSON, an eval directory, or a checkpoint directory
that ``scripts/eval.sh`` has already evaluated (its ``eval/results.json``);
``LABEL=PATH`` names a column, otherwise the checkpoint directory's name is
used. Prints a markdown table (one row per task and group, one column per
checkpoint, plus the chance level) and writes a PNG of the per-task scores.

    python -m uniattn.eval.compare base=ckpts/base uniattn=ckpts/uniattn-4-14-30 \\
        [--metric acc] [--plot compare.png] [--out compare.md]

Runs compared should cover the same items: the table marks a task whose item
count differs between runs (e.g. one was made with ``--limit``) with ``*``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from uniattn.eval.report import (
    METRICS,
    group_chance,
    load_manifest,
    load_results,
    resolve_results,
    task_order,
    task_scores,
)
from uniattn.io import atomic_path, write_text


def _label(arg: str) -> tuple[str, str]:
    """``LABEL=PATH`` or ``PATH``; a bare path is labelled by its checkpoint directory."""
    if "=" in arg and not Path(arg).exists():
        label, path = arg.split("=", 1)
        if label and path:
            return label, path
    resolved = resolve_results(arg)
    # CKPT/eval/results.json -> CKPT
    parent = resolved.parent.parent if resolved.parent.name == "eval" else resolved.parent
    return parent.name or str(resolved), arg


def gather(args: list[str], metric: str) -> tuple[list[str], list[tuple[str, int]], dict, dict, dict]:
    """Labels, task order, ``{label: {task: (value, stderr)}}``, ``{label: {task: items}}`` and group members."""
    labels, scores, items, order, subtasks = [], {}, {}, [], {}
    for arg in args:
        label, path = _label(arg)
        if label in scores:
            raise ValueError(f"two runs are labelled {label!r}; name them with LABEL=PATH")
        results = load_results(path)
        labels.append(label)
        per_task = task_scores(results)
        scores[label] = {t: (row.get(metric), row.get(f"{metric}_stderr")) for t, row in per_task.items()}
        items[label] = {t: n.get("effective") for t, n in results.get("n-samples", {}).items()}
        for entry in task_order(results):
            if entry not in order:
                order.append(entry)
        subtasks.update(results.get("group_subtasks", {}))
    return labels, order, scores, items, subtasks


def markdown(labels, order, scores, items, metric: str, chance: dict) -> str:
    lines = [
        f"| task ({metric}) | " + " | ".join(labels) + " | chance |",
        "|---|" + "---:|" * (len(labels) + 1),
    ]
    for task, depth in order:
        counts = {items[label].get(task) for label in labels if items[label].get(task) is not None}
        mark = "*" if len(counts) > 1 else ""
        cells = []
        for label in labels:
            value, stderr = scores[label].get(task, (None, None))
            if value is None:
                cells.append("-")
            else:
                cells.append(f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else ""))
        c = chance.get(task)
        lines.append(
            f"| {'&nbsp;&nbsp;' * depth}{task}{mark} | " + " | ".join(cells) + f" | {'' if c is None else f'{c:.3f}'} |"
        )
    return "\n".join(lines) + "\n"


def plot(labels, order, scores, metric: str, chance: dict, path: Path) -> None:
    """Grouped bars per task, error bars from lm-eval's stderr, chance level as a tick per task."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training and CI machines
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = [t for t, _ in order if any(scores[label].get(t, (None,))[0] is not None for label in labels)]
    x = np.arange(len(tasks))
    width = 0.8 / max(len(labels), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(tasks) + 2), 4.5))
    for i, label in enumerate(labels):
        values = [scores[label].get(t, (None, None))[0] for t in tasks]
        errors = [scores[label].get(t, (None, None))[1] for t in tasks]
        ax.bar(
            x + (i - (len(labels) - 1) / 2) * width,
            [np.nan if v is None else v for v in values],
            width,
            yerr=[0.0 if e is None else e for e in errors],
            capsize=2,
            label=label,
        )
    for j, task in enumerate(tasks):
        if chance.get(task) is not None:
            ax.hlines(chance[task], j - 0.45, j + 0.45, colors="black", linestyles="dashed", linewidth=1)
    ax.set_xticks(x)
    ax.set_xticklabels(["all" if t == "uniattn" else t.removeprefix("uniattn_") for t in tasks], rotation=30, ha="right")
    ax.set_ylabel(metric + (" (lower is better)" if metric == "brier_score" else ""))
    ax.set_title(f"lm-eval {metric} per task" + (" (dashed: chance)" if chance else ""))
    ax.legend(fontsize="small")
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")  # "PNG to write", whatever --plot ends in
    finally:
        plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="[LABEL=]results JSON, eval dir or evaluated checkpoint dir")
    parser.add_argument("--metric", default="acc", choices=METRICS, help="metric to compare (default %(default)s)")
    parser.add_argument("--plot", type=Path, default=Path("compare.png"), help="PNG to write (default %(default)s)")
    parser.add_argument("--out", type=Path, help="also write the markdown table to this file")
    args = parser.parse_args(argv)
    try:
        labels, order, scores, items, subtasks = gather(args.runs, args.metric)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    # Chance is only meaningful for accuracy; Brier has no single "chance" value worth drawing.
    chance = group_chance({"group_subtasks": subtasks}, load_manifest()) if args.metric != "brier_score" else {}
    table = markdown(labels, order, scores, items, args.metric, chance)
    print(table)
    if args.out is not None:
        write_text(args.out, table)
    plot(labels, order, scores, args.metric, chance, args.plot)
    print(f"wrote {args.plot}" + (f" and {args.out}" if args.out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
