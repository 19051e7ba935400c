"""Render the GPU benchmark's JSON (``uniattn.tools.bench``) as markdown tables and PNG plots."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def render(results: dict, out: Path) -> str:
    env, rows = results["env"], results["rows"]
    lines = [
        "# GPU benchmark: stock transformers vs UniAttn",
        "",
        *(f"Earlier part: `{e['command']}` (commit {e.get('commit', '?')}, copy bandwidth "
          f"{e.get('copy_bandwidth_TBps', '?')} TB/s)  " for e in env.get("earlier_parts", [])),
        f"Command: `{env['command']}` (commit {env.get('commit', '?')})  ",
        f"Card: {env['gpu']}, driver {env['driver']}; torch {env['torch']}, transformers {env['transformers']}; "
        f"bf16, SDPA, random weights. Measured copy bandwidth {env['copy_bandwidth_TBps']} TB/s."
        + (f" Triton {env['triton']}; UniAttn's decode kernel: {env['decode_kernel']}." if "triton" in env else "")
        + (" UniAttn and stock on its kernel serve with fused projections (Q/K/V, V/W_c, gate/up; "
           "`uniattn.fuse_projections`), which the plain stock column does not have."
           if env.get("fused_projections") else ""),
        "",
        "Times are medians of repeated runs timed with CUDA events after warm-up. *ideal* is the byte-model "
        "ratio (weights + KV bytes read per decode step; runs with a decode kernel named above leave out the "
        "input embedding table, of which a step reads one row per sequence); *BW %* is the byte-model time at "
        "the measured copy bandwidth over the measured time. Compiled points are compiled afresh with static "
        "shapes; where a row says so, their stock column is plain stock transformers compiled in a process of "
        "its own (`uniattn.tools.bench_stock`).",
        "",
    ]
    by = {}
    for r in rows:
        by.setdefault(r["what"], []).append(r)
    if "kv_bytes_per_token" in by:
        # A windowed model has one row per context (sliding layers keep only their window, a follower its
        # leader's); rows without a context come from runs before that and count every token in every layer.
        lines += ["## KV cache and weights", "",
                  "KV bytes per token (bf16) as the transformers `DynamicCache` holds them after `context` tokens "
                  "(`uniattn.tools.kv_report`'s accounting; one row where no layer has a window; context `-`: a run "
                  "from before that accounting, counting every token in every layer).", "",
                  "| model / layout | context | KV bytes per token stock | UniAttn | change | weights stock GiB | UniAttn GiB |",
                  "|---|---|---|---|---|---|---|"]
        weights = {r["model"]: r for r in by.get("weight_bytes", [])}
        for r in by["kv_bytes_per_token"]:
            w = weights.get(r["model"], {})
            lines.append(f"| {r['model']} | {r.get('context', '-')} | {r['stock']:,.1f} | {r['uniattn']:,.1f} "
                         f"| {r['uniattn'] / r['stock'] - 1:+.2%} "
                         f"| {_fmt(w.get('stock', 0) / 2**30)} | {_fmt(w.get('uniattn', 0) / 2**30)} |")
        lines.append("")
    if "prefill_ms" in by:
        lines += ["## Prefill (batch 1)", "", "| model / layout | tokens | stock ms | stock + grouped ms | UniAttn ms | ratio | peak GiB stock | UniAttn |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in by["prefill_ms"]:
            lines.append(f"| {r['model']} | {r['context']} | {_fmt(r['stock'])} | {_fmt(r.get('stock_grouped'))} | {_fmt(r['uniattn'])} "
                         f"| {r['uniattn'] / r['stock']:.3f} | {_fmt(r['stock_peak_GiB'])} | {_fmt(r['uniattn_peak_GiB'])} |")
        lines.append("")
    if "train_step_ms" in by:
        lines += ["## Training step (forward + backward, batch 1, gradient checkpointing)", "",
                  "| model / layout | tokens | stock ms | stock + grouped ms | UniAttn ms | ratio |", "|---|---|---|---|---|---|"]
        for r in by["train_step_ms"]:
            lines.append(f"| {r['model']} | {r['context']} | {_fmt(r['stock'])} | {_fmt(r.get('stock_grouped'))} "
                         f"| {_fmt(r['uniattn'])} | {r['uniattn'] / r['stock']:.3f} |")
        lines.append("")
    if "decode_ms" in by:
        lines += ["## Decode, ms per token", "",
                  "*stock + grouped*: the stock model on UniAttn's decode kernel (`attn_implementation=\"uniattn_sdpa\"`; "
                  "with fused projections where the header says so); "
                  "*method* = UniAttn / (stock + grouped), the method's own share on the same kernels.", "",
                  "| model / layout | cache | batch | context | stock ms | stock + grouped ms | UniAttn ms | UniAttn / stock | method | ideal "
                  "| BW % stock | BW % stock + grouped | BW % UniAttn | limit ms stock / UniAttn |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in by["decode_ms"]:
            if r.get("oom"):
                lines.append(f"| {r['model']} | {r['mode']} | {r['batch']} | {r['context']} | OOM |" + " |" * 9)
                continue
            mode = r["mode"] + (" (stock: own process)" if r.get("stock_source", "").endswith("own process") else "")
            lines.append(f"| {r['model']} | {mode} | {r['batch']} | {r['context']} | {_fmt(r['stock'])} | {_fmt(r.get('stock_grouped'))} "
                         f"| {_fmt(r['uniattn'])} | {r['ratio']:.3f} | {_fmt(r.get('method_ratio'), '.3f')} | {r['ideal_ratio']:.3f} "
                         f"| {r['stock_bw_frac']:.0%} | {r.get('stock_grouped_bw_frac', 0):.0%} | {r['uniattn_bw_frac']:.0%} "
                         f"| {r['limit_ms_stock']:.2f} / {r['limit_ms_uniattn']:.2f} |")
        lines.append("")
    for key, title in (("generate_tokens_per_s", "generate() tokens/s (batch 8, 1024-token prompt, 128 new, dynamic cache)"),
                       ("largest_batch", "Largest batch that fits (static cache)")):
        if key in by:
            lines += [f"## {title}", "", "| model / layout | stock | stock + grouped | UniAttn | UniAttn vs stock |", "|---|---|---|---|---|"]
            bounds = False
            for r in by[key]:
                extra = f" at {r['context']} tokens" if "context" in r else ""
                cell = {name: ("≥ " if r.get(f"{name}_lower_bound") else "") + _fmt(r[name], ".1f")
                        for name in ("stock", "uniattn")}
                bound = any(r.get(f"{name}_lower_bound") for name in cell)
                bounds |= bound
                change = "-" if bound else f"{r['uniattn'] / max(r['stock'], 1e-9) - 1:+.1%}"
                lines.append(f"| {r['model']}{extra} | {cell['stock']} | {_fmt(r.get('stock_grouped'), '.1f')} "
                             f"| {cell['uniattn']} | {change} |")
            if bounds:
                lines += ["", "≥: the bisection for the largest batch ran out of the run's `--minutes`; that batch "
                          "fits, a larger one may."]
            lines.append("")
    for r in by.get("not_measured", []):
        lines += [f"Not measured ({r['model']}; past the run's `--minutes` budget): {', '.join(r['items'])}.", ""]
    png = _plot(by.get("decode_ms", []), out)
    if png:
        lines += [f"![decode]({png.name})", ""]
    return "\n".join(lines)


def _plot(rows, out: Path):
    rows = [r for r in rows if not r.get("oom")]
    if not rows:
        return None
    try:
        import matplotlib
    except ImportError:  # the GPU image has none: render the plot later with `python -m uniattn.tools.bench_report`
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    labels = [f"{r['model'].split()[0]}\n{' '.join(r['model'].split()[1:])}\n{r['mode']} b{r['batch']} {r['context'] // 1024}k" for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.27 for x in xs], [r["ratio"] for r in rows], width=0.27, label="UniAttn / stock")
    ax.bar([x for x in xs], [r.get("method_ratio", float("nan")) for r in rows], width=0.27,
           label="UniAttn / stock on the same grouped kernel")
    ax.bar([x + 0.27 for x in xs], [r["ideal_ratio"] for r in rows], width=0.27, label="byte-model ideal")
    ax.set_xticks(list(xs), labels, fontsize=5)
    ax.set_ylabel("decode time ratio")
    ax.axhline(1.0, color="k", lw=0.5)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out.parent / f"{out.name}_decode.png"
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


if __name__ == "__main__":
    src = Path(sys.argv[1])
    print(render(json.loads(src.read_text()), src.with_suffix("")))
