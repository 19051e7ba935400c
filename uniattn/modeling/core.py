"""Model-level UniAttn machinery shared by every family.

``UniAttnModelMixin`` sits on top of a family's stock ``*Model``: it builds the
stock layers, then gives ordinary and leader layers the family's
``SoftmaxAttentionMixin`` attention and followers a ``FollowerAttention``
(no Q/K projections; no ``W_c`` either with ``superblock_compensation=False``), or, with ``superblock_sharing="kv"``, the CLA baseline's
``KVSharingFollowerAttention``, or, with ``"drop"``, the layer-dropping baseline's
``DropFollowerAttention`` (attention sub-layer removed; its leader is then an
ordinary layer that publishes nothing). One module per kind keeps the stock
decoder layers, caches, checkpointing and saving common to all three. On each
forward it makes the follower cache layers V-only (empty for CLA and drop, which
cache nothing) and passes an explicit ``uniattn_states`` hand-off dict to every
layer (a ``UserDict`` like Gemma-3n's ``shared_kv_states``, so FSDP2 does not copy it
and gradient checkpointing sees the same object in the recompute).

Shipped inside saved checkpoints: only relative imports of sibling files.
"""

from __future__ import annotations

from collections import UserDict

from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import DynamicCache

from .attention import (GROUPED_FLEX, GROUPED_SDPA, NO_SOFTCAP_KERNELS, DropFollowerAttention, FollowerAttention,
                        KVSharingFollowerAttention)
from .cache import make_value_only
from .kernels import soft_capped
from .layout import FOLLOWER, LEADER, SuperBlockLayout


class UniAttnPreTrainedMixin:
    """Weight init and gradient-checkpointing rules common to every UniAttn model class."""

    def _init_weights(self, module):
        super()._init_weights(module)
        if getattr(module, "_uniattn_zero_init", False):
            init.zeros_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)

    def _check_and_adjust_attn_implementation(self, attn_implementation, is_init_check=False, **kwargs):
        impl = super()._check_and_adjust_attn_implementation(attn_implementation, is_init_check, **kwargs)
        # "sdpa" (the default) becomes a kernel with grouped explicit decode, whose rows followers reuse:
        # SDPA prefill, or for a soft-capped model (Gemma-2, whose cap SDPA drops) flex_attention, fused
        # and O(T) where uniattn_sdpa would have to build every T x T matrix. Stock flex_attention is
        # mapped too: its second output is a log-sum-exp, which a leader must not hand on as rows.
        if impl == "flex_attention" or (impl in NO_SOFTCAP_KERNELS and soft_capped(self.config)):
            try:
                self._flex_attn_can_dispatch(is_init_check)
                return GROUPED_FLEX
            except (ValueError, ImportError):  # a torch without flex_attention: correct, only slower
                return GROUPED_SDPA
        return GROUPED_SDPA if impl in NO_SOFTCAP_KERNELS else impl

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        if (gradient_checkpointing_kwargs or {}).get("use_reentrant", False):
            raise ValueError(
                "UniAttn needs gradient_checkpointing_kwargs={'use_reentrant': False}: followers read the "
                "leader's Q/K through the hand-off dict, and re-entrant checkpointing would drop their gradient"
            )
        return super().gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs, **kwargs)

    @property
    def superblock_layout(self) -> SuperBlockLayout:
        return self.config.superblock_layout


# superblock_sharing -> the follower's attention module (one mechanism per kind, all in attention.py)
FOLLOWER_CLASSES = {"softmax": FollowerAttention, "kv": KVSharingFollowerAttention, "drop": DropFollowerAttention}


class UniAttnModelMixin(UniAttnPreTrainedMixin):
    """Swap attention modules by role and wire the leader-to-follower hand-off."""

    attention_class: type  # the family's stock attention class with SoftmaxAttentionMixin on top

    def __init__(self, config):
        super().__init__(config)
        layout = config.superblock_layout
        follower_class = FOLLOWER_CLASSES[config.superblock_sharing]
        for i, layer in enumerate(self.layers):
            role = layout.role(i)
            if role == FOLLOWER:
                layer.self_attn = follower_class(config, i, layout.leader_of(i))
            else:
                attn = self.attention_class(config, i)
                # Dropped followers read nothing, so their leader need not keep its Q/K/P for them.
                attn.is_leader = role == LEADER and follower_class.reads_leader
                # Only Softmax-reusing followers read the probability rows (CLA ones take K and V).
                attn.hands_on_rows = (attn.is_leader and follower_class.reads_rows
                                      and any(layout.leader_of(f) == i for f in layout.followers))
                layer.self_attn = attn
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs):
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        make_value_only(past_key_values, self.config.superblock_layout,
                        keep_values=self.config.superblock_sharing == "softmax")
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            uniattn_states=UserDict(),
            **kwargs,
        )


class UniAttnForCausalLMMixin(UniAttnPreTrainedMixin):
    """The stock ``*ForCausalLM`` with the UniAttn base model; its forward and head are unchanged."""

    model_class: type

    def __init__(self, config):
        # Skip the stock __init__, which would first build (and allocate) a plain base model.
        PreTrainedModel.__init__(self, config)
        self.model = self.model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
