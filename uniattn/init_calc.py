"""Closed-form initialisation of the compensation ``W_c`` ("init calc").

For every follower, in layer order, fit ``W_c`` so that ``W_c u`` replaces what
Softmax unification took away from the residual stream (UNIATTN.md section 4):

* target: the base model's post-attention residual stream at that layer minus
  the UniAttn model's (earlier followers already compensated, this one not);
  for Gemma-2, whose compensation sits inside ``post_attention_layernorm``, that
  difference taken back through the norm to first order (below);
* input: the UniAttn model's normed layer input ``u``;
* solve ``min_W ||U W - T||^2 + lambda ||W||^2`` over every real token, from
  float64 normal equations ``U^T U`` and ``U^T T`` (memory O(hidden^2), any
  number of samples; ranks all-reduce them, so every rank solves the same system).

Gemma-2. The spec's objective ``sum_t |(x_b - x_u) + N(a_b) - N(a_u + W u)|^2`` (``N`` the post-attention
RMSNorm ``z / rho(z) * g``, ``g = 1 + weight``) is not linear in ``W``. ``N`` is linearised around ``a_b``,
where ``a_u + W u`` should land when nothing has drifted: ``N(a_b + delta) ~ N(a_b) + J delta``,
``J = G (I - n n^T) / rho`` (``n = a_b / |a_b|``, ``rho = rho(a_b)``), and the pre-norm target is
``(a_b - a_u) + delta`` with ``delta`` the least-squares solution of ``J delta = x_b - x_u``:

* least squares in the residual stream's units (``J``'s pseudo-inverse, not ``delta = rho (x_b - x_u) / g``
  projected): the spec measures the error there, after the gain ``g``;
* no radial part: ``N`` ignores scale, so ``J`` is singular along ``a_b``; a drift along ``a_b`` cannot be
  undone by growing ``a`` and is not chased;
* damped (Levenberg-Marquardt, ``GEMMA2_GAIN_DAMPING``): a channel whose gain is near zero would ask for a
  ``delta`` far outside the range where the first-order model holds (undamped, such a model's fit ended
  worse than ``W = 0``);
* with no drift (``x_b == x_u``) the target is exactly ``a_b - a_u``, the drift-free target used before.

Rows stay unweighted: scaling each token by ``1 / rho`` (``J``'s size) lowered the in-sample objective but
raised the held-out stream error on tiny random models. We have no real Gemma-2 weights: the figures in
docs/init_calc.md come from tiny random models (``python -m uniattn.tools.gemma2_init_report``), and
tests/test_init_calc_gemma2.py checks the fit against a brute-force optimum of the true objective.

``lambda`` is relative: ``ridge * mean(diag(U^T U))``. ``--ridge auto`` chooses it per follower on
held-out error: the calibration records are split (a salted hash of each record's question, so
copies of one question stay on one side) into a fit part and a held-out part; for every value of
``--ridge_grid`` ``W`` is solved on the fit statistics and its held-out mean squared error is read
exactly from the held-out sufficient statistics (``T^T T``, ``U^T T``, ``U^T U``); the ridge with the
lowest error is then refitted on both parts together. Same single pass, same all-reduce. ``auto``
is the default: in the quality study (docs/results.md) it ended 0.06 nats of held-out loss below
the seed's fixed ``--ridge 1e-4`` after training, on each of 3 seeds; ``--ridge 1e-4`` restores that.

Both models are propagated layer by layer over the whole calibration set, so the
calculation costs about two forward passes (plus the followers' attention once more),
not one pass per follower. One batch is in use at a time; between layers the batches'
residual streams and leader states wait where ``--offload`` puts them (uniattn.activations:
on the device, in host memory, or in files, so that peak memory need not grow with
``--num_samples``); a leader's state is dropped after its last follower.

    python -m uniattn.init_calc --model_dir BASE --data FILE --superblock 4 14 30 \\
        --num_layers 30 --output OUT/uniattn_init.safetensors [--save_model OUT/model] \\
        [--ridge_grid 1e-6 1e-4 1e-2 1e-1 1 10 --holdout_fraction 0.25 | --ridge 1e-4]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections import UserDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .data import DataError, collate, load_records, tokenize
from .activations import OFFLOAD_MODES, ActivationStore, choose_mode, estimate_bytes
from .eval.split import hash_fraction, split_key, train_eval_split
from .modeling import FOLLOWER

logger = logging.getLogger(__name__)

DEFAULT_RIDGE = 1e-4
DEFAULT_RIDGE_GRID = (1e-6, 1e-4, 1e-2, 1e-1, 1.0, 10.0)
DEFAULT_HOLDOUT_FRACTION = 0.25
# Not uniattn.eval.split's salt: with it, the records calibration keeps (those the evaluation split
# does not hold out) would all fall on one side of this split too.
HOLDOUT_SALT = "uniattn-init-ridge-holdout-v1"


# ---------------------------------------------------------------- statistics
class NormalEquations:
    """Streaming float64 sums for ``min_W ||U W - T||`` (with a bias column when the layer has a bias)."""

    def __init__(self, dim_in: int, dim_out: int, bias: bool, device="cpu"):
        self.bias = bias
        d = dim_in + int(bias)
        self.utu = torch.zeros(d, d, dtype=torch.float64, device=device)
        self.utt = torch.zeros(d, dim_out, dtype=torch.float64, device=device)
        self.tt = torch.zeros((), dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)

    def _design(self, u: torch.Tensor) -> torch.Tensor:
        u = u.to(self.utu.device, torch.float64)
        return torch.cat([u, torch.ones_like(u[:, :1])], dim=1) if self.bias else u

    def add(self, u: torch.Tensor, target: torch.Tensor) -> None:
        """``u``: [tokens, dim_in], ``target``: [tokens, dim_out] (real tokens only)."""
        x, t = self._design(u), target.to(self.utt.device, torch.float64)
        self.utu += x.T @ x
        self.utt += x.T @ t
        self.tt += (t * t).sum()
        self.count += x.shape[0]

    def all_reduce(self) -> None:
        if dist.is_available() and dist.is_initialized():
            for t in (self.utu, self.utt, self.tt, self.count):
                dist.all_reduce(t)

    def solve(self, ridge: float) -> torch.Tensor:
        """``X = (U^T U + lambda I)^-1 U^T T`` with ``lambda = ridge * mean(diag(U^T U))``; shape [dim_in(+1), dim_out]."""
        if self.count == 0:
            raise ValueError("no tokens were accumulated: the calibration data is empty")
        a = self.utu.clone()
        lam = ridge * a.diagonal().mean()
        a.diagonal().add_(lam)
        return torch.linalg.solve(a, self.utt)

    def residual(self, x: torch.Tensor) -> float:
        """Mean squared error per token of ``U x - T`` from the sums alone (no second pass)."""
        err = self.tt - 2 * (x * self.utt).sum() + (x * (self.utu @ x)).sum()
        return float(err / self.count)

    def target_energy(self) -> float:
        return float(self.tt / self.count)

    def merged(self, other: "NormalEquations") -> "NormalEquations":
        """The sums over both token sets (e.g. the fit part and the held-out part)."""
        out = NormalEquations.__new__(NormalEquations)
        out.bias = self.bias
        out.utu, out.utt = self.utu + other.utu, self.utt + other.utt
        out.tt, out.count = self.tt + other.tt, self.count + other.count
        return out


def select_ridge(fit: NormalEquations, held: NormalEquations, grid) -> tuple[float, list[float]]:
    """The grid ridge whose fit-part solution has the lowest held-out MSE, and every grid value's held-out MSE.

    The held-out error is exact, from the held-out sums alone:
    ``(tr(T^T T) - 2 tr(W^T U^T T) + tr(W^T U^T U W)) / count`` (float64). Ties go to the first grid value.
    """
    if fit.count == 0 or held.count == 0:
        raise ValueError(f"ridge selection needs tokens on both sides (fit {int(fit.count)}, held-out {int(held.count)})")
    errors = [held.residual(fit.solve(r)) for r in grid]
    best = min(range(len(grid)), key=lambda k: (errors[k] if math.isfinite(errors[k]) else math.inf, k))
    return float(grid[best]), errors


# ---------------------------------------------------------------- propagation
@dataclass
class Prepared:
    """One calibration batch at layer 0: embeddings and everything a decoder layer needs."""

    x: torch.Tensor
    position_embeddings: tuple
    position_ids: torch.Tensor
    masks: dict
    real: torch.Tensor  # [batch, seq] bool: the tokens the statistics and errors count
    held: torch.Tensor | None = None  # [batch, seq] bool: real tokens of held-out records (``--ridge auto``)

    def layer_kwargs(self, config, i: int) -> dict:
        return {
            "attention_mask": self.masks[mask_type(config, i)],
            "position_embeddings": self.position_embeddings,
            "position_ids": self.position_ids,
        }


def mask_type(config, i: int) -> str:
    """Which mask layer ``i`` uses, as the stock model forwards decide it."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return layer_types[i]
    return "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"


def prepare(model, batch: dict, tokens: str) -> Prepared:
    inner = model.model
    device = next(model.parameters()).device
    ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    x = inner.embed_tokens(ids)
    position_ids = torch.arange(ids.shape[1], device=device)[None].expand(ids.shape[0], -1)
    kwargs = dict(config=model.config, inputs_embeds=x, attention_mask=attn, past_key_values=None, position_ids=position_ids)
    masks = {"full_attention": create_causal_mask(**kwargs)}
    if getattr(model.config, "sliding_window", None):
        masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
    real = real_tokens(batch, tokens).to(device)
    held = None
    if "holdout" in batch:
        held = real & batch["holdout"].to(device)[:, None]
    return Prepared(x, inner.rotary_emb(x, position_ids), position_ids, masks, real, held)


def real_tokens(batch: dict, tokens: str) -> torch.Tensor:
    """[batch, seq] bool: the tokens that enter the statistics (``tokens``: "all" real tokens or the "response")."""
    return batch["attention_mask"].bool() if tokens == "all" else (batch["labels"] != -100)


def _post_attention(layer, x, attn_out, gemma: bool):
    return x + (layer.post_attention_layernorm(attn_out) if gemma else attn_out)


def _finish(layer, r, gemma: bool):
    """The MLP half of a stock decoder layer, from its post-attention residual stream."""
    if gemma:
        return r + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(r)))
    return r + layer.mlp(layer.post_attention_layernorm(r))


# Levenberg-Marquardt damping of Gemma-2's target step, relative to mean(g^2). Chosen on tiny random models:
# with every gain near 1 it costs about 0.3% of the gap to the true optimum, with a gain near 0 it keeps
# the fit near the optimum where no damping ended worse than W = 0 (0.01 and 0.1 do nearly as well).
GEMMA2_GAIN_DAMPING = 0.03
GEMMA2_OBJECTIVES = ("stream", "attention")


def gemma2_stream_target(norm, ab, au, drift, damping: float = GEMMA2_GAIN_DAMPING) -> torch.Tensor:
    """A Gemma-2 follower's linearised pre-norm target, float64 (see the module docstring).

    ``norm``: the post-attention Gemma2RMSNorm; ``ab`` / ``au``: base / UniAttn attention outputs before it
    (``au`` without this follower's ``W_c``); ``drift``: ``x_b - x_u``, the residual streams' difference.
    Returns ``ab - au + rho e``, ``e = argmin |g e - drift|^2 + mu |e|^2`` over ``e . ab = 0``
    (``mu = damping * mean(g^2)``): ``e = (g drift + lam ab) / (g^2 + mu)``, ``lam`` the Lagrange multiplier.
    """
    ab, au, drift = ab.double(), au.double(), drift.double()
    g = 1.0 + norm.weight.double()
    den = g * g + damping * (g * g).mean()
    rho = (ab.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()
    lam = -(ab * g * drift / den).sum(-1, keepdim=True) / (ab * ab / den).sum(-1, keepdim=True).clamp_min(1e-300)
    return (ab - au) + rho * (g * drift + lam * ab) / den


def _last_follower(layout, num_layers: int) -> dict[int, int]:
    """{leader: its last follower}: after that layer nobody reads the leader's state."""
    last = {}
    for i in range(num_layers):
        if layout.role(i) == FOLLOWER:
            last[layout.leader_of(i)] = i
    return last


@torch.no_grad()
def propagate(base, uni, batches, tokens="all", fit=True, ridge=DEFAULT_RIDGE, progress=True,
              ridge_grid=DEFAULT_RIDGE_GRID, offload="device", offload_dir=None,
              gemma2_objective="stream") -> list[dict]:
    """Run both models layer by layer over ``batches``; fit each follower's ``W_c`` when ``fit``.

    Every layer of either model runs once per batch, a follower's attention twice (once for its
    statistics, once, after ``W_c`` is solved, for the stream that goes on), so only one batch's
    activations are in use at a time; between layers they wait in an ``ActivationStore``
    (``offload``: device, cpu or disk; see uniattn.activations). Returns one record per follower:
    the least-squares fit (target energy and residual per token before / after) and the relative
    residual-stream error ``sum ||r_base - r_uni||^2 / sum ||r_base||^2`` after the follower's attention.

    ``ridge="auto"``: every batch carries ``holdout`` ([batch] bool, which records are held out);
    each follower's ridge is the ``ridge_grid`` value with the lowest held-out error of the
    fit-part solution (``select_ridge``), refitted on all tokens; the record adds ``ridge``,
    ``holdout_mse`` (one per grid value), ``holdout_target_mse`` (``W_c = 0``) and the token counts.

    Gemma-2: ``gemma2_objective="stream"`` fits the spec's residual-stream objective, linearised (module
    docstring; ``target_mse`` / ``fit_mse`` are then in pre-norm units); ``"attention"`` is the drift-free
    target ``a_b - a_u`` used before, kept only to measure against.
    """
    if gemma2_objective not in GEMMA2_OBJECTIVES:
        raise ValueError(f"gemma2_objective {gemma2_objective!r}: choose one of {', '.join(GEMMA2_OBJECTIVES)}")
    auto = fit and ridge == "auto"
    if auto and any("holdout" not in b for b in batches):
        raise ValueError("ridge='auto' needs every batch to carry a 'holdout' row mask (make_batches(..., holdout=...))")
    config = uni.config
    device = next(uni.parameters()).device  # not from a batch: a rank may have none
    layout = config.superblock_layout
    gemma = config.base_model_type == "gemma2"
    last_use = _last_follower(layout, config.num_hidden_layers)
    report = []
    with ActivationStore(offload, device, offload_dir) as store:
        for k, b in enumerate(batches):
            x = prepare(uni, b, tokens).x
            store.put(k, xb=x, xu=x.clone(), states=UserDict())
        for i in tqdm(range(config.num_hidden_layers), desc="init calc" if fit else "propagate",
                      disable=not progress, leave=False):
            bl, ul = base.model.layers[i], uni.model.layers[i]
            if layout.role(i) != FOLLOWER:
                for k, b in enumerate(batches):
                    p, d = prepare(uni, b, tokens), store.get(k)
                    kw = p.layer_kwargs(config, i)
                    store.put(k, xb=bl(d["xb"], **kw), xu=ul(d["xu"], uniattn_states=d["states"], **kw),
                              states=d["states"])
                continue
            comp = ul.self_attn.compensation
            extra, eq = {}, None
            if fit:
                eq, eq_held = _statistics(uni, bl, ul, batches, store, i, tokens, gemma, auto, gemma2_objective)
                if auto:
                    chosen, errors = select_ridge(eq, eq_held, ridge_grid)
                    extra = {"ridge": chosen, "holdout_mse": errors, "holdout_target_mse": eq_held.target_energy(),
                             "fit_tokens": int(eq.count), "holdout_tokens": int(eq_held.count)}
                    logger.info("follower %d: ridge %g (held-out MSE %.4g; W_c=0 %.4g; grid %s)", i, chosen,
                                errors[list(ridge_grid).index(chosen)], extra["holdout_target_mse"],
                                " ".join(f"{r:g}:{e:.4g}" for r, e in zip(ridge_grid, errors)))
                    eq = eq.merged(eq_held)  # refit with the chosen ridge on every token
                    x = eq.solve(chosen)
                else:
                    x = eq.solve(ridge)
                before, after = eq.target_energy(), eq.residual(x)
                comp.weight.copy_(x[: config.hidden_size].T.to(comp.weight.dtype))
                if comp.bias is not None:
                    comp.bias.copy_(x[config.hidden_size].to(comp.bias.dtype))
            err = torch.zeros(2, dtype=torch.float64, device=device)
            for k, b in enumerate(batches):
                p, d = prepare(uni, b, tokens), store.get(k)
                kw = p.layer_kwargs(config, i)
                rb = _post_attention(bl, d["xb"], bl.self_attn(hidden_states=bl.input_layernorm(d["xb"]), **kw)[0], gemma)
                u = ul.input_layernorm(d["xu"])
                ru = _post_attention(ul, d["xu"], ul.self_attn(u, uniattn_states=d["states"], **kw)[0], gemma)
                diff, ref = (rb - ru)[p.real].double(), rb[p.real].double()
                err += torch.stack([(diff * diff).sum(), (ref * ref).sum()]).to(err.device)
                states = d["states"]
                if last_use.get(layout.leader_of(i)) == i:
                    del states[layout.leader_of(i)]  # its last follower has read it
                store.put(k, xb=_finish(bl, rb, gemma), xu=_finish(ul, ru, gemma), states=states)
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(err)
            row = {"layer": i, "leader": layout.leader_of(i), "stream_rel_error": float(err[0] / err[1])}
            if fit:
                row.update(tokens=int(eq.count), target_mse=before, fit_mse=after, **extra)
            report.append(row)
    return report


def _statistics(uni, bl, ul, batches, store, i, tokens, gemma, auto, gemma2_objective="stream"):
    """Follower ``i``'s normal equations over every batch, all-reduced over ranks: the fit part, and with
    ``auto`` the held-out part (else None). The follower's ``W_c`` is still zero here."""
    config, comp = uni.config, ul.self_attn.compensation
    device = next(uni.parameters()).device

    def equations():  # hidden^2 float64 sums: a second set only when a held-out part needs one
        return NormalEquations(config.hidden_size, config.hidden_size, comp.bias is not None, device=device)

    eq, eq_held = equations(), (equations() if auto else None)
    for k, b in enumerate(batches):
        p, d = prepare(uni, b, tokens), store.get(k)
        kw = p.layer_kwargs(config, i)
        ab = bl.self_attn(hidden_states=bl.input_layernorm(d["xb"]), **kw)[0]
        u = ul.input_layernorm(d["xu"])
        au = ul.self_attn(u, uniattn_states=d["states"], **kw)[0] - comp(u)  # without this follower's W_c
        if gemma and gemma2_objective == "stream":
            target = gemma2_stream_target(ul.post_attention_layernorm, ab, au, d["xb"] - d["xu"])
        elif gemma:
            target = ab - au  # "attention": the drift-free target used before, kept to measure against
        else:
            target = _post_attention(bl, d["xb"], ab, gemma) - _post_attention(ul, d["xu"], au, gemma)
        if auto:
            fit_part = p.real & ~p.held
            eq.add(u[fit_part], target[fit_part])
            eq_held.add(u[p.held], target[p.held])
        else:
            eq.add(u[p.real], target[p.real])
    eq.all_reduce()
    if auto:
        eq_held.all_reduce()
    return eq, eq_held


# ---------------------------------------------------------------- driver
def make_batches(records, tokenizer, max_length: int, batch_size: int, holdout: list[bool] | None = None) -> list[dict]:
    """Padded batches in record order; with ``holdout`` (one flag per record) each batch also carries
    ``holdout`` ([batch] bool), so the batches, and the forward passes, are the same with and without it."""
    examples = [tokenize(r, tokenizer, max_length) for r in records]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = [collate(examples[s : s + batch_size], pad) for s in range(0, len(examples), batch_size)]
    if holdout is not None:
        for k, b in enumerate(batches):
            b["holdout"] = torch.tensor(holdout[k * batch_size : k * batch_size + len(b["input_ids"])], dtype=torch.bool)
    return batches


def holdout_score(record) -> float:
    """A number in [0, 1), fixed per record and equal for copies of one question (``split_key``)."""
    return hash_fraction(split_key(record), HOLDOUT_SALT)


def holdout_flags(records, fraction: float) -> list[bool]:
    """Which calibration records ``--ridge auto`` holds out to choose the ridge."""
    return [holdout_score(r) < fraction for r in records]


def parse_ridge_options(args) -> tuple[float | str, tuple[float, ...], float]:
    """``--ridge``, ``--ridge_grid``, ``--holdout_fraction`` checked; ``ValueError`` naming the value and the fix."""
    default_grid = " ".join(f"{r:g}" for r in DEFAULT_RIDGE_GRID)

    def positive(text, what, fix):
        try:
            value = float(text)
        except (TypeError, ValueError):
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{what} {text!r} is not a positive number; {fix}")
        return value

    ridge = "auto" if args.ridge is None else args.ridge if isinstance(args.ridge, float) else str(args.ridge).strip()
    if not (isinstance(ridge, str) and ridge.lower() == "auto"):
        ridge = positive(ridge, "--ridge",
                         f"pass a positive float (relative to mean diag(U^T U), e.g. {DEFAULT_RIDGE:g}) or auto")
    else:
        ridge = "auto"
    grid_text = args.ridge_grid if args.ridge_grid is not None else list(DEFAULT_RIDGE_GRID)
    if not grid_text:
        raise ValueError(f"--ridge_grid is empty; give at least one positive ridge, e.g. --ridge_grid {default_grid}")
    grid = tuple(positive(r, "--ridge_grid value", f"pass positive relative ridges, e.g. --ridge_grid {default_grid}")
                 for r in grid_text)
    if len(set(grid)) != len(grid):
        raise ValueError(f"--ridge_grid {' '.join(map(str, grid_text))} repeats a value; list each ridge once")
    try:
        fraction = float(args.holdout_fraction)
    except (TypeError, ValueError):
        fraction = math.nan
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"--holdout_fraction {args.holdout_fraction!r} is outside (0, 1); "
                         f"pass e.g. {DEFAULT_HOLDOUT_FRACTION}")
    return ridge, grid, fraction


def shard(items: list, rank: int, world: int) -> list:
    return items[rank::world]


def load_models(model_dir, superblock, dtype, device):
    from transformers import AutoConfig, AutoModelForCausalLM

    from .convert import load_converted

    base_config = AutoConfig.from_pretrained(model_dir)
    # Stock SDPA drops Gemma-2's attention soft-cap; the base must be computed exactly.
    attn = "eager" if getattr(base_config, "attn_logit_softcapping", None) else "sdpa"
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn).to(device).eval()
    uni, _ = load_converted(model_dir, superblock, dtype)
    uni.set_attn_implementation(attn)
    return base, uni.to(device).eval()


def run(args) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    from .convert import save_checkpoint, uniattn_config_from
    from .init_file import save_init

    ridge, grid, fraction = parse_ridge_options(args)
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"--model_dir {model_dir} has no config.json: pass a Hugging Face checkpoint directory")
    base_config = AutoConfig.from_pretrained(model_dir)
    if args.num_layers is not None and args.num_layers != base_config.num_hidden_layers:
        raise ValueError(
            f"layer count {args.num_layers} does not match the model in {model_dir}, which has "
            f"{base_config.num_hidden_layers} layers; pass {base_config.num_hidden_layers}"
        )
    layout = uniattn_config_from(base_config, args.superblock).superblock_layout  # validates G B E early
    records = load_records(args.data)
    if not args.include_eval_items:
        # Calibration fits parameters: keep the evaluation tasks' held-out items out of it.
        records, held_out = train_eval_split(records)
        logger.info("calibration uses the training split: %d records (%d held out for evaluation)",
                    len(records), len(held_out))
    if args.skip:
        records = records[args.skip :]
    records = records[: args.num_samples]
    if not records:
        raise DataError(f"{args.data} has no records left after --skip {args.skip}")
    _check_writable(Path(args.output))
    if args.save_model:
        _check_writable(Path(args.save_model))

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    flags = holdout_flags(records, fraction) if ridge == "auto" else None
    all_batches = make_batches(records, tokenizer, args.max_length, args.batch_size, holdout=flags)
    split = {}
    if ridge == "auto":
        # Every rank sees every batch here, so every rank raises the same error before any model is loaded.
        held_tokens = sum(int((real_tokens(b, args.tokens) & b["holdout"][:, None]).sum()) for b in all_batches)
        fit_tokens = sum(int(real_tokens(b, args.tokens).sum()) for b in all_batches) - held_tokens
        n_held = sum(flags)
        empty = [side for side, count in (("fit", fit_tokens), ("held-out", held_tokens)) if count == 0]
        if empty and args.ridge is None:
            # The default asked for no split, so a calibration set too small to split falls back to the seed's ridge.
            logger.warning("%d calibration records are too few to hold any out for choosing the ridge; using the "
                           "fixed --ridge %g (pass more --num_samples to choose it from data)", len(records), DEFAULT_RIDGE)
            ridge, flags = DEFAULT_RIDGE, None
            for b in all_batches:  # the same batches, without the split
                del b["holdout"]
        elif empty:
            side = empty[0]
            raise ValueError(
                f"--holdout_fraction {fraction:g} leaves the {side} part without {args.tokens} tokens "
                f"({len(records) - n_held} fit / {n_held} held-out records of {len(records)}); "
                f"use more --num_samples, a {'smaller' if side == 'fit' else 'larger'} --holdout_fraction, "
                "or a fixed --ridge")
    if ridge == "auto":
        split = {"ridge_grid": list(grid), "holdout_fraction": fraction, "fit_records": len(records) - n_held,
                 "holdout_records": n_held, "fit_tokens": fit_tokens, "holdout_tokens": held_tokens}
        logger.info("--ridge auto: %d fit / %d held-out records (%d / %d tokens), grid %s", len(records) - n_held,
                    n_held, fit_tokens, held_tokens, " ".join(f"{r:g}" for r in grid))
    batches = shard(all_batches, rank, world)
    base, uni = load_models(model_dir, args.superblock, dtype, device)
    logger.info("%s; %d samples (%d batches on this rank)", layout.describe(), len(records), len(batches))

    c = uni.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    need = estimate_bytes(batches, c.hidden_size, torch.tensor([], dtype=dtype).element_size(),
                          (c.num_attention_heads + 2 * c.num_key_value_heads) * head_dim)
    offload = choose_mode(args.offload, device, need, int(args.offload_budget_gb * 2**30))
    logger.info("activations between layers: %s (about %.2f GiB on this rank)", offload, need / 2**30)
    start = time.perf_counter()
    report = propagate(base, uni, batches, tokens=args.tokens, fit=True, ridge=ridge, ridge_grid=grid,
                       progress=rank == 0, offload=offload, offload_dir=args.offload_dir)
    seconds = time.perf_counter() - start

    tensors = {n: p.detach().float().cpu() for n, p in uni.state_dict().items() if ".compensation." in n}
    meta = {
        "samples": len(records), "max_length": args.max_length, "tokens": report[0]["tokens"],
        "token_selection": args.tokens, "ridge": ridge, **split, "dtype": args.dtype, "world_size": world,
        "seconds": round(seconds, 2), "offload": offload, "data": str(args.data),
        "peak_device_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "followers": report,
    }
    if rank == 0:
        save_init(args.output, tensors, uni.config, extra=meta)
        if args.save_model:
            save_checkpoint(uni, args.save_model, tokenizer_from=model_dir, overwrite=args.overwrite)
    return meta


def _check_writable(path: Path) -> None:
    parent = path.parent if path.parent != Path("") else Path(".")
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise PermissionError(f"cannot write {path}: {probe} is not a writable folder; choose another --output / OUTPUT_DIR")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", required=True, help="plain HF checkpoint (LLaMA, Mistral, Gemma-2)")
    p.add_argument("--data", required=True, help="calibration records, JSON list or JSONL (instruction/input/output)")
    p.add_argument("--superblock", nargs=3, type=int, required=True, metavar=("G", "B", "E"))
    p.add_argument("--num_layers", type=int, default=None, help="the seed's L: checked against the model's layer count")
    p.add_argument("--output", required=True, help="safetensors file for the W_c tensors and metadata")
    p.add_argument("--save_model", default=None, help="also write a ready UniAttn checkpoint with W_c in place")
    p.add_argument("--overwrite", action="store_true", help="replace --save_model if it exists")
    p.add_argument("--num_samples", type=int, default=256, help="calibration records to use (from the start)")
    p.add_argument("--skip", type=int, default=0, help="records to skip before taking the sample")
    p.add_argument("--include_eval_items", action="store_true",
                   help="also calibrate on records the evaluation tasks hold out (uniattn.eval.split)")
    p.add_argument("--max_length", type=int, default=320, help="tokens per record (prompt + response)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--tokens", choices=("all", "response"), default="all", help="which real tokens enter the fit")
    p.add_argument("--ridge", default=None,
                   help="ridge, relative to the mean diagonal of U^T U (a positive float), or 'auto': per follower, "
                        "the --ridge_grid value with the lowest error on held-out calibration records. Default: "
                        f"auto (docs/results.md: it beats the seed's fixed ridge after training); --ridge {DEFAULT_RIDGE:g} "
                        "restores the seed's recipe. A default run on too few records to split uses that fixed ridge")
    p.add_argument("--ridge_grid", nargs="*", default=None, metavar="R",
                   help="--ridge auto: relative ridges to try (default: %s)"
                        % " ".join(f"{r:g}" for r in DEFAULT_RIDGE_GRID))
    p.add_argument("--holdout_fraction", default=DEFAULT_HOLDOUT_FRACTION,
                   help="--ridge auto: share of calibration records (by a hash of the question) held out to choose "
                        "the ridge; the chosen ridge is refitted on all records (default: %(default)s)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="forward dtype (statistics are fp64)")
    p.add_argument("--device", default="auto")
    p.add_argument("--offload", choices=OFFLOAD_MODES, default="auto",
                   help="where the batches' activations wait between layers: device, cpu (host memory), disk "
                        "(files: memory independent of --num_samples); auto: device up to --offload_budget_gb, "
                        "beyond it cpu for a GPU run and disk for a CPU run")
    p.add_argument("--offload_budget_gb", type=float, default=2.0, help="--offload auto: GiB kept on the device")
    p.add_argument("--offload_dir", default=None, help="--offload disk: folder for the temporary files (default: TMPDIR)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        meta = run(args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in meta.items() if k != "followers"}))
        auto = meta["ridge"] == "auto"
        extra_head = " ridge | held-out MSE | held-out W_c=0 |" if auto else ""
        print(f"| follower | leader | target MSE | fit MSE | stream rel. error |{extra_head}\n"
              f"|---|---|---|---|---|{'---|---|---|' if auto else ''}")
        for r in meta["followers"]:
            line = f"| {r['layer']} | {r['leader']} | {r['target_mse']:.4g} | {r['fit_mse']:.4g} | {r['stream_rel_error']:.4g} |"
            if auto:
                best = r["holdout_mse"][meta["ridge_grid"].index(r["ridge"])]
                line += f" {r['ridge']:g} | {best:.4g} | {r['holdout_target_mse']:.4g} |"
            print(line)
        print(f"wrote {args.output}" + (f" and {args.save_model}" if args.save_model else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
