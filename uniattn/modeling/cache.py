"""V-only KV-cache layers for follower blocks.

A follower reuses its leader's attention probabilities, so it never needs a K
cache: it stores values only. Rather than re-implementing every cache layer,
each V-only layer subclasses the stock transformers layer and stores keys of
width zero (``[batch, heads, seq, 0]``): every shape rule, sliding-window roll,
static address and beam reorder of the stock layer applies unchanged, and the
keys cost no memory. The stock ``DynamicLayer`` reads its length from the keys,
so the V-only layers report it from the values (beam search reorders only
layers whose length is positive).

A cross-layer KV sharing (CLA) follower reads its leader's K and V and stores
nothing: its twin also cuts the values to width zero (``keeps_values=False``).
A dropped follower (``superblock_sharing="drop"``) has no attention at all and
uses the same empty twin.

``make_value_only(cache, layout)`` swaps the follower layers of a freshly
created ``DynamicCache`` / ``StaticCache`` for their V-only twins; the model
calls it on every forward, so caches made by ``generate()`` or by the user work
alike.

Shipped inside saved checkpoints: only relative imports of sibling files.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import (
    Cache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    StaticLayer,
    StaticSlidingWindowLayer,
)


class ValueOnlyMixin:
    """Forces zero-width keys, whatever the caller (or ``early_initialization``) passes."""

    value_only = True
    keeps_values = True  # False for a CLA or dropped follower, which stores nothing

    def _values(self, value_states: torch.Tensor) -> torch.Tensor:
        return value_states if self.keeps_values else value_states[..., :0]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states[..., :0], self._values(value_states))

    def update(self, key_states, value_states, *args, **kwargs):
        value_states = self._values(value_states)
        return super().update(value_states[..., :0], value_states, *args, **kwargs)


class ValueOnlyDynamicLayer(ValueOnlyMixin, DynamicLayer):
    def get_seq_length(self) -> int:
        if not self.is_initialized or self.values.numel() == 0:
            return 0
        return self.values.shape[-2]


class ValueOnlyDynamicSlidingWindowLayer(ValueOnlyMixin, DynamicSlidingWindowLayer):
    pass


class ValueOnlyStaticLayer(ValueOnlyMixin, StaticLayer):
    pass


class ValueOnlyStaticSlidingWindowLayer(ValueOnlyMixin, StaticSlidingWindowLayer):
    pass


def _value_only_twin(layer, leader_layer, keep_values: bool):
    """A fresh V-only layer shaped like the leader's (a Gemma-2 follower keeps its leader's window)."""
    if getattr(layer, "value_only", False):
        return layer
    twin = _twin_class(layer, leader_layer)
    twin.keeps_values = keep_values
    return twin


def _twin_class(layer, leader_layer):
    if layer.is_initialized and layer.get_seq_length() > 0:
        raise ValueError(
            "a follower layer's cache already holds keys: this cache was filled by a model without "
            "this SuperBlock layout. Start from an empty cache (past_key_values=None) instead."
        )
    src = leader_layer
    # Sliding classes subclass the full ones, so test them first.
    if isinstance(src, StaticSlidingWindowLayer):
        return ValueOnlyStaticSlidingWindowLayer(max_cache_len=src.max_cache_len, sliding_window=src.max_cache_len)
    if isinstance(src, StaticLayer):
        return ValueOnlyStaticLayer(max_cache_len=src.max_cache_len)
    if isinstance(src, DynamicSlidingWindowLayer):
        return ValueOnlyDynamicSlidingWindowLayer(sliding_window=src.sliding_window)
    if type(src) in (DynamicLayer, ValueOnlyDynamicLayer):
        return ValueOnlyDynamicLayer()
    raise TypeError(
        f"UniAttn followers need a V-only cache layer, but {type(src).__name__} has no V-only twin; "
        "use DynamicCache or StaticCache (the defaults of generate())."
    )


def make_value_only(cache: Cache | None, layout, keep_values: bool = True) -> None:
    """Give every follower layer of ``cache`` a V-only layer (or, without values, an empty one), in place."""
    if cache is None or getattr(cache, "_uniattn_value_only", False):
        return
    followers = layout.followers
    if not cache.layers and cache.layer_class_to_replicate is not None:
        # A config-less DynamicCache grows its layers lazily; create them now so followers get V-only ones.
        cache.layers.extend(cache.layer_class_to_replicate() for _ in range(layout.num_layers))
    if len(cache.layers) < layout.num_layers:
        raise ValueError(f"the cache has {len(cache.layers)} layers but the model has {layout.num_layers}")
    for i in followers:
        cache.layers[i] = _value_only_twin(cache.layers[i], cache.layers[layout.leader_of(i)], keep_values)
    cache._uniattn_value_only = True


def cache_nbytes(cache: Cache) -> int:
    """Bytes held by the K and V tensors of a cache (what the K-cache saving is measured on)."""
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
