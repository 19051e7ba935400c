"""A naive UniAttn (or CLA) forward that materialises every attention matrix, written from the spec.

Independent of ``uniattn.modeling``'s control flow: it reads only weights and
submodules (norms, MLPs, embeddings) of a UniAttn model and re-does the maths
of UNIATTN.md section 3 with explicit masks and an explicit P.
"""

from __future__ import annotations

import torch


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def _mask(attention_mask, length, window):
    """[batch, q, k] bool: causal, key not padding, inside the window (by sequence index, as transformers)."""
    q = torch.arange(length)[:, None]
    k = torch.arange(length)[None, :]
    allowed = k <= q
    if window is not None:
        allowed = allowed & (k > q - window)
    return allowed[None] & attention_mask[:, None, :].bool()


def reference_logits(model, input_ids, attention_mask):
    cfg = model.config
    family = cfg.base_model_type
    layout = cfg.superblock_layout
    inner = model.model
    x = inner.embed_tokens(input_ids)
    batch, length, _ = x.shape
    position_ids = torch.arange(length)[None].expand(batch, -1)
    cos, sin = inner.rotary_emb(x, position_ids)
    heads, kv_heads, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    group = heads // kv_heads
    probs, leader_kv = {}, {}

    def softmax_rows(q, k, i):
        if family == "gemma2":
            scale = cfg.query_pre_attn_scalar ** -0.5
            window = cfg.sliding_window if cfg.layer_types[i] == "sliding_attention" else None
        else:
            scale = hd ** -0.5
            window = getattr(cfg, "sliding_window", None)
        scores = q @ k.transpose(-1, -2) * scale
        if family == "gemma2" and cfg.attn_logit_softcapping is not None:
            cap = cfg.attn_logit_softcapping
            scores = torch.tanh(scores / cap) * cap
        allowed = _mask(attention_mask, length, window)[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
        return torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows of padding queries are all masked

    cla = getattr(cfg, "superblock_sharing", "softmax") == "kv"
    for i, layer in enumerate(inner.layers):
        attn = layer.self_attn
        u = layer.input_layernorm(x)
        follower = layout.role(i) == "follower"
        if follower and cla:
            # CLA: own query, the leader's keys and values, the leader's mask (window).
            lead = layout.leader_of(i)
            q = _rope(attn.q_proj(u).view(batch, length, heads, hd).transpose(1, 2), cos, sin)
            k, v = leader_kv[lead]
            p = softmax_rows(q, k, lead)
        else:
            v = attn.v_proj(u).view(batch, length, kv_heads, hd).transpose(1, 2).repeat_interleave(group, dim=1)
        if follower and not cla:
            p = probs[layout.leader_of(i)]
        elif not follower:
            q = attn.q_proj(u).view(batch, length, heads, hd).transpose(1, 2)
            k = attn.k_proj(u).view(batch, length, kv_heads, hd).transpose(1, 2).repeat_interleave(group, dim=1)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            p = softmax_rows(q, k, i)
            probs[i], leader_kv[i] = p, (k, v)
        out = (p @ v).transpose(1, 2).reshape(batch, length, heads * hd)
        a = attn.o_proj(out)
        if follower and not cla and getattr(cfg, "superblock_compensation", True):
            a = a + attn.compensation(u)
        if family == "gemma2":
            x = x + layer.post_attention_layernorm(a)
            x = x + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x)))
        else:
            x = x + a
            x = x + layer.mlp(layer.post_attention_layernorm(x))
    logits = model.lm_head(inner.norm(x))
    if family == "gemma2" and cfg.final_logit_softcapping is not None:
        cap = cfg.final_logit_softcapping
        logits = torch.tanh(logits / cap) * cap
    return logits
