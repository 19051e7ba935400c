"""The attention kernels UniAttn registers with transformers' attention interface.

Both serve decode queries grouped per KV head and, in a UniAttn leader, return the probability
rows as the attention weights, so its followers apply them to their own V cache without touching
K. One new token per sequence on a CUDA GPU goes to the Triton kernels of ``triton_decode.py``
(split over the context, rows tile-factored as a ``DecodeRows``); anything else, and every CPU,
takes the PyTorch reference path (``grouped_probs`` / ``grouped_apply``, dense rows).
``UNIATTN_DECODE_KERNEL=torch`` (or ``set_decode_kernel("torch")``) keeps decode on that path.
They differ in how long queries (prefill, training) are computed:

* ``"uniattn_sdpa"``: SDPA, for models without an attention-logit soft-cap. Soft-capped models
  (Gemma-2), which SDPA cannot serve (transformers 5.17 drops the cap silently), take the explicit
  path at every length, O(T^2) in memory.
* ``"uniattn_flex_attention"``: flex_attention with the soft-cap as ``score_mod`` and causal plus
  sliding window (plus padding) as a ``BlockMask``: fused, O(T) in memory. The default for Gemma-2.
  Its mask function gives long queries a ``BlockMask`` and decode queries SDPA's tensor mask, and
  the kernel follows the mask it is handed, so the two decisions cannot disagree. flex_attention
  has no backward on the CPU, so there a forward that records gradients gets the explicit path.
  On the GPU it is compiled (transformers' wrapper); on the CPU it runs uncompiled: same
  ``score_mod`` and mask semantics, none of the compile cost.

Both are usable by stock transformers models too (``attn_implementation="uniattn_sdpa"``), once
this module is imported. Shipped inside saved checkpoints: only relative imports of sibling files.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface
from transformers.utils import is_torch_flex_attn_available

from . import triton_decode
from .triton_decode import DecodeRows

# Queries per sequence up to which decode builds its probability rows explicitly: the rows are
# tiny (heads x context), a leader computes them once, and its followers then read only their own
# V cache instead of re-reading the leader's K through a fused kernel.
DECODE_MAX_QUERIES = 16

DECODE_KERNELS = ("auto", "torch")
_decode_kernel = os.environ.get("UNIATTN_DECODE_KERNEL", "auto")


def set_decode_kernel(name: str) -> None:
    """``"auto"``: the Triton decode kernels where they run; ``"torch"``: always the PyTorch path."""
    global _decode_kernel
    if name not in DECODE_KERNELS:
        raise ValueError(f"decode kernel {name!r} is not one of {DECODE_KERNELS}")
    _decode_kernel = name


if _decode_kernel not in DECODE_KERNELS:
    raise ValueError(f"UNIATTN_DECODE_KERNEL={_decode_kernel!r} is not one of {DECODE_KERNELS}")

GROUPED_SDPA = "uniattn_sdpa"
GROUPED_FLEX = "uniattn_flex_attention"  # contains "flex_attention": transformers checks torch can run it


def soft_capped(config) -> bool:
    """Whether ``config``'s attention logits are soft-capped (Gemma-2), which SDPA cannot do."""
    return getattr(config, "attn_logit_softcapping", None) is not None


def _mask_scores(scores: torch.Tensor, attention_mask) -> torch.Tensor:
    if attention_mask is None:
        return scores
    if attention_mask.dtype == torch.bool:  # SDPA-style masks mark the allowed positions
        return scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    return scores + attention_mask


def grouped_probs(query, key, attention_mask, scaling, softcap, kv_groups) -> torch.Tensor:
    """Softmax rows ``[batch, q_heads, q_len, kv_len]`` without expanding K to every query head."""
    b, h, q, d = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    q_grouped = query.reshape(b, kv_heads, kv_groups * q, d)  # heads of one KV group are adjacent
    scores = torch.matmul(q_grouped, key.transpose(2, 3)).view(b, h, q, kv_len) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = _mask_scores(scores, attention_mask[..., :kv_len])
    elif q > 1:
        # transformers hands SDPA no mask when its `is_causal` (top-left aligned: a static cache's
        # unfilled tail comes after the queries) is exact; do the same.
        causal = torch.ones(q, kv_len, dtype=torch.bool, device=scores.device).tril()
        scores = _mask_scores(scores, causal)
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)


def grouped_apply(probs, value: torch.Tensor) -> torch.Tensor:
    """``P @ V`` for GQA without expanding V; returns ``[batch, q_len, q_heads, head_dim]``.
    ``probs`` is dense ``[batch, q_heads, q_len, kv_len]`` or a leader's Triton ``DecodeRows``."""
    if isinstance(probs, DecodeRows):
        return triton_decode.decode_apply(probs, value)
    b, h, q, kv_len = probs.shape
    kv_heads = value.shape[1]
    out = torch.matmul(probs.reshape(b, kv_heads, (h // kv_heads) * q, kv_len), value.to(probs.dtype))
    return out.view(b, h, q, -1).transpose(1, 2)


def explicit_attention(module, query, key, value, attention_mask, dropout, scaling, softcap):
    """The explicit rows and ``P @ V``; returns ``(output, rows)`` as every attention kernel does."""
    scaling = module.head_dim ** -0.5 if scaling is None else scaling
    probs = grouped_probs(query, key, attention_mask, scaling, softcap, module.num_key_value_groups)
    if dropout and module.training:
        probs = nn.functional.dropout(probs, p=dropout, training=True)
    return grouped_apply(probs, value).contiguous(), probs


def is_decode(q_len: int, kv_len: int) -> bool:
    return q_len <= DECODE_MAX_QUERIES and kv_len > q_len


def decode_attention(module, query, key, value, attention_mask, dropout, scaling, softcap):
    """Decode queries: the Triton kernel where it serves the call, else the explicit rows. Only a
    UniAttn leader with Softmax-reusing followers (``module.hands_on_rows``) has the Triton kernel
    write the rows they need."""
    if _decode_kernel == "auto" and not module.training and triton_decode.usable(query, key, value, attention_mask):
        scaling = module.head_dim ** -0.5 if scaling is None else scaling
        return triton_decode.decode_attend(query, key, value, attention_mask, scaling, softcap,
                                           write_rows=getattr(module, "hands_on_rows", False))
    return explicit_attention(module, query, key, value, attention_mask, dropout, scaling, softcap)


def grouped_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                           sliding_window=None, softcap=None, **kwargs):
    """SDPA for prefill and training; explicit grouped rows (returned as the weights) for decode.

    Decode reads K and V once per KV head instead of once per query head (transformers' SDPA path
    expands them when a mask is present), and the returned rows let UniAttn followers skip Q K^T.
    """
    if is_decode(query.shape[2], key.shape[2]) and not module.training:
        return decode_attention(module, query, key, value, attention_mask, dropout, scaling, softcap)
    if softcap is not None:
        return explicit_attention(module, query, key, value, attention_mask, dropout, scaling, softcap)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


AttentionInterface.register(GROUPED_SDPA, grouped_sdpa_attention)
AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)

if is_torch_flex_attn_available():
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
    from transformers.integrations.flex_attention import flex_attention_forward
    from transformers.masking_utils import (add_offsets_to_mask_function, and_masks, causal_mask_function,
                                            flex_attention_mask, padding_mask_function, prepare_padding_mask)

    def _wants_tensor_mask(q_length: int, kv_length: int, device) -> bool:
        cpu_backward = torch.device(device).type == "cpu" and torch.is_grad_enabled()
        return is_decode(q_length, kv_length) or cpu_backward

    def _cpu_block_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0,
                        mask_function=causal_mask_function, attention_mask=None, device="cpu", **kwargs):
        # transformers' flex_attention_mask, without compiling create_block_mask: on the CPU that
        # costs ~12 s per process and buys nothing at the lengths a CPU runs.
        if attention_mask is not None and not attention_mask.all():
            padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
            mask_function = and_masks(mask_function, padding_mask_function(padding))
        mask_function = add_offsets_to_mask_function(mask_function, q_offset, kv_offset)
        return create_block_mask(mask_function, batch_size, None, q_length, kv_length, device=device)

    def grouped_flex_mask(batch_size, q_length, kv_length, *args, device="cpu", **kwargs):
        """A ``BlockMask`` where the kernel will run flex_attention, SDPA's tensor mask where it will not."""
        if _wants_tensor_mask(q_length, kv_length, device):
            return sdpa_mask(batch_size, q_length, kv_length, *args, device=device, **kwargs)
        # A static cache hands its position counter as q_offset, a tensor it then advances in place when
        # the layer stores its keys; a BlockMask's mask_mod is evaluated inside the kernel, after that, so
        # it would see the queries shifted by their own length. Freeze the offsets now.
        for name in ("q_offset", "kv_offset"):
            if isinstance(kwargs.get(name), torch.Tensor):
                kwargs[name] = kwargs[name].clone()
        make = _cpu_block_mask if torch.device(device).type == "cpu" else flex_attention_mask
        return make(batch_size, q_length, kv_length, *args, device=device, **kwargs)

    def grouped_flex_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                               sliding_window=None, softcap=None, **kwargs):
        """flex_attention (soft-cap as ``score_mod``, window in the ``BlockMask``) for prefill and
        training; the explicit grouped rows for decode and for CPU training."""
        if not isinstance(attention_mask, BlockMask):
            if is_decode(query.shape[2], key.shape[2]) and not module.training:
                return decode_attention(module, query, key, value, attention_mask, dropout, scaling, softcap)
            return explicit_attention(module, query, key, value, attention_mask, dropout, scaling, softcap)
        if dropout and module.training:
            raise ValueError(f"attention dropout {dropout} cannot run in flex_attention: set the config's "
                             "attention_dropout to 0.0, or load the model with attn_implementation='eager'")
        if query.device.type != "cpu":
            out, _ = flex_attention_forward(module, query, key, value, attention_mask, scaling=scaling, softcap=softcap)
            return out, None  # the second output is the log-sum-exp, not probabilities: never hand it on

        def score_mod(score, batch, head, q_idx, kv_idx):
            return score if softcap is None else softcap * torch.tanh(score / softcap)

        with warnings.catch_warnings():  # "called without torch.compile": on the CPU that is the point
            warnings.simplefilter("ignore", UserWarning)
            out = flex_attention(query, key, value, score_mod=score_mod, block_mask=attention_mask, scale=scaling,
                                 enable_gqa=query.shape[1] != key.shape[1])
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(GROUPED_FLEX, grouped_flex_attention)
    AttentionMaskInterface.register(GROUPED_FLEX, grouped_flex_mask)
