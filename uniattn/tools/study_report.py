"""Tables and the quality / KV frontier plot from a ``uniattn.tools.study`` results file.

    python -m uniattn.tools.study_report outputs/study/results.json [--md docs/results_study.md --png docs/results_frontier.png]

The main table compares every arm at the main frontier point by held-out loss
(domain and general, mean ± sample sd over seeds) and by the paired per-seed
difference to plain fine-tuning and to UniAttn; a verdict line says whether
UniAttn lands within plain FT's seed-to-seed spread and whether it beats each
baseline by more than the spread. The frontier table and plot give every arm's
held-out loss against its KV saving.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from ..io import atomic_path, write_text

LABELS = {
    "base": "base (no FT)", "plain": "plain FT", "softmax": "softmax-only",
    "uniattn": "UniAttn (equal steps)", "uniattn_seed": "UniAttn, seed protocol (2 full stages)",
    "uniattn_wc0": "UniAttn from W_c = 0 (equal steps)", "uniattn_kl": "UniAttn, stage 1 = KL distillation",
    "uniattn_kl_vo": "UniAttn, stage 1 = KL distillation of W_c + follower V/O",
    "uniattn_ridge": "UniAttn, init ridge chosen on held-out error",
    "uniattn_short": "UniAttn, held-out ridge + stage 1 on 10% of the steps",
    "cla": "CLA (F/2 followers)", "drop": "layer drop (F/2 followers)",
}
SETS = ("heldout_domain", "heldout_general")


# the rows of the main-point tables, references first
ARM_ORDER = ["base", "plain", "uniattn", "uniattn_seed", "uniattn_wc0", "uniattn_kl", "uniattn_kl_vo", "uniattn_ridge",
             "uniattn_short", "softmax", "cla", "drop"]


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _sd(values):
    return statistics.stdev(values) if len(values) > 1 else 0.0


def group(results: dict, chosen: dict | None = None) -> dict:
    """{(arm, followers): {seed: result}} at each arm's chosen rate, without the advisor-check runs on other
    layouts (the learning-rate search's other runs are in the file too)."""
    out = defaultdict(dict)
    for res in results.values():
        run = res["run"]
        if run.get("layout") or (chosen and run["arm"] in chosen and run["lr"] != chosen[run["arm"]]):
            continue
        out[(run["arm"], run["followers"])][run["seed"]] = res
    return out


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):  # ties share their mean rank
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(xs: list[float], ys: list[float]) -> float:
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


def advisor_table(data: dict, advisor: dict | None) -> list[str]:
    """Post-training loss of UniAttn on several layouts with the same follower count (first seed), beside the
    layout advisor's proxy, and their rank correlation."""
    seed, main = data["seeds"][0], data["main"]
    rows = {}
    for res in data["results"].values():
        run = res["run"]
        if (run["arm"] == "uniattn" and run["seed"] == seed and run["followers"] == main
                and run["lr"] == data["chosen_lr"].get("uniattn")):
            rows[" ".join(map(str, res["layout"]))] = res
    if len(rows) < 2:
        return []
    proxy = {c["layout"]: c["score"] for c in (advisor or {}).get("candidates", [])}
    lines = ["| layout | advisor proxy | held-out domain | held-out general |", "|---|---|---|---|"]
    for layout, res in sorted(rows.items(), key=lambda kv: proxy.get(kv[0], math.inf)):
        score = f"{proxy[layout]:.4g}" if layout in proxy else "-"
        lines.append(f"| {layout} | {score} | " + " | ".join(f"{res['loss'][s]:.3f}" for s in SETS) + " |")
    known = [l for l in rows if l in proxy]
    if len(known) >= 3:
        for s in SETS:
            rho = spearman([proxy[l] for l in known], [rows[l]["loss"][s] for l in known])
            lines.append(f"\nSpearman rank correlation, proxy vs {s} loss after training ({len(known)} layouts): {rho:+.2f}")
    return lines


def kv_saving(res: dict, base_kv: int) -> float:
    return 1 - res["kv"]["cache"] / base_kv


def paired(a: dict, b: dict, key: str) -> list[float]:
    return [a[s]["loss"][key] - b[s]["loss"][key] for s in sorted(set(a) & set(b), key=str)]


def main_table(data: dict, groups: dict, base_kv: int) -> list[str]:
    main = data["main"]
    lines = [f"| arm | layout | KV saving | lr | {' | '.join(f'held-out {s[8:]}' for s in SETS)} | "
             f"{' | '.join(f'{s[8:]} vs plain (paired)' for s in SETS)} | {' | '.join(f'{s[8:]} vs UniAttn (paired)' for s in SETS)} |",
             "|---" * 10 + "|"]
    plain = groups.get(("plain", 0), {})
    uni = groups.get(("uniattn", main), {})
    for arm in ARM_ORDER:
        seeds = groups.get((arm, 0 if arm in ("plain", "base") else main))
        if not seeds:
            continue
        any_res = next(iter(seeds.values()))
        layout = " ".join(map(str, any_res["layout"])) if any_res["layout"] else "-"
        cells = [LABELS[arm], layout, f"{kv_saving(any_res, base_kv):.1%}", f"{any_res['run']['lr']:g}" if arm != "base" else "-"]
        cells += [_ms([r["loss"][s] for r in seeds.values()]) for s in SETS]
        for ref in (plain, uni):
            for s in SETS:
                d = paired(seeds, ref, s) if ref is not seeds and arm != "base" else []
                cells.append(f"{statistics.mean(d):+.3f} ± {_sd(d):.3f} (n={len(d)})" if d else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _task_mean(res: dict) -> float:
    """One model's accuracy averaged over the tasks (each task weighs the same, whatever its item count)."""
    return statistics.mean(r["acc"] for r in res["lm_eval"].values())


def _paired_mean(seeds: dict, ref: dict) -> str:
    d = [_task_mean(seeds[s]) - _task_mean(ref[s]) for s in sorted(set(seeds) & set(ref), key=str)]
    return f"{statistics.mean(d):+.3f} ± {_sd(d):.3f} (n={len(d)})" if d and seeds is not ref else "-"


def _scored(groups: dict, key) -> dict:
    seeds = groups.get(key, {})
    return seeds if seeds and all("lm_eval" in r for r in seeds.values()) else {}


def lm_eval_table(data: dict, groups: dict) -> list[str]:
    """Accuracy on every item of each shipped lm-eval task, mean ± seed spread, at the main point; the mean over
    tasks with its paired difference to plain FT."""
    rows = {arm: _scored(groups, (arm, 0 if arm in ("plain", "base") else data["main"])) for arm in ARM_ORDER}
    rows = {arm: seeds for arm, seeds in rows.items() if seeds}
    if not rows:
        return []
    tasks = sorted({t for seeds in rows.values() for r in seeds.values() for t in r["lm_eval"]})
    counts = {t: next((r["lm_eval"][t]["n"] for seeds in rows.values() for r in seeds.values() if t in r["lm_eval"]), "?")
              for t in tasks}
    lines = ["| arm | " + " | ".join(f"{t.removeprefix('uniattn_')} (n={counts[t]})" for t in tasks)
             + " | mean of tasks | mean vs plain (paired) |", "|---" * (len(tasks) + 3) + "|"]
    plain = rows.get("plain", {})
    for arm, seeds in rows.items():
        cells = [_ms([r["lm_eval"][t]["acc"] for r in seeds.values() if t in r["lm_eval"]]) for t in tasks]
        cells += [_ms([_task_mean(r) for r in seeds.values()]), _paired_mean(seeds, plain) if arm != "base" else "-"]
        lines.append(f"| {LABELS[arm]} | " + " | ".join(cells) + " |")
    return lines


def lm_eval_frontier(data: dict, groups: dict, base_kv: int) -> list[str]:
    """The mean lm-eval accuracy over tasks of every frontier arm at every point that was scored."""
    plain = _scored(groups, ("plain", 0))
    lines = ["| arm | F (UniAttn-equivalent) | layout | KV saving | mean of tasks | vs plain (paired) |", "|---" * 6 + "|"]
    keys = sorted((k for k in groups if k[0] not in ("base", "plain") and _scored(groups, k)),
                  key=lambda k: (k[1], ARM_ORDER.index(k[0])))
    for arm, f in keys:
        seeds = groups[(arm, f)]
        res = next(iter(seeds.values()))
        layout = " ".join(map(str, res["layout"])) if res["layout"] else "-"
        lines.append(f"| {LABELS[arm]} | {f} | {layout} | {kv_saving(res, base_kv):.1%} | "
                     f"{_ms([_task_mean(r) for r in seeds.values()])} | {_paired_mean(seeds, plain)} |")
    return lines if keys else []


def verdicts(data: dict, groups: dict) -> list[str]:
    out = []
    plain = groups.get(("plain", 0), {})
    for f in data["frontier"]:
        uni = groups.get(("uniattn", f), {})
        if not uni:
            continue
        for s in SETS:
            pv = [r["loss"][s] for r in plain.values()]
            uv = [r["loss"][s] for r in uni.values()]
            if pv and uv:
                gap = statistics.mean(uv) - statistics.mean(pv)
                if len(pv) < 2:
                    verdict = "one seed of plain FT: its seed spread is not measured"
                else:
                    verdict = f"{'WITHIN' if gap <= _sd(pv) else 'NOT within'} plain FT's seed spread"
                out.append(f"- F={f}, {s}: UniAttn - plain = {gap:+.3f} (plain sd {_sd(pv):.3f}): {verdict}")
            for arm in ("softmax", "cla", "drop"):
                other = groups.get((arm, f), {})
                d = paired(uni, other, s)
                if d:
                    m = statistics.mean(d)
                    out.append(f"  - vs {arm}: paired {m:+.3f} ± {_sd(d):.3f} (n={len(d)}): UniAttn {_compare(d)}")
    return out


def _compare(d: list[float]) -> str:
    """How a paired difference (this - other, lower is better) reads against its own spread."""
    m = statistics.mean(d)
    if len(d) < 2:
        return f"{'lower' if m < 0 else 'HIGHER'} (one seed, no spread)"
    if m + _sd(d) < 0:
        return "better by more than the spread"
    if m - _sd(d) > 0:
        return "WORSE by more than the spread"
    return "no difference beyond the spread"


def ablation_verdicts(data: dict, groups: dict) -> list[str]:
    """Each UniAttn variant at the main point against UniAttn's recipe, paired by seed, and against
    UniAttn's own seed-to-seed sd: the rule for a new default is a gain larger than that sd."""
    main, out = data["main"], []
    uni = groups.get(("uniattn", main), {})
    for arm in LABELS:
        other = groups.get((arm, main), {})
        if not arm.startswith("uniattn_") or not other or not uni:
            continue
        for s in SETS:
            d = paired(other, uni, s)
            if not d:
                continue
            m, sd = statistics.mean(d), _sd([r["loss"][s] for r in uni.values()])
            beats = len(d) > 1 and m + _sd(d) < 0 and -m > sd
            out.append(f"- {LABELS[arm]}, {s}: paired vs UniAttn {m:+.3f} ± {_sd(d):.3f} (n={len(d)}), "
                       f"{_compare(d)}; UniAttn's seed sd {sd:.3f}: "
                       f"{'WINS by more than the seed spread' if beats else 'no win beyond the seed spread'}")
    return out


def frontier_table(data: dict, groups: dict, base_kv: int) -> list[str]:
    lines = ["| arm | F (UniAttn-equivalent) | layout | KV saving | " + " | ".join(SETS) + " | seeds |", "|---" * 7 + "|"]
    for (arm, f), seeds in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if arm in ("base",):
            continue
        res = next(iter(seeds.values()))
        layout = " ".join(map(str, res["layout"])) if res["layout"] else "-"
        lines.append(f"| {LABELS[arm]} | {f} | {layout} | {kv_saving(res, base_kv):.1%} | "
                     + " | ".join(_ms([r['loss'][s] for r in seeds.values()]) for s in SETS) + f" | {len(seeds)} |")
    return lines


def plot(data: dict, groups: dict, base_kv: int, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, s in zip(axes, SETS):
        plain = [r["loss"][s] for r in groups.get(("plain", 0), {}).values()]
        if plain:
            m, sd = statistics.mean(plain), _sd(plain)
            ax.axhspan(m - sd, m + sd, color="grey", alpha=0.25, label="plain FT (mean ± sd)")
            ax.axhline(m, color="grey", lw=1)
        for arm in ("uniattn", "softmax", "cla", "drop", "uniattn_kl", "uniattn_kl_vo", "uniattn_ridge", "uniattn_short",
                    "uniattn_wc0", "uniattn_seed"):
            pts = sorted((kv_saving(next(iter(v.values())), base_kv), [r["loss"][s] for r in v.values()])
                         for (a, f), v in groups.items() if a == arm)
            if not pts:
                continue
            xs = [100 * x for x, _ in pts]
            ys = [statistics.mean(v) for _, v in pts]
            es = [_sd(v) for _, v in pts]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=LABELS[arm],
                        ls="-" if len(pts) > 1 else "none")
        base = groups.get(("base", 0), {})
        if base:
            ax.axhline(next(iter(base.values()))["loss"][s], color="k", ls=":", lw=1, label="base (no FT)")
        ax.set_xlabel("KV cache saved (%)")
        ax.set_ylabel(f"response loss, {s.replace('_', ' ')}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{Path(data['model_dir']).name}: {data['steps']} steps x {data['batch']} records, "
                 f"seeds {sorted({r['run']['seed'] for r in data['results'].values() if r['run']['seed'] is not None})}, "
                 f"{', '.join(d for d in data.get('run_devices', [data['device']]) if d != 'unrecorded')}", fontsize=9)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=110)


def render(data: dict, advisor: dict | None = None) -> str:
    # "unrecorded": a result cached by an older version of the study, which did not record its machine.
    results = dict(data["results"])
    groups = group(results, data["chosen_lr"])
    base_kv = _base_kv(data)
    lines = [f"Model {data['model_dir']}; pool {data['pool']}; {data['steps']} optimizer steps x {data['batch']} records "
             f"(<= {data['max_length']} tokens) per arm; UniAttn stage-1 share {data['stage1_share']}; seeds configured "
             f"{data['seeds']}, measured {sorted({r['run']['seed'] for r in results.values() if r['run']['seed'] is not None})}; "
             f"runs on {', '.join(data.get('run_devices', [data['device']]))}; results collected on {data['device']} "
             f"({json.dumps(data['versions'])}).", "",
             f"### Main point: UniAttn with {data['main']} followers", "", *main_table(data, groups, base_kv), "",
             "### Verdicts", "", *verdicts(data, groups), "",
             f"### Stage-1 and init variants against UniAttn's recipe ({data['main']} followers)", "",
             *(ablation_verdicts(data, groups) or ["(none measured)"]), "",
             "### Frontier", "", *frontier_table(data, groups, base_kv), "",
             "### Learning-rate search (seed %s, mean validation loss of the domain and general slices)" % data["seeds"][0], "",
             "| arm | " + " | ".join(["validation loss by lr"]) + " | chosen |", "|---|---|---|"]
    for arm, by_lr in data["validation_loss"].items():
        ordered = sorted(by_lr.items(), key=lambda kv: float(kv[0]))
        lines.append(f"| {LABELS[arm]} | {', '.join(f'{lr}: {v}' for lr, v in ordered)} | {data['chosen_lr'][arm]:g} |")
    fixed = {arm: lr for arm, lr in data["chosen_lr"].items() if arm not in data["validation_loss"]}
    if fixed:
        lines += ["", "Not searched here (fixed with `--lr_for`): " + ", ".join(f"{LABELS[a]} {lr:g}" for a, lr in fixed.items())]
    scored = lm_eval_table(data, groups)
    if scored:
        lines += ["", f"### lm-eval: accuracy on every item of the shipped tasks ({data['main']} followers; "
                  "mean ± seed spread)", "", *scored, "", "### lm-eval: mean accuracy over the tasks at every point",
                  "", *lm_eval_frontier(data, groups, base_kv)]
    check = advisor_table(data, advisor)
    if check:
        lines += ["", f"### Layout advisor check: UniAttn with {data['main']} followers on several layouts "
                  f"(seed {data['seeds'][0]})", "", *check]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path)
    p.add_argument("--md", type=Path, help="write the tables here (default: beside the results)")
    p.add_argument("--png", type=Path, help="write the frontier plot here (default: beside the results)")
    p.add_argument("--advisor", type=Path, help="`uniattn.tools.layout_search --out` JSON for the main follower count")
    args = p.parse_args(argv)
    try:
        data = json.loads(args.results.read_text())
        advisor = json.loads(args.advisor.read_text()) if args.advisor else None
        text = render(data, advisor)
    except (OSError, ValueError, KeyError, StopIteration) as err:
        print(f"error: {args.results} is not a readable study results file ({err!r}); "
              "pass the results.json that `python -m uniattn.tools.study` wrote", file=sys.stderr)
        return 2
    md = args.md or args.results.with_suffix(".md")
    png = args.png or args.results.with_name("frontier.png")
    write_text(md, text)
    plot(data, group(data["results"], data["chosen_lr"]), _base_kv(data), png)
    print(text)
    print(f"wrote {md} and {png}")
    return 0


def _base_kv(data: dict) -> int:
    groups = group(data["results"], data["chosen_lr"])
    base = groups.get(("base", 0), {})
    if base:
        return next(iter(base.values()))["kv"]["cache"]
    plain = groups.get(("plain", 0), {})
    return next(iter(plain.values()))["kv"]["cache"]


if __name__ == "__main__":
    sys.exit(main())
