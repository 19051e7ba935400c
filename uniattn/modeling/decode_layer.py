"""The serving path's decoder layer: RoPE and the static-cache write inside the Q/K/V product.

A decode step at a small batch is a chain of short kernels; between the weight products of a
LLaMA layer sat RoPE of Q and of K, two ``index_copy_`` into the cache and the cache's position
counter, a few microseconds each (docs/decode_profile_h200.md). ``FusedDecoderLayer`` goes on top
of a stock pre-norm decoder layer (``fuse_projections`` puts it there, only on LLaMA-style layers:
Gemma-2's extra norms keep the stock forward) and, for one new token per sequence over a static
cache, computes the stock layer with

1. ``triton_qkv.project``: the fused Q/K/V product (a follower's W_c/V) with RoPE applied and K/V
   written into the layer's static cache, whose position counter it advances, in one kernel;
2. ``triton_decode.decode_attend`` (a follower: ``decode_apply`` of its leader's rows);
3. the O, gate+up and down products on ``triton_linear``'s kernel, the norms, residual adds and
   ``SiLU(gate) * up`` left to Inductor (one kernel each where it fuses them).

On one H200 that step was 1.0% faster than the stock forward at batch 8 / 16k and 0.6% at 1 / 4k,
in one paired run (``decode_ab``; docs/BENCHMARK.md): not separated from the spread between runs.
``FUSE`` holds the further fusions that were measured and left off (below). Each product and
attention kernel is handed the weight the step reads after it (``link_layers`` names the next
layer's), for ``triton_linear.L2_AHEAD``'s prefetch into L2, measured slower and off by default.

It serves where the product kernel does (code that ``torch.compile`` traces, no gradient, at most
``triton_linear.MAX_ROWS`` sequences) and every piece can; anything else, a dynamic or sliding-window
cache included, takes the stock forward. ``UNIATTN_DECODE_LAYER=torch`` turns it off alone;
``UNIATTN_DECODE_LINEAR=torch`` or ``UNIATTN_DECODE_KERNEL=torch`` turn it off with the kernels. Its
results equal the stock forward's up to rounding.

Imports only sibling files, like the rest of this folder (saved checkpoints do not need it).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn
from transformers.cache_utils import StaticLayer

from . import kernels, triton_decode, triton_linear, triton_qkv
from .attention import FollowerAttention, LeaderState, SoftmaxAttentionMixin
from .cache import ValueOnlyStaticLayer
from .kernels import grouped_apply

_mode = os.environ.get("UNIATTN_DECODE_LAYER", "auto")
if _mode not in ("auto", "torch"):
    raise ValueError(f"UNIATTN_DECODE_LAYER={_mode!r} is not one of ('auto', 'torch')")

# Fusions beyond the projection to the cache, each measured on one H200 (8 rows, LLaMA-3.1-8B) and
# left off. The RMSNorm in a product's prologue (the operand loaded one tile ahead): the projection
# took 22.4 us against the plain Q+K+V product's 15.8, gate+up 102 us against 56.8. SiLU(gate) * up in
# gate+up's epilogue: 64.6 us against 56.8. A residual in O's or down's epilogue: +0.7 us. Each costs
# more than the Inductor kernel it removes (``fusion_sweep``). Merging the context splits in the
# attention kernel's last split: the step 2.9% slower at batch 8 / 16k, 8.6% at 1 / 4k (``decode_ab``).
FUSE = {"norm": False, "gated": False, "residual": False, "merge": False}


def fits(layer: nn.Module) -> bool:
    """Whether ``layer`` is a LLaMA-style pre-norm decoder layer (two RMSNorms of LLaMA's kind, a gated
    SiLU MLP), the structure the fused step computes."""
    norms = [getattr(layer, name, None) for name in ("input_layernorm", "post_attention_layernorm")]
    mlp = getattr(layer, "mlp", None)
    return (all(hasattr(n, "variance_epsilon") and isinstance(getattr(n, "weight", None), torch.Tensor) for n in norms)
            and not hasattr(layer, "pre_feedforward_layernorm") and hasattr(layer, "self_attn")
            and type(getattr(mlp, "act_fn", None)).__name__ in ("SiLUActivation", "SiLU"))


def add_tickets(layer: nn.Module, device: torch.device) -> None:
    """The int32 zeros the layer's kernels count their programs in, each kernel leaving them at zero:
    one for the projection, and one per sequence and KV head for the attention's splits."""
    kv_heads = layer.self_attn.config.num_key_value_heads
    for name, size in (("uniattn_ticket", 1), ("uniattn_tickets", triton_linear.MAX_ROWS * kv_heads)):
        layer.register_buffer(name, torch.zeros(size, dtype=torch.int32, device=device), persistent=False)
        torch._dynamo.mark_static_address(getattr(layer, name))  # mutated inside CUDA graphs


def link_layers(layers: list[nn.Module], head: Optional[nn.Module] = None) -> None:
    """Tell each fused layer what the step reads after its down product (the next layer's attention input
    weight, the output head's after the last), for the prefetch into L2 (``triton_linear.L2_AHEAD``).
    Kept in ``__dict__``, so it is no submodule: ``modules()``, ``state_dict()`` and ``to()`` do not see it."""
    for layer, after in zip(layers, list(layers[1:]) + [head]):
        layer.__dict__["uniattn_after"] = after


def _next_weight(layer: nn.Module) -> Optional[torch.Tensor]:
    after = getattr(layer, "uniattn_after", None)
    if after is None:
        return None
    if isinstance(after, nn.Linear):
        return after.weight
    proj = _attention_weight(after.self_attn) if hasattr(after, "self_attn") else None
    return None if proj is None else proj[0]


def _norm(module: nn.Module) -> tuple[torch.Tensor, float]:
    return module.weight, module.variance_epsilon


class FusedDecoderLayer:
    """On top of a stock LLaMA-style decoder layer: the fused decode step where it serves (module docstring)."""

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, **kwargs):
        if _serves(self, hidden_states, attention_mask, past_key_values, position_embeddings,
                   kwargs.get("uniattn_states")):
            return _step(self, hidden_states, attention_mask, past_key_values, position_embeddings,
                         kwargs.get("uniattn_states"))
        return super().forward(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                               past_key_values=past_key_values, use_cache=use_cache,
                               position_embeddings=position_embeddings, **kwargs)


def _attention_weight(attn: nn.Module):
    """``(weight, bias, heads written out)`` of the attention input product, or ``None`` where unfused."""
    if isinstance(attn, FollowerAttention):
        if getattr(attn, "fused_v_wc_weight", None) is not None:  # [W_c; V]
            return attn.fused_v_wc_weight, attn.fused_v_wc_bias, attn.config.hidden_size // attn.head_dim
        if not attn.has_compensation:
            return attn.v_proj.weight, attn.v_proj.bias, 0
        return None
    if isinstance(attn, SoftmaxAttentionMixin) and getattr(attn, "fused_qkv_weight", None) is not None:
        return attn.fused_qkv_weight, attn.fused_qkv_bias, attn.config.num_attention_heads
    return None


def _traced() -> bool:
    """Where the kernels serve: code that torch.compile traces (``triton_linear.linear``'s rule)."""
    return torch.compiler.is_compiling()


def _serves(layer, hidden, mask, cache, position_embeddings, states) -> bool:
    if not (_traced() and _mode == "auto" and kernels._decode_kernel == "auto" and triton_linear._mode == "auto"):
        return False
    if torch.is_grad_enabled() or layer.training or hidden.dim() != 3 or hidden.shape[1] != 1:
        return False
    if cache is None or position_embeddings is None or getattr(layer, "uniattn_ticket", None) is None:
        return False
    attn, mlp = layer.self_attn, layer.mlp
    cache_layer = cache.layers[attn.layer_idx]
    if type(cache_layer) not in (StaticLayer, ValueOnlyStaticLayer) or not cache_layer.is_initialized:
        return False
    if mask is not None and (mask.dtype != torch.bool or mask.dim() != 4):
        return False
    proj = _attention_weight(attn)
    d = attn.head_dim
    if proj is None or getattr(mlp, "fused_gate_up_weight", None) is None or not (16 <= d <= 256 and d & (d - 1) == 0):
        return False
    if isinstance(attn, FollowerAttention):
        state = None if states is None else states.get(attn.leader_idx)
        if state is None or state.probs is None:
            return False
    elif getattr(attn, "attn_logit_softcapping", None) is not None:
        return False
    x = hidden.reshape(hidden.shape[0], -1)
    cos, sin = position_embeddings
    n1, n2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight

    def rows(width):  # stands for the product's input (shape, dtype, layout), which does not exist yet
        return x.new_empty(x.shape[0], width)
    return (triton_qkv.usable(x, proj[0], d, cache_layer.keys, cache_layer.values)
            and triton_linear.fusable(rows(attn.o_proj.in_features), attn.o_proj.weight, attn.o_proj.bias, x, n1, n2,
                                      proj[1])
            and triton_linear.fusable(x, mlp.fused_gate_up_weight, mlp.fused_gate_up_bias)
            and triton_linear.fusable(rows(mlp.down_proj.in_features), mlp.down_proj.weight, mlp.down_proj.bias)
            and attn.o_proj.out_features == x.shape[1] == mlp.down_proj.out_features
            and cos.shape == sin.shape == (x.shape[0], 1, d) and cos.dtype == sin.dtype == x.dtype)


def _step(layer, hidden, mask, cache, position_embeddings, states):
    attn, mlp = layer.self_attn, layer.mlp
    b = hidden.shape[0]
    x = hidden.reshape(b, -1)
    cache_layer = cache.layers[attn.layer_idx]
    keys, values = cache_layer.keys, cache_layer.values
    cos, sin = (t.view(b, -1) for t in position_embeddings)
    d = attn.head_dim
    weight, bias, n_out = _attention_weight(attn)
    follower = isinstance(attn, FollowerAttention)
    u, norm = (x, _norm(layer.input_layernorm)) if FUSE["norm"] else (layer.input_layernorm(x), None)
    out = triton_qkv.project(u, weight, bias, norm, cos, sin, keys, values, cache_layer.cumulative_length,
                             layer.uniattn_ticket, n_out=n_out, rope_out=not follower,
                             n_k=0 if follower else attn.config.num_key_value_heads, head_dim=d)
    tickets = layer.uniattn_tickets if FUSE["merge"] else None
    if follower:
        rows = states[attn.leader_idx].probs
        if isinstance(rows, triton_decode.DecodeRows):
            heads = triton_decode.decode_apply(rows, values, tickets=tickets, next_weight=attn.o_proj.weight)
        else:
            heads = grouped_apply(rows, values)
        extra = out if n_out else None
    else:
        query = out.view(b, -1, 1, d)
        heads, rows = triton_decode.decode_attend(query, keys, values, mask, attn.scaling, None,
                                                  write_rows=attn.hands_on_rows, tickets=tickets,
                                                  next_weight=attn.o_proj.weight)
        if attn.is_leader:
            states[attn.layer_idx] = LeaderState(query=query, key=keys, value=values, attention_mask=mask,
                                                 scaling=attn.scaling, dropout=0.0, probs=rows,
                                                 **attn._kernel_kwargs())
        extra = None
    heads = heads.reshape(b, -1)
    gate_up_w = mlp.fused_gate_up_weight
    if FUSE["residual"]:
        h = triton_linear.fused_linear(heads, attn.o_proj.weight, attn.o_proj.bias, residual=x, extra=extra,
                                       next_weight=gate_up_w)
    else:  # the stock order: x + (o_proj(P V) + W_c u)
        o = triton_linear.fused_linear(heads, attn.o_proj.weight, attn.o_proj.bias, next_weight=gate_up_w)
        h = x + (o if extra is None else o + extra)
    u, norm = (h, _norm(layer.post_attention_layernorm)) if FUSE["norm"] else (layer.post_attention_layernorm(h), None)
    down_w, after = mlp.down_proj.weight, _next_weight(layer)
    if FUSE["gated"]:
        act = triton_linear.fused_linear(u, gate_up_w, mlp.fused_gate_up_bias, norm=norm, gated=True,
                                         next_weight=down_w)
    else:
        gate_up = triton_linear.fused_linear(u, gate_up_w, mlp.fused_gate_up_bias, norm=norm, next_weight=down_w)
        gate, up = gate_up.chunk(2, -1)
        act = mlp.act_fn(gate) * up
    if FUSE["residual"]:
        return triton_linear.fused_linear(act, down_w, mlp.down_proj.bias, residual=h,
                                          next_weight=after).view(b, 1, -1)
    return (triton_linear.fused_linear(act, down_w, mlp.down_proj.bias, next_weight=after) + h).view(b, 1, -1)
