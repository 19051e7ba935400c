"""The one UniAttn attention mechanism, shared by LLaMA, Mistral and Gemma-2.

* ``SoftmaxAttentionMixin`` goes on top of a family's stock attention class for
  ordinary and leader layers. Its forward is the stock computation (GQA, RoPE,
  Mistral / Gemma-2 sliding windows, Gemma-2 soft-capping, any
  ``ALL_ATTENTION_FUNCTIONS`` kernel). A leader additionally publishes a
  ``LeaderState`` (post-RoPE Q, the full K after the cache update, the mask and
  the kernel arguments, and P itself when the kernel materialised it) into the
  per-forward ``uniattn_states`` dict that the model passes to every layer.
* ``FollowerAttention`` has no ``q_proj``/``k_proj``: it reads its leader's
  state, projects only V (cached V-only), and computes ``P_leader @ V`` either
  from the materialised P (eager, the reference path) or by calling the same
  fused kernel with the leader's Q and K (no T x T matrix is built). It returns
  ``o_proj(P V) + W_c u``, so the stock decoder layer places the compensation
  exactly where the spec wants it for each family; with
  ``superblock_compensation=False`` (Softmax unification only) it has no ``W_c``
  and returns ``o_proj(P V)``.
* ``KVSharingFollowerAttention`` is the cross-layer KV sharing (CLA) baseline on
  the same layout: no ``k_proj``/``v_proj`` and no cache of its own; it attends
  with its own RoPE'd Q over the leader's K and V, without compensation.
* ``DropFollowerAttention`` is the layer-dropping (LLMDrop) baseline: the
  follower's attention sub-layer is removed (no parameters, no cache, no leader
  state) and returns zeros, so the stock layer computes ``h = x`` followed by
  its MLP part (Gemma-2's ``post_attention_layernorm`` of zeros is zero). It is
  a module rather than a patched decoder layer so that the stock layer code,
  gradient checkpointing, caches and checkpoints stay the same for every kind.

Shipped inside saved checkpoints: only relative imports of sibling files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, rotate_half
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .triton_linear import linear as decode_linear  # `from .x import` form: saved checkpoints ship x.py
from .kernels import (DECODE_MAX_QUERIES, GROUPED_FLEX, GROUPED_SDPA, DecodeRows, grouped_apply,  # noqa: F401
                      grouped_probs)

# Kernels that cannot apply Gemma-2's attention-logit soft-cap: transformers 5.17's
# SDPA path drops the `softcap` argument silently. UniAttn models map "sdpa" to one of
# kernels.py's at construction (see core.py); this guard catches a config changed
# behind the model's back.
NO_SOFTCAP_KERNELS = ("sdpa", "paged|sdpa")


def attention_function(module: nn.Module, softcap: float | None) -> Callable:
    impl = module.config._attn_implementation
    if softcap is not None and impl in NO_SOFTCAP_KERNELS:
        raise RuntimeError(
            f"attn_implementation={impl!r} cannot apply this model's attention soft-cap ({softcap}); "
            "use model.set_attn_implementation('eager' | 'flash_attention_2' | 'flex_attention')"
        )
    return ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention_forward)


# Token rows up to which fused projections serve: where a product is one pass over its weights
# (decode). At prefill lengths fused ones made the stock model 3-4% slower on an H200 at 4k-16k
# tokens (uniattn.tools.prefill_check; docs/BENCHMARK.md).
FUSED_MAX_TOKENS = 128


def fused_outputs(module: nn.Module, group: str, x: torch.Tensor):
    """The outputs of a fused group of projections of ``x`` from one product (``fused.py``), or
    ``None`` where the module is not fused, ``x`` holds more than ``FUSED_MAX_TOKENS`` token rows,
    or a gradient is being taken."""
    weight = getattr(module, f"fused_{group}_weight", None)
    if weight is None or torch.is_grad_enabled() or x.numel() > FUSED_MAX_TOKENS * x.shape[-1]:
        return None
    return decode_linear(x, weight, getattr(module, f"fused_{group}_bias")).split(module.fused_sizes[group], dim=-1)


@dataclass
class LeaderState:
    """What a leader hands to its followers within one forward pass."""

    query: torch.Tensor  # [batch, q_heads, q_len, head_dim], post-RoPE
    key: torch.Tensor  # [batch, kv_heads, kv_len, head_dim], post-RoPE, cached past included
    value: torch.Tensor  # [batch, kv_heads, kv_len, head_dim], cached past included (read by CLA followers)
    attention_mask: torch.Tensor | None
    scaling: float
    sliding_window: int | None
    softcap: float | None
    dropout: float
    probs: torch.Tensor | DecodeRows | None  # [batch, q_heads, q_len, kv_len] when the kernel materialised it
    # (eager; explicit decode rows), or the Triton decode kernel's tile-factored rows


class SoftmaxAttentionMixin:
    """Stock attention forward for ordinary and leader layers; a leader also publishes its state."""

    is_leader: bool = False
    hands_on_rows: bool = False  # a leader whose followers reuse its probabilities: decode writes them

    def _kernel_kwargs(self) -> dict:
        # Gemma-2 stores a per-layer window (None on global layers); Mistral keeps it on the config.
        if hasattr(self, "sliding_window"):
            window = self.sliding_window
        else:
            window = getattr(self.config, "sliding_window", None)
        return {"sliding_window": window, "softcap": getattr(self, "attn_logit_softcapping", None)}

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        uniattn_states=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        qkv = fused_outputs(self, "qkv", hidden_states)
        if qkv is None:
            qkv = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        query_states, key_states, value_states = (t.view(hidden_shape).transpose(1, 2) for t in qkv)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

        extra = self._kernel_kwargs()
        dropout = self.attention_dropout if self.training else 0.0
        attn_output, attn_weights = attention_function(self, extra["softcap"])(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=dropout,
            scaling=self.scaling,
            **extra,
            **kwargs,
        )
        if self.is_leader:
            # Only probability rows are handed on: flex_attention's second output is a log-sum-exp.
            rows = isinstance(attn_weights, DecodeRows) or (
                attn_weights is not None and attn_weights.dim() == 4 and attn_weights.shape[-1] == key_states.shape[2])
            if uniattn_states is None:
                raise RuntimeError("a UniAttn leader ran without the model's `uniattn_states` hand-off dict")
            uniattn_states[self.layer_idx] = LeaderState(
                query=query_states,
                key=key_states,
                value=value_states,
                attention_mask=attention_mask,
                scaling=self.scaling,
                dropout=dropout,
                probs=attn_weights if rows else None,
                **extra,
            )

        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = self.o_proj(attn_output)
        return attn_output, attn_weights


class _FollowerBase(nn.Module):
    """What the follower kinds share: the leader hand-off, the call into the leader's kernel, the empty cache."""

    reads_leader = True  # False for a dropped attention sub-layer, which needs nothing from its leader
    reads_rows = False  # True where the leader's probability rows are applied (Softmax reuse)

    def __init__(self, config, layer_idx: int, leader_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.leader_idx = leader_idx
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.bias = getattr(config, "attention_bias", False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings=None,
        attention_mask=None,
        past_key_values=None,
        uniattn_states=None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        state = None if uniattn_states is None else uniattn_states.get(self.leader_idx)
        if state is None and self.reads_leader:
            raise RuntimeError(
                f"follower layer {self.layer_idx} found no state from its leader {self.leader_idx}: "
                "run the whole model (the leader must run first in the same forward)"
            )
        return self.follow(hidden_states, state, position_embeddings, past_key_values, **kwargs), None

    def follow(self, hidden_states, state: LeaderState, position_embeddings, past_key_values, **kwargs):
        raise NotImplementedError

    def keep_empty_cache_in_step(self, hidden_states: torch.Tensor, past_key_values) -> None:
        """Zero-width K and V for a follower that caches nothing (CLA, drop): the empty layer's
        bookkeeping (a static layer's position counter, lazy init) stays in step with the others."""
        if past_key_values is not None:
            empty = hidden_states[:, None, :, :0]  # [batch, 1, q_len, 0]
            past_key_values.update(empty, empty, self.layer_idx)

    def leader_kernel(self, query, key, value, state: LeaderState, **kwargs) -> torch.Tensor:
        """``attn(query, key, value)`` with the leader's mask, scale, window and cap (the leader's cache
        decides which keys exist, so its window applies to its followers too)."""
        out, _ = attention_function(self, state.softcap)(
            self,
            query,
            key,
            value,
            state.attention_mask,
            dropout=state.dropout,
            scaling=state.scaling,
            sliding_window=state.sliding_window,
            softcap=state.softcap,
            **kwargs,
        )
        return out


class FollowerAttention(_FollowerBase):
    """Reuses the leader's attention probabilities with its own V; adds the compensation ``W_c u``.

    With ``config.superblock_compensation=False`` (Softmax unification only) there is no
    ``compensation`` module: the follower returns ``o_proj(P V)``, which is what a zero ``W_c``
    gives, without its hidden x hidden matmul and parameters.
    """

    reads_rows = True

    def __init__(self, config, layer_idx: int, leader_idx: int):
        super().__init__(config, layer_idx, leader_idx)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=self.bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=self.bias)
        self.has_compensation = getattr(config, "superblock_compensation", True)
        if self.has_compensation:
            self.compensation = nn.Linear(config.hidden_size, config.hidden_size, bias=self.bias)
            # Zero W_c is "no compensation": what a missing W_c must mean when a checkpoint is loaded.
            self.compensation._uniattn_zero_init = True

    def follow(self, hidden_states, state, position_embeddings, past_key_values, **kwargs):
        input_shape = hidden_states.shape[:-1]
        fused = fused_outputs(self, "v_wc", hidden_states)  # (W_c u, V)
        value_states = fused[1] if fused is not None else self.v_proj(hidden_states)
        value_states = value_states.view(*input_shape, -1, self.head_dim).transpose(1, 2)
        if past_key_values is not None:
            _, value_states = past_key_values.update(value_states[..., :0], value_states, self.layer_idx)
        if state.probs is not None:
            # The leader materialised P (eager reference, or decode rows, dense or Triton's): reuse it as is.
            attn_output = grouped_apply(state.probs, value_states)
        else:
            # P_leader @ V == attn(Q_leader, K_leader, V): the fused kernel gives it without building P.
            attn_output = self.leader_kernel(state.query, state.key, value_states, state, **kwargs)
        attn_output = self.o_proj(attn_output.reshape(*input_shape, -1).contiguous())
        if not self.has_compensation:
            return attn_output
        return attn_output + (fused[0] if fused is not None else self.compensation(hidden_states))


class KVSharingFollowerAttention(_FollowerBase):
    """Cross-layer KV sharing (CLA): own Q over the leader's K and V; no compensation, no cache of its own."""

    def __init__(self, config, layer_idx: int, leader_idx: int):
        super().__init__(config, layer_idx, leader_idx)
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=self.bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=self.bias)

    def follow(self, hidden_states, state, position_embeddings, past_key_values, **kwargs):
        input_shape = hidden_states.shape[:-1]
        query = self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        query = query * cos.unsqueeze(1) + rotate_half(query) * sin.unsqueeze(1)
        self.keep_empty_cache_in_step(hidden_states, past_key_values)
        attn_output = self.leader_kernel(query, state.key, state.value, state, **kwargs)
        return self.o_proj(attn_output.reshape(*input_shape, -1).contiguous())


class DropFollowerAttention(_FollowerBase):
    """Layer dropping (LLMDrop): the attention sub-layer is gone; no parameters, no cache, no leader state.

    Returns zeros, so the stock decoder layer computes ``h = x + 0`` (LLaMA / Mistral) or
    ``h = x + post_attention_layernorm(0) = x`` (Gemma-2: RMSNorm of zeros is exactly zero),
    then its MLP part unchanged. The zeros are a zero-width sum of the input, so they stay in the
    autograd graph: the layer's (now idle) ``input_layernorm`` gets a zero gradient instead of
    none, and distributed training without ``find_unused_parameters`` does not stall on it.
    """

    reads_leader = False

    def follow(self, hidden_states, state, position_embeddings, past_key_values, **kwargs):
        self.keep_empty_cache_in_step(hidden_states, past_key_values)
        return hidden_states[..., :0].sum(dim=-1, keepdim=True).expand_as(hidden_states)
