"""UniAttn configurations: the base family's config plus the SuperBlock layout.

Each family gets its own ``model_type`` (``uniattn_llama``, ``uniattn_mistral``,
``uniattn_gemma2``) so the Auto classes and ``trust_remote_code`` loading can
tell a UniAttn checkpoint from a plain one. The layout is validated when the
config is built, so a bad ``G B E`` fails before any weight is touched.

Shipped inside saved checkpoints: only relative imports of sibling files.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import Gemma2Config, LlamaConfig, MistralConfig

from .layout import SuperBlockLayout


# What a follower reuses from its leader: "softmax" is UniAttn (the attention probabilities, own V,
# plus W_c); "kv" is cross-layer KV sharing (CLA: the leader's K and V, own Q, no compensation),
# the method's main baseline; "drop" removes the follower's attention sub-layer altogether (the
# paper's LLMDrop baseline: h = x + MLP part only, no cache), so all three save KV on the same layout.
# ``superblock_compensation=False`` gives "softmax" followers no W_c at all (the "Softmax unification
# only" arm: o_proj(P V), no hidden x hidden matmul, no parameters); "kv" and "drop" never have one.
# A config saved before the field existed has W_c, so the field defaults to True.
SHARINGS = ("softmax", "kv", "drop")


class UniAttnConfigMixin:
    """Adds ``superblock_size/begin/end`` (the seed's ``G B E``), ``superblock_sharing`` and
    ``superblock_compensation`` to a base config."""

    base_model_type: str = ""

    @property
    def superblock_layout(self) -> SuperBlockLayout:
        return SuperBlockLayout.from_config(self)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # Checked here rather than in a strict ``validate_*`` hook so a bad layout
        # surfaces as a plain ``ValueError`` naming the value and the allowed range.
        SuperBlockLayout.from_config(self)
        if self.superblock_sharing not in SHARINGS:
            raise ValueError(
                f"superblock_sharing {self.superblock_sharing!r} is not one of {SHARINGS}: "
                "'softmax' for UniAttn, 'kv' for cross-layer KV sharing (CLA), "
                "'drop' for removing the followers' attention (layer dropping, LLMDrop)"
            )
        if not isinstance(self.superblock_compensation, bool):
            raise ValueError(
                f"superblock_compensation {self.superblock_compensation!r} must be true or false: "
                "true gives UniAttn followers the compensation W_c, false leaves it out (softmax unification only)"
            )


@strict
class UniAttnLlamaConfig(UniAttnConfigMixin, LlamaConfig):
    model_type = "uniattn_llama"
    base_model_type = "llama"
    superblock_size: int = 4
    superblock_begin: int = 0
    superblock_end: int | None = None
    superblock_sharing: str = "softmax"
    superblock_compensation: bool = True


@strict
class UniAttnMistralConfig(UniAttnConfigMixin, MistralConfig):
    model_type = "uniattn_mistral"
    base_model_type = "mistral"
    superblock_size: int = 4
    superblock_begin: int = 0
    superblock_end: int | None = None
    superblock_sharing: str = "softmax"
    superblock_compensation: bool = True


@strict
class UniAttnGemma2Config(UniAttnConfigMixin, Gemma2Config):
    model_type = "uniattn_gemma2"
    base_model_type = "gemma2"
    superblock_size: int = 4
    superblock_begin: int = 0
    superblock_end: int | None = None
    superblock_sharing: str = "softmax"
    superblock_compensation: bool = True


UNIATTN_CONFIGS = {c.base_model_type: c for c in (UniAttnLlamaConfig, UniAttnMistralConfig, UniAttnGemma2Config)}

__all__ = ["SHARINGS", "UniAttnLlamaConfig", "UniAttnMistralConfig", "UniAttnGemma2Config", "UNIATTN_CONFIGS"]
