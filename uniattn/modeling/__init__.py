"""UniAttn model code: layout, configs, V-only cache, attention and the per-family classes.

Everything in this folder is copied into saved checkpoints so that
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works
where the ``uniattn`` package is not installed; hence sibling-relative imports only.
"""

from .configuration_uniattn import UniAttnGemma2Config, UniAttnLlamaConfig, UniAttnMistralConfig
from .fused import fuse_projections, unfuse_projections
from .layout import FOLLOWER, LEADER, ORDINARY, SuperBlockLayout
from .modeling_uniattn import (
    UNIATTN_FAMILIES,
    UniAttnGemma2ForCausalLM,
    UniAttnGemma2Model,
    UniAttnLlamaForCausalLM,
    UniAttnLlamaModel,
    UniAttnMistralForCausalLM,
    UniAttnMistralModel,
)
