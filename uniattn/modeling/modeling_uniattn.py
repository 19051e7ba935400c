"""UniAttn model classes for LLaMA, Mistral and Gemma-2: thin subclasses of the stock ones.

Each family differs from its stock classes only by the config class and the
attention modules (see ``core.py`` / ``attention.py``): the decoder layers,
norms, MLPs, embeddings and LM heads are the stock ones. Follower blocks get
``o_proj(P_leader V) + W_c u`` through the stock layer code, which puts the
compensation before the residual add for LLaMA / Mistral and inside
``post_attention_layernorm`` for Gemma-2, as the method prescribes (without
``superblock_compensation`` they return ``o_proj(P_leader V)`` alone). The
baselines reuse the same layers: a CLA follower returns its attention over the
leader's K/V, a dropped follower (``superblock_sharing="drop"``) returns zeros,
which the stock code turns into ``h = x`` for every family.

Shipped inside saved checkpoints: only relative imports of sibling files.
"""

from __future__ import annotations

from transformers import (
    Gemma2ForCausalLM,
    Gemma2Model,
    LlamaForCausalLM,
    LlamaModel,
    MistralForCausalLM,
    MistralModel,
)
from transformers.models.gemma2.modeling_gemma2 import Gemma2Attention
from transformers.models.llama.modeling_llama import LlamaAttention
from transformers.models.mistral.modeling_mistral import MistralAttention

from .attention import SoftmaxAttentionMixin
from .configuration_uniattn import UniAttnGemma2Config, UniAttnLlamaConfig, UniAttnMistralConfig
from .core import UniAttnForCausalLMMixin, UniAttnModelMixin


class UniAttnLlamaAttention(SoftmaxAttentionMixin, LlamaAttention):
    pass


class UniAttnLlamaModel(UniAttnModelMixin, LlamaModel):
    config_class = UniAttnLlamaConfig
    attention_class = UniAttnLlamaAttention


class UniAttnLlamaForCausalLM(UniAttnForCausalLMMixin, LlamaForCausalLM):
    config_class = UniAttnLlamaConfig
    model_class = UniAttnLlamaModel


class UniAttnMistralAttention(SoftmaxAttentionMixin, MistralAttention):
    pass


class UniAttnMistralModel(UniAttnModelMixin, MistralModel):
    config_class = UniAttnMistralConfig
    attention_class = UniAttnMistralAttention


class UniAttnMistralForCausalLM(UniAttnForCausalLMMixin, MistralForCausalLM):
    config_class = UniAttnMistralConfig
    model_class = UniAttnMistralModel


class UniAttnGemma2Attention(SoftmaxAttentionMixin, Gemma2Attention):
    pass


class UniAttnGemma2Model(UniAttnModelMixin, Gemma2Model):
    config_class = UniAttnGemma2Config
    attention_class = UniAttnGemma2Attention


class UniAttnGemma2ForCausalLM(UniAttnForCausalLMMixin, Gemma2ForCausalLM):
    config_class = UniAttnGemma2Config
    model_class = UniAttnGemma2Model


# base model_type -> (config class, causal-LM class)
UNIATTN_FAMILIES = {
    "llama": (UniAttnLlamaConfig, UniAttnLlamaForCausalLM),
    "mistral": (UniAttnMistralConfig, UniAttnMistralForCausalLM),
    "gemma2": (UniAttnGemma2Config, UniAttnGemma2ForCausalLM),
}

__all__ = [
    "UniAttnLlamaModel",
    "UniAttnLlamaForCausalLM",
    "UniAttnMistralModel",
    "UniAttnMistralForCausalLM",
    "UniAttnGemma2Model",
    "UniAttnGemma2ForCausalLM",
    "UNIATTN_FAMILIES",
]
