"""Fused projections for serving: one matrix product wherever one input meets several weights.

A decode step reads every weight once, and at a batch of 1-16 tokens each matrix product is one
pass over its weight. Short passes run far below the memory bandwidth: on an H200 at 8 tokens,
cuBLAS reads LLaMA-3.1-8B's 8 MB K or V projection at 1.0 TB/s, the 32 MB Q at 2.5 TB/s and their
48 MB concatenation at 3.2 TB/s; gate alone at 3.8 TB/s, gate and up together at 4.1 TB/s
(``python -m uniattn.tools.matmul_sweep``, docs/matmul_h200.md). ``fuse_projections(model)``
concatenates, in place:

* Q, K and V of every Softmax attention layer (ordinary layers and leaders);
* V and ``W_c`` of every follower (both read the layer input ``u``);
* gate and up of every MLP.

Those fused products, and the products that stay single (each layer's O and down projections and
the output head, whose modules become ``DecodeLinear``), run through ``triton_linear``'s kernel in
compiled decode: it reads short weights faster than cuBLAS (docs/launch_chain_h200.md).

LLaMA-style decoder layers (LLaMA, Mistral) also become ``decode_layer.FusedDecoderLayer``: in
compiled static-cache decode, RoPE and the cache write run inside the fused Q/K/V (V/W_c) product.

No weight is held twice: each parameter becomes a view into its group's concatenated buffer, so
the state dict, parameter counts and optimiser updates are unchanged. The fused product serves
only where no gradient is taken (inference) and for at most ``attention.FUSED_MAX_TOKENS`` token
rows (decode); prefill and training use the parameters as before. A fused model saves as before
(``save_pretrained`` writes the separate weights; tested with transformers 5.17), and
``unfuse_projections`` gives every parameter its own storage again.

It applies to UniAttn models and to stock LLaMA / Mistral / Gemma-2 models alike (a stock
attention module gets the UniAttn ordinary-layer forward, the stock computation), so that a
benchmark can give both the same serving path. That forward refuses a kernel that would drop a
soft-cap: a stock Gemma-2 model on SDPA (transformers 5.17's default) then stops with an error
naming the kernels that apply it.

Imports only sibling files, like the rest of this folder (saved checkpoints do not need it).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .triton_linear import linear as decode_linear
from .attention import FollowerAttention, SoftmaxAttentionMixin, fused_outputs
from .decode_layer import FusedDecoderLayer, add_tickets, fits, link_layers

# W_c before V: the fused decode step (decode_layer.py) writes the heads after the first ones into the cache.
GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "v_wc": ("compensation", "v_proj"),
          "gate_up": ("gate_proj", "up_proj")}


class FusedGateUpMLP:
    """On top of a family's stock MLP (``down(act(gate x) * up x)``): gate and up from one product."""

    def forward(self, x):
        fused = fused_outputs(self, "gate_up", x)
        if fused is None:
            return super().forward(x)
        gate, up = fused
        return self.down_proj(self.act_fn(gate) * up)


class DecodeLinear:
    """On top of ``nn.Linear``: decode-size products through ``triton_linear`` (``F.linear`` elsewhere)."""

    def forward(self, x):
        return decode_linear(x, self.weight, self.bias)


# The products that stay single after fusion: each layer's O and down projections and the output head.
SINGLE = ("o_proj", "down_proj", "lm_head")


@functools.lru_cache(maxsize=None)
def _on_top(mixin: type, cls: type) -> type:
    return type(cls.__name__, (mixin, cls), {"__module__": cls.__module__})


def _has_linears(module: nn.Module, names) -> bool:
    return all(isinstance(getattr(module, name, None), nn.Linear) for name in names)


def _fuse(owner: nn.Module, group: str) -> bool:
    if not _has_linears(owner, GROUPS[group]) or hasattr(owner, f"fused_{group}_weight"):
        return False
    linears = [getattr(owner, name) for name in GROUPS[group]]
    if len({lin.bias is None for lin in linears}) > 1:
        return False  # some with a bias, some without: left as they are
    with torch.no_grad():
        weight = torch.cat([lin.weight for lin in linears])
        bias = None if linears[0].bias is None else torch.cat([lin.bias for lin in linears])
        start = 0
        for lin in linears:
            stop = start + lin.out_features
            lin.weight.data = weight[start:stop]
            if bias is not None:
                lin.bias.data = bias[start:stop]
            start = stop
    owner.register_buffer(f"fused_{group}_weight", weight, persistent=False)
    owner.register_buffer(f"fused_{group}_bias", bias, persistent=False)
    owner.fused_sizes = {**getattr(owner, "fused_sizes", {}), group: [lin.out_features for lin in linears]}
    return True


def fuse_projections(model: nn.Module) -> int:
    """Fuse, in place, the projections that share an input (see the module docstring); returns how
    many groups were fused. Idempotent."""
    count = 0
    layers = []
    for module in list(model.modules()):
        if fits(module) and not isinstance(module, FusedDecoderLayer):
            _swap_class(module, FusedDecoderLayer)
            add_tickets(module, module.input_layernorm.weight.device)
        if isinstance(module, FusedDecoderLayer):
            layers.append(module)
        if isinstance(module, FollowerAttention):
            count += _fuse(module, "v_wc")
        elif _has_linears(module, GROUPS["qkv"] + ("o_proj",)):
            if not isinstance(module, SoftmaxAttentionMixin):  # a stock attention module
                _swap_class(module, SoftmaxAttentionMixin)
            count += _fuse(module, "qkv")
        elif _has_linears(module, GROUPS["gate_up"] + ("down_proj",)):
            if not isinstance(module, FusedGateUpMLP):
                _swap_class(module, FusedGateUpMLP)
            count += _fuse(module, "gate_up")
        for name in SINGLE:
            lin = getattr(module, name, None)
            if type(lin) is nn.Linear:
                _swap_class(lin, DecodeLinear)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    link_layers(layers, head if isinstance(head, nn.Linear) else None)
    return count


def _swap_class(module: nn.Module, mixin: type) -> None:
    module._unfused_class = type(module)
    module.__class__ = _on_top(mixin, type(module))


def unfuse_projections(model: nn.Module) -> int:
    """Undo ``fuse_projections``: every parameter gets its own storage, the fused buffers go and
    modules get their own classes back; returns how many groups were unfused."""
    count = 0
    for module in model.modules():
        for group, names in GROUPS.items():
            if getattr(module, f"fused_{group}_weight", None) is None:
                continue
            with torch.no_grad():
                for name in names:
                    lin = getattr(module, name)
                    lin.weight.data = lin.weight.data.clone()
                    if lin.bias is not None:
                        lin.bias.data = lin.bias.data.clone()
            delattr(module, f"fused_{group}_weight")
            delattr(module, f"fused_{group}_bias")
            count += 1
        for name in ("uniattn_ticket", "uniattn_tickets"):
            if name in module._buffers:
                delattr(module, name)
        module.__dict__.pop("uniattn_after", None)
        if "_unfused_class" in module.__dict__:
            module.__class__ = module.__dict__.pop("_unfused_class")
    return count
