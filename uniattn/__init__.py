"""UniAttn: post-train LLaMA, Mistral and Gemma-2 into SuperBlocks that share the attention Softmax.

Importing the package registers the UniAttn configs and models with the
transformers Auto classes (``AutoConfig``, ``AutoModel``,
``AutoModelForCausalLM``) and marks them for ``auto_map`` so every saved
checkpoint also loads with ``trust_remote_code=True`` where this package is
not installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .modeling import (
    FOLLOWER,
    LEADER,
    ORDINARY,
    UNIATTN_FAMILIES,
    SuperBlockLayout,
    UniAttnGemma2Config,
    UniAttnGemma2ForCausalLM,
    UniAttnGemma2Model,
    UniAttnLlamaConfig,
    UniAttnLlamaForCausalLM,
    UniAttnLlamaModel,
    UniAttnMistralConfig,
    UniAttnMistralForCausalLM,
    UniAttnMistralModel,
    fuse_projections,
    unfuse_projections,
)

__version__ = "0.1.0"

for _config, _base, _lm in (
    (UniAttnLlamaConfig, UniAttnLlamaModel, UniAttnLlamaForCausalLM),
    (UniAttnMistralConfig, UniAttnMistralModel, UniAttnMistralForCausalLM),
    (UniAttnGemma2Config, UniAttnGemma2Model, UniAttnGemma2ForCausalLM),
):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _base, exist_ok=True)
    AutoModelForCausalLM.register(_config, _lm, exist_ok=True)
    _config.register_for_auto_class()
    _lm.register_for_auto_class("AutoModelForCausalLM")
    _base.register_for_auto_class("AutoModel")
