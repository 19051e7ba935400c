"""Layout advisor: rank SuperBlock layouts ``G B E`` with exactly N followers by a cheap data-driven proxy.

    python -m uniattn.tools.layout_search --model_dir M --data F --followers 12 [--top 10] [--out R.json]
    python -m uniattn.tools.layout_search --model_dir M --data F --kv_saving 0.2     # N = round(0.2 * 2L)
    python -m uniattn.tools.layout_search --model_dir M --data F --layouts "4 14 30" "3 12 30"

Candidates: every valid ``G B E`` with ``2 <= G <= --g_max``, ``E <= L + 1`` (partial last group allowed)
and N followers, one per distinct leader/follower assignment (smallest G, B, E shown). A follower drops
only K, so the KV saving is ``N / 2L``. One pass of the base model (eager attention, fp32) captures per
layer the attention probabilities P (the module's own eager weights: mask, window, Gemma-2 soft-cap), the
normed input u, the residual stream x and the attention output a. For every pair (leader i, follower j),
``1 <= j - i < g_max``: ``delta_ij = o_proj_j((P_i - P_j) V_j)``, ``V_j = v_proj_j(u)`` (GQA as in the
model). Sums over real tokens t accumulate batch by batch, keeping only the last g_max layers' P:

* ``stream`` (default): ``mean_t ||r_t||^2 / ||x_t||^2``, r = the change delta makes to the residual stream
  (delta; for Gemma-2 ``post_attention_layernorm(a + delta) - post_attention_layernorm(a)``);
* ``attn``: ``sum_t ||delta_t||^2 / sum_t ||a_t||^2``, the follower's relative output error;
* ``compensated`` (``--proxy compensated``): the stream error left after the best per-pair linear map of u
  (ridge, float64 normal equations fitted on even-numbered samples, measured on odd ones; Gemma-2's
  post-norm linearised by its per-token gain); ~2 x pairs x hidden^2 x 8 bytes, about the same time.

A layout's score is the sum of its pair costs. Why ``stream``: later layers read the stream through an
RMSNorm, so an error matters relative to that token's stream (deep layers, with larger streams, tolerate
more), not to the follower's own attention output; a per-token ratio also keeps massive-norm tokens
(attention sinks) from hiding the rest. On SmolLM2-135M (12 layouts with 12 followers vs. the response
loss of the unified model without W_c) Spearman was 0.50 for ``stream``, 0.48 ``compensated``, 0.29
``attn``. It is a shortlist, not a verdict: confirm the top layouts with init_calc and loss_eval.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from itertools import groupby
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import DataError, collate, load_records, tokenize
from ..modeling.attention import grouped_apply
from ..modeling.layout import SuperBlockLayout

logger = logging.getLogger(__name__)
FAMILIES = ("llama", "mistral", "gemma2")
EPS = 1e-12


class UsageError(ValueError):
    """Input the tool cannot use; the message names the value and the fix."""


def enumerate_layouts(num_layers: int, followers: int, g_max: int = 6) -> list[SuperBlockLayout]:
    """Valid layouts with exactly ``followers`` followers, one per distinct leader/follower assignment."""
    seen: dict[tuple, SuperBlockLayout] = {}
    for g in range(2, g_max + 1):
        for b in range(num_layers - 1):
            for e in range(b + 2, num_layers + 2):
                whole, rest = divmod(min(e, num_layers) - b, g)
                if whole * (g - 1) + max(rest - 1, 0) != followers:  # cheap count before building
                    continue
                layout = SuperBlockLayout(g, b, e, num_layers)
                seen.setdefault(pairs_of(layout), layout)
    return list(seen.values())


def pairs_of(layout: SuperBlockLayout) -> tuple[tuple[int, int], ...]:
    return tuple((layout.leader_of(f), f) for f in layout.followers)


def max_followers(num_layers: int, g_max: int) -> int:
    return num_layers - -(-num_layers // g_max) if num_layers >= 2 else 0  # G = g_max from layer 0


# ---------------------------------------------------------------- the one pass
class PairStats:
    """Streaming float64 sums for every (leader i, follower j) pair within the pair window."""

    def __init__(self, num_layers: int, compensated: bool, device="cpu"):
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        self.attn_num, self.stream_num = z(num_layers, num_layers), z(num_layers, num_layers)
        self.attn_den, self.count, self.compensated = z(num_layers), z(num_layers), compensated
        # [fit, held-out] halves: U^T w U and token count per follower, U^T w T and sum w ||T||^2 per pair
        self.uu, self.n, self.ut, self.tt = [{}, {}], [{}, {}], [{}, {}], [{}, {}]

    def add_layer(self, j, u, x, a, v_of, own, probs_window, o_weight, post, halves):
        """One batch of follower j: u, x, a are [tokens, hidden] (real tokens); see the module docstring."""
        w = 1.0 / x.double().pow(2).sum(-1).clamp_min(EPS)
        self.attn_den[j] += a.double().pow(2).sum()
        self.count[j] += a.shape[0]
        if post is not None:
            pa = post(a)  # Gemma-2: the stream sees the normed attention output
        if self.compensated:  # Gemma-2: the norm linearised by its per-token gain ||post(a)|| / ||a||
            wc = w * pa.double().pow(2).sum(-1) / a.double().pow(2).sum(-1).clamp_min(EPS) if post is not None else w
            parts = [(u.double()[h], wc[h]) for h in halves]
            for h, (uh, wh) in enumerate(parts):
                self.uu[h][j] = self.uu[h].get(j, 0) + (uh * wh[:, None]).T @ uh
                self.n[h][j] = self.n[h].get(j, 0) + uh.shape[0]
        for i, probs_i in probs_window.items():
            delta = F.linear(v_of(probs_i) - own, o_weight)
            self.attn_num[i, j] += delta.double().pow(2).sum()
            r = post(a + delta) - pa if post is not None else delta
            self.stream_num[i, j] += (r.double().pow(2).sum(-1) * w).sum()
            for h, (uh, wh) in enumerate(parts if self.compensated else ()):
                th = -delta.double()[halves[h]]  # W_c must add back what the leader's P took away
                self.ut[h][i, j] = self.ut[h].get((i, j), 0) + (uh * wh[:, None]).T @ th
                self.tt[h][i, j] = self.tt[h].get((i, j), 0) + th.pow(2).sum(-1) @ wh

    def costs(self, ridge: float = 1e-4) -> dict[str, torch.Tensor]:
        out = {"attn": self.attn_num / self.attn_den.clamp_min(EPS)[None],
               "stream": self.stream_num / self.count.clamp_min(1)[None]}
        if self.compensated:
            comp = out["compensated"] = torch.full_like(self.attn_num, float("nan"))
            for (i, j), b in self.ut[0].items():
                if self.n[1][j] == 0:  # no held-out sample (a single record): nothing to measure on
                    continue
                a = self.uu[0][j].clone()
                a.diagonal().add_(ridge * a.diagonal().mean() + EPS)
                wm = torch.linalg.solve(a, b)  # ||U W - T||^2 on the held-out half, from its sums alone
                err = self.tt[1][i, j] - 2 * (wm * self.ut[1][i, j]).sum() + (wm * (self.uu[1][j] @ wm)).sum()
                comp[i, j] = err.clamp_min(0) / self.n[1][j]
        return out


@torch.no_grad()
def pair_statistics(model, batches, g_max: int, tokens: str = "all", compensated: bool = False, progress: bool = True) -> PairStats:
    """Run ``model`` (a stock *ForCausalLM with eager attention) once over ``batches``; accumulate pair sums."""
    layers, config = model.model.layers, model.config
    gemma = config.model_type == "gemma2"
    device = next(model.parameters()).device
    stats = PairStats(len(layers), compensated, device)
    cur: dict = {}  # per batch: real-token mask, halves, residual inputs, the sliding window of P

    def pre_hook(j):
        return lambda module, args, kwargs: cur.__setitem__(("x", j), args[0] if args else kwargs["hidden_states"])

    def attn_hook(j):
        def hook(module, args, kwargs, output):
            u, (a, probs) = kwargs.get("hidden_states", args[0] if args else None), output[:2]
            if probs is None:
                raise RuntimeError("the attention returned no probabilities: load the model with attn_implementation='eager'")
            real, window = cur["real"], cur["P"]
            v = module.v_proj(u).view(*u.shape[:2], -1, module.head_dim).transpose(1, 2)
            flat = lambda p: grouped_apply(p, v).reshape(*u.shape[:2], -1)[real]  # noqa: E731
            post = layers[j].post_attention_layernorm if gemma else None
            stats.add_layer(j, u[real], cur.pop(("x", j))[real], a[real], flat, flat(probs), window,
                            module.o_proj.weight, post, cur["halves"])
            window[j] = probs  # keep only the layers a later follower can still pair with
            window.pop(j - g_max + 1, None)
        return hook

    handles = [m for j, layer in enumerate(layers) for m in (
        layer.register_forward_pre_hook(pre_hook(j), with_kwargs=True),
        layer.self_attn.register_forward_hook(attn_hook(j), with_kwargs=True))]
    sample = 0
    try:
        for batch in tqdm(batches, desc="layout search", disable=not progress, leave=False):
            mask = batch["attention_mask"].to(device)
            real = mask.bool() if tokens == "all" else batch["labels"].to(device) != -100
            even = (torch.arange(sample, sample + mask.shape[0], device=device) % 2 == 0)[:, None].expand_as(real)[real]
            cur.clear()
            cur.update(real=real, halves=(even, ~even), P={})
            model.model(input_ids=batch["input_ids"].to(device), attention_mask=mask, use_cache=False)
            sample += mask.shape[0]
    finally:
        for h in handles:
            h.remove()
        cur.clear()
    return stats


def score(layouts, costs: dict, proxy: str) -> list[dict]:
    rows = []
    for lay in layouts:
        pairs = pairs_of(lay)
        parts = {k: float(sum(m[i, j] for i, j in pairs)) for k, m in costs.items()}
        worst = max(pairs, key=lambda p: float(costs[proxy][p]))
        rows.append({"layout": str(lay), "G": lay.size, "B": lay.begin, "E": lay.end, "leaders": lay.leaders,
                     "followers": lay.followers, "kv_saving": len(pairs) / (2 * lay.num_layers),
                     "score": parts[proxy], "components": parts, "worst_pair": list(worst)})
    rows.sort(key=lambda r: (r["score"] != r["score"], r["score"]))  # NaN (no token) last
    return rows


# ---------------------------------------------------------------- driver
def _spans(ids: list[int]) -> str:
    runs = [[i for _, i in g] for _, g in groupby(enumerate(ids), key=lambda t: t[1] - t[0])]
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def _resolve(args, config, name: str) -> tuple[list[SuperBlockLayout], int, int | None]:
    """Validate the request against the model; returns (candidates, pair window, N)."""
    n_layers, g_max = config.num_hidden_layers, args.g_max
    if g_max < 2:
        raise UsageError(f"--g_max {g_max}: a SuperBlock needs a leader and a follower; pass --g_max >= 2")
    most = max_followers(n_layers, g_max)
    n = args.followers
    if args.kv_saving is not None:
        if not 0 < args.kv_saving < 0.5:
            raise UsageError(f"--kv_saving {args.kv_saving}: UniAttn followers drop K only, so the saving is N/2L, "
                             f"in (0, 0.5); {name} allows at most {most / (2 * n_layers):.3f} with G<={g_max}")
        n = round(args.kv_saving * 2 * n_layers)
        if n == 0:
            raise UsageError(f"--kv_saving {args.kv_saving} rounds to 0 followers on {name}'s {n_layers} layers "
                             f"(2L = {2 * n_layers}); pass at least {1 / (2 * n_layers):.4f}")
    if args.layouts:
        layouts = []
        for text in args.layouts:
            try:
                g, b, e = (int(v) for v in text.split())
                layouts.append(SuperBlockLayout(g, b, e, n_layers))
            except ValueError as err:
                raise UsageError(f"--layouts {text!r} does not fit {name} ({n_layers} layers): {err}; "
                                 "give each layout as one quoted 'G B E'") from err
            if n is not None and len(layouts[-1].followers) != n:
                raise UsageError(f"--layouts {text!r} has {len(layouts[-1].followers)} followers, not the {n} asked")
        return layouts, max(lay.size for lay in layouts), n
    asked = f"--followers {n}" if args.kv_saving is None else f"--kv_saving {args.kv_saving} (N = {n} followers)"
    if n is None or not 1 <= n <= most:
        raise UsageError(f"{asked}: {name} has {n_layers} layers, so a layout with G<={g_max} has 1 to {most} "
                         f"followers; pass a value in that range (or raise --g_max)")
    layouts = enumerate_layouts(n_layers, n, g_max)
    if not layouts:
        raise UsageError(f"{asked}: no layout with G<={g_max} on {n_layers} layers gives exactly {n}")
    return layouts, g_max, n


def run(args) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"--model_dir {model_dir} has no config.json: pass a Hugging Face checkpoint directory")
    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type not in FAMILIES:
        raise UsageError(f"--model_dir {model_dir}: model_type {config.model_type!r} is not one of {', '.join(FAMILIES)}")
    layouts, window, n = _resolve(args, config, model_dir.name)
    if args.out:  # fail before the pass, not after minutes of work
        probe = Path(args.out).absolute().parent
        while not probe.exists():
            probe = probe.parent
        if Path(args.out).is_dir() or not os.access(probe, os.W_OK):
            raise UsageError(f"--out {args.out}: not a writable file path ({probe}); choose another file")
    records = load_records(args.data)[: args.num_samples]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Similar lengths per batch: eager attention costs T^2 per row, so padding is expensive.
    examples = sorted((tokenize(r, tokenizer, args.max_length) for r in records), key=lambda e: len(e.input_ids))
    batches = [collate(examples[s : s + args.batch_size], pad) for s in range(0, len(examples), args.batch_size)]
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.to(device).eval()
    logger.info("%d candidate layouts, %d samples, pair window %d", len(layouts), len(records), window)
    stats = pair_statistics(model, batches, window, args.tokens, args.proxy == "compensated")
    costs = {k: m.cpu() for k, m in stats.costs(args.ridge).items()}
    rows = score(layouts, costs, args.proxy)
    seconds = time.perf_counter() - args.started
    return {"model_dir": str(model_dir), "family": config.model_type, "num_layers": config.num_hidden_layers,
            "followers": n, "proxy": args.proxy, "pair_window": window, "samples": len(records),
            "tokens": int(stats.count[0]), "token_selection": args.tokens, "max_length": args.max_length,
            "seconds": round(seconds, 2), "data": str(args.data), "candidates": rows,
            "pair_costs": {k: [[None if j - i < 1 or j - i >= window or v != v else v for j, v in enumerate(row)]
                                for i, row in enumerate(m.tolist())] for k, m in costs.items()}}


def table(result: dict, top: int) -> str:
    extra = [k for k in ("stream", "attn", "compensated") if k != result["proxy"] and k in result["pair_costs"]]
    lines = [f"| rank | G B E | leaders | followers | KV saving | score ({result['proxy']}) | {' | '.join(extra)} | worst pair |",
             "|" + "---|" * (7 + len(extra))]
    for k, r in enumerate(result["candidates"][:top], 1):
        comps = " | ".join(f"{r['components'][c]:.4g}" for c in extra)
        lines.append(f"| {k} | {r['layout']} | {_spans(r['leaders'])} | {_spans(r['followers'])} | "
                     f"{r['kv_saving']:.1%} | {r['score']:.4g} | {comps} | {r['worst_pair'][0]}->{r['worst_pair'][1]} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", required=True, help="plain HF checkpoint (LLaMA, Mistral, Gemma-2)")
    p.add_argument("--data", required=True, help="calibration records, JSON list or JSONL (instruction/input/output)")
    p.add_argument("--followers", type=int, help="N: rank layouts with exactly N followers")
    p.add_argument("--kv_saving", type=float, help="fraction of the KV cache to save: N = round(X * 2L)")
    p.add_argument("--layouts", nargs="+", metavar="'G B E'", help="score only these layouts")
    p.add_argument("--g_max", type=int, default=6, help="largest SuperBlock size G considered")
    p.add_argument("--proxy", choices=("stream", "attn", "compensated"), default="stream", help="what the score sums")
    for flag, default in (("num_samples", 32), ("max_length", 512), ("batch_size", 8)):
        p.add_argument(f"--{flag}", type=int, default=default)
    p.add_argument("--tokens", choices=("all", "response"), default="all", help="which real tokens are counted")
    p.add_argument("--ridge", type=float, default=1e-4, help="compensated proxy: ridge relative to mean diag(U^T U)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    p.add_argument("--top", type=int, default=10, help="rows to print")
    p.add_argument("--out", help="JSON file with every candidate's score and the pair-cost matrices")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.followers is not None and args.kv_saving is not None:
        parser.error(f"--followers {args.followers} and --kv_saving {args.kv_saving} both given: pass only one")
    if args.followers is None and args.kv_saving is None and not args.layouts:
        parser.error("pass --followers N or --kv_saving X (or --layouts 'G B E' ...)")
    for flag in ("num_samples", "max_length", "batch_size", "top"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} {getattr(args, flag)}: must be at least 1")
    args.started = time.perf_counter()  # the wall time printed covers loading too
    try:
        result = run(args)
    except (UsageError, DataError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table(result, args.top))
    print(f"{len(result['candidates'])} layouts scored on {result['tokens']} tokens of {result['samples']} samples: "
          f"{result['seconds']:.1f} s wall time (loading included)")
    if args.out:
        from ..io import write_json

        print(f"wrote {write_json(args.out, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
