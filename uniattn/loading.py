"""Loading a checkpoint, stock or UniAttn, with an attention kernel that computes the model it is.

transformers 5.17 gives every model SDPA by default, and its SDPA path drops Gemma-2's
attention-logit soft-cap without a word: a stock Gemma-2 loaded plainly is a different model
from the one it was trained as, and from the UniAttn and CLA models next to it (whose classes
map SDPA to a soft-cap-correct kernel themselves, see ``modeling/core.py``). Every tool, the
plain training arm and the benchmark load through here, so all of them run the same maths.
"""

from __future__ import annotations

import torch

from .modeling.attention import NO_SOFTCAP_KERNELS
from .modeling.kernels import GROUPED_FLEX, GROUPED_SDPA, soft_capped  # noqa: F401  (soft_capped: for the tools)


def attn_implementation_for(config, requested: str | None = None) -> str | None:
    """``requested`` where it is exact for this config; for a soft-capped model without a request,
    the fused flex kernel (UniAttn's, so stock and UniAttn runs share it); ``None`` (transformers'
    default) otherwise. Raises ``ValueError`` for a kernel that would drop the soft-cap."""
    if not soft_capped(config):
        return requested
    if requested is None:
        from transformers.utils import is_torch_flex_attn_available

        return GROUPED_FLEX if is_torch_flex_attn_available() else GROUPED_SDPA
    if requested in NO_SOFTCAP_KERNELS and not getattr(config, "superblock_layout", None):
        raise ValueError(
            f"attn_implementation={requested!r} drops this {config.model_type} model's attention soft-cap "
            f"({config.attn_logit_softcapping}); leave it unset (the fused {GROUPED_FLEX} kernel) or pass "
            "'eager' or 'flex_attention'"
        )
    return requested


def load_causal_lm(path, dtype=torch.float32, attn_implementation: str | None = None, **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` with ``attn_implementation_for`` the checkpoint's config."""
    import uniattn  # noqa: F401  (registers the UniAttn classes and kernels)
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    attn = attn_implementation_for(config, attn_implementation)
    if attn is not None:
        kwargs["attn_implementation"] = attn
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
