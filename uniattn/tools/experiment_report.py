"""Tables and plot for ``uniattn.tools.experiment``'s results.json.

    python -m uniattn.tools.experiment_report outputs/experiment_pmc_cpu/results.json [--out-dir DIR] [--name NAME]

Writes ``NAME.md`` (default ``results.md``) (per-arm means with the seed-to-seed spread, per-task
accuracies, per-seed losses, KV cache and parameters, and the comparisons the
claim is about) and ``NAME.png``, each atomically.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from ..io import atomic_path, write_text

ARM_NAMES = {
    "base": "base (no fine-tuning)", "plain": "plain FT", "softmax": "softmax-only FT (W_c = 0 frozen)",
    "uniattn": "UniAttn (init calc + 2 stages)", "uniattn_wc0": "UniAttn, W_c = 0 start (2 stages)",
    "cla": "CLA (cross-layer KV sharing)",
}
GROUPS = ("uniattn_medical", "uniattn_general")
TASKS = ("uniattn_medmcqa", "uniattn_pubmedqa", "uniattn_epistemic_reasoning", "uniattn_social_iqa",
         "uniattn_strategyqa", "uniattn_winowhy")


def by_arm(results: dict) -> dict[str, list[dict]]:
    arms: dict[str, list[dict]] = {}
    for entry in results.values():
        arms.setdefault(entry["arm"], []).append(entry)
    order = list(ARM_NAMES)
    return dict(sorted(arms.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def stats(values: list[float]) -> tuple[float, float, float]:
    """(mean, sample standard deviation or 0, range)."""
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, sd, max(values) - min(values)


def fmt(values: list[float], digits: int = 3) -> str:
    mean, sd, _ = stats(values)
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if len(values) > 1 else "")


def acc(entry: dict, task: str) -> float | None:
    return entry.get("lm_eval", {}).get(task, {}).get("acc")


def paired(arms: dict, a: str, b: str) -> str:
    """Per-seed differences a - b: every seed gives both arms the same data order, so pairs cancel its noise."""
    la = {e["seed"]: e["loss"] for e in arms[a]}
    lb = {e["seed"]: e["loss"] for e in arms[b]}
    diffs = [la[s] - lb[s] for s in sorted(set(la) & set(lb))]
    if len(diffs) < 2:
        return ""
    mean, sd, _ = stats(diffs)
    lower = sum(d < 0 for d in diffs)
    return f"; paired by seed {mean:+.3f} ± {sd:.3f}, lower in {lower} of {len(diffs)} seeds"


def verdicts(arms: dict) -> list[str]:
    """The claim in numbers: UniAttn against plain FT (spread) and against the cheaper baselines."""
    loss = {a: [e["loss"] for e in rows] for a, rows in arms.items()}
    if "uniattn" not in loss:
        return []
    u, u_sd, _ = stats(loss["uniattn"])
    if len(loss["uniattn"]) < 2:
        return ["- One seed only: no seed-to-seed spread to compare with (run two or more seeds)."]
    lines = []
    if "plain" in loss and len(loss["plain"]) > 1:
        p, p_sd, p_range = stats(loss["plain"])
        inside = abs(u - p) <= max(p_sd, u_sd)
        lines.append(f"- UniAttn − plain FT, held-out loss: {u - p:+.3f} (seed sd: plain {p_sd:.3f}, UniAttn {u_sd:.3f}; "
                     f"plain range {p_range:.3f}{paired(arms, 'uniattn', 'plain')}): UniAttn is "
                     f"{'within' if inside else 'outside'} the seed-to-seed spread of plain FT "
                     "(|difference| <= the larger seed sd).")
    for other in ("softmax", "cla", "uniattn_wc0"):
        if other in loss and len(loss[other]) > 1:
            o, o_sd, _ = stats(loss[other])
            spread = max(u_sd, o_sd)
            verdict = "beats" if o - u > spread else ("loses to" if u - o > spread else "does not separate from")
            lines.append(f"- UniAttn − {ARM_NAMES[other]}, held-out loss: {u - o:+.3f} (larger seed sd {spread:.3f}"
                         f"{paired(arms, 'uniattn', other)}): by the seed spread UniAttn {verdict} it.")
    return lines


def render(summary: dict) -> str:
    arms = by_arm(summary["results"])
    base = arms.get("base", [None])[0]
    out = [
        "| arm | lr | seeds | held-out loss | medical acc | general acc | KV cache | parameters | train s / seed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, rows in arms.items():
        cache, params = rows[0]["cache"], rows[0]["params"]
        kv = f"{cache / 2**20:.2f} MiB"
        pr = f"{params / 1e6:.2f} M"
        if base is not None and arm != "base":
            kv += f" ({cache / base['cache'] - 1:+.0%})"
            pr += f" ({params / base['params'] - 1:+.1%})"
        accs = []
        for group in GROUPS:
            values = [a for a in (acc(e, group) for e in rows) if a is not None]
            seeds_note = f" (seed {rows[0]['seed']})" if len(values) == 1 < len(rows) else ""
            accs.append(fmt(values) + seeds_note if values else "-")
        seconds = [e["train_seconds"] for e in rows if "train_seconds" in e]
        lr = summary["chosen_lr"].get(arm)
        out.append(f"| {ARM_NAMES.get(arm, arm)} | {f'{lr:g}' if lr else '-'} | {len(rows)} | "
                   f"{fmt([e['loss'] for e in rows])} | {accs[0]} | {accs[1]} | {kv} | {pr} | "
                   f"{f'{statistics.fmean(seconds):.0f}' if seconds else '-'} |")
    out += ["", "Mean ± sample standard deviation over seeds; lr: the grid point with the lowest validation loss.", "", "**The claim in numbers**", "", *verdicts(arms), ""]
    if any("lm_eval" in e for rows in arms.values() for e in rows):
        out += ["Per-task accuracy (mean over the seeds lm-eval ran on):", "",
                "| arm | " + " | ".join(t.removeprefix("uniattn_") for t in TASKS) + " |",
                "|---|" + "---|" * len(TASKS)]
        for arm, rows in arms.items():
            cells = []
            for task in TASKS:
                values = [a for a in (acc(e, task) for e in rows) if a is not None]
                cells.append(f"{statistics.fmean(values):.3f}" if values else "-")
            out.append(f"| {ARM_NAMES.get(arm, arm)} | " + " | ".join(cells) + " |")
        stderr = [e["lm_eval"][g]["acc_stderr"] for rows in arms.values() for e in rows
                  for g in GROUPS if "lm_eval" in e and "acc_stderr" in e["lm_eval"].get(g, {})]
        if stderr:
            out += ["", f"lm-eval's standard error of one model's group accuracy: {min(stderr):.3f} to {max(stderr):.3f}."]
    if summary.get("validation_loss"):
        grid = summary["lr_grid"]
        out += ["", f"Learning-rate search (validation loss, {summary.get('validation_records', '?')} records, first seed):",
                "", "| arm | " + " | ".join(f"lr {lr:g}" for lr in grid) + " |", "|---|" + "---|" * len(grid)]
        for arm, scores in summary["validation_loss"].items():
            out.append(f"| {ARM_NAMES.get(arm, arm)} | " + " | ".join(f"{scores.get(f'{lr:g}', float('nan')):.4f}"
                                                                     for lr in grid) + " |")
    out += ["", "Held-out loss per seed:", "", "| arm | " + " | ".join(f"seed {s}" for s in summary["seeds"]) + " |",
            "|---|" + "---|" * len(summary["seeds"])]
    for arm, rows in arms.items():
        per_seed = {e["seed"]: e["loss"] for e in rows}
        cells = [f"{per_seed[s]:.4f}" if s in per_seed else (f"{rows[0]['loss']:.4f}" if arm == "base" else "-")
                 for s in summary["seeds"]]
        out.append(f"| {ARM_NAMES.get(arm, arm)} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = by_arm(summary["results"])
    names = list(arms)
    has_lm_eval = any("lm_eval" in e for rows in arms.values() for e in rows)
    fig, axes = plt.subplots(1, 2 if has_lm_eval else 1, figsize=(11 if has_lm_eval else 6, 4), squeeze=False)
    ax = axes[0][0]
    for i, arm in enumerate(names):
        values = [e["loss"] for e in arms[arm]]
        ax.bar(i, statistics.fmean(values), color="tab:blue" if arm != "uniattn" else "tab:orange", alpha=0.7)
        ax.scatter([i] * len(values), values, color="black", s=12, zorder=3)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("held-out response loss (lower is better)")
    low = min(e["loss"] for rows in arms.values() for e in rows)
    ax.set_ylim(low * 0.9, None)
    if has_lm_eval:
        _plot_accuracy(axes[0][1], arms, names)
    fig.suptitle(f"SmolLM2-135M-Instruct, PMC-LLaMA, layout {' '.join(summary['superblock'])}, "
                 f"{len(summary['seeds'])} seeds ({summary['size']} size, {summary.get('device', '?')})")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)


def _plot_accuracy(ax, arms: dict, names: list[str]) -> None:
    width = 0.38
    for j, group in enumerate(GROUPS):
        means = []
        for arm in names:
            values = [a for a in (acc(e, group) for e in arms[arm]) if a is not None]
            means.append(statistics.fmean(values) if values else 0.0)
        ax.bar([i + (j - 0.5) * width for i in range(len(names))], means, width, label=group.removeprefix("uniattn_"))
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("lm-eval accuracy (mean over seeds)")
    ax.legend()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="results.json written by uniattn.tools.experiment")
    p.add_argument("--out-dir", default=None, help="default: the results file's folder")
    p.add_argument("--name", default="results", help="file stem of the table and plot")
    args = p.parse_args(argv)
    path = Path(args.results)
    if not path.is_file():
        print(f"error: {path} does not exist; run python -m uniattn.tools.experiment first", file=sys.stderr)
        return 2
    summary = json.loads(path.read_text())
    out_dir = Path(args.out_dir or path.parent)
    text = render(summary)
    md, png = out_dir / f"{args.name}.md", out_dir / f"{args.name}.png"
    write_text(md, text)
    plot(summary, png)
    print(text)
    print(f"wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
