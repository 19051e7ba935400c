"""Stage 1 as distillation (``uniattn.train --stage1_objective kl``): the frozen base model teaches the UniAttn model.

The loss is the mean over real tokens of KL(teacher || student) of the next-token
distributions, needing no labels, so stage 1 can repair the unified model on any
text. ``DistillTrainer`` is the stock Trainer with only ``compute_loss`` replaced,
so DeepSpeed, accumulation, logging and checkpoints behave as in every other stage.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from transformers import Trainer

from ..loading import load_causal_lm


# float32 values per chunk and tensor (256 MB): a chunk holds this / (batch x vocab) sequence positions
KL_CHUNK_ELEMENTS = 1 << 26


def _kl_sum(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over the positions where ``mask`` holds of KL(teacher || student), float32, temperature 1."""
    log_s = torch.log_softmax(student.float(), dim=-1)
    log_t = torch.log_softmax(teacher.float(), dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    return torch.where(mask, kl, torch.zeros_like(kl)).sum()


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, attention_mask: torch.Tensor,
               chunk_positions: int | None = None) -> torch.Tensor:
    """Mean over the real tokens (``attention_mask == 1``) of KL(teacher || student) of the next-token distribution.

    Float32 log-softmax in chunks of ``chunk_positions`` sequence positions; with more than one chunk, each
    chunk's float32 tensors are recomputed in the backward pass (activation checkpointing), so at most one
    chunk of them exists at a time rather than a float32 copy of all the logits."""
    batch, length, vocab = student_logits.shape
    mask = attention_mask.bool()
    if chunk_positions is None:
        chunk_positions = max(1, KL_CHUNK_ELEMENTS // max(1, batch * vocab))
    chunked = length > chunk_positions and torch.is_grad_enabled() and student_logits.requires_grad
    total = torch.zeros((), dtype=torch.float32, device=student_logits.device)
    for start in range(0, length, chunk_positions):
        part = (student_logits[:, start:start + chunk_positions], teacher_logits[:, start:start + chunk_positions],
                mask[:, start:start + chunk_positions])
        if chunked:
            total = total + torch.utils.checkpoint.checkpoint(_kl_sum, *part, use_reentrant=False)
        else:
            total = total + _kl_sum(*part)
    return total / mask.sum().clamp(min=1)


class DistillTrainer(Trainer):
    """Stage 1 with ``--stage1_objective kl``: the stock Trainer, whose loss is ``distill_kl`` against the teacher.

    The teacher (the frozen base model) is a plain module beside the trained model, never wrapped by DeepSpeed
    nor saved. The loss is a mean per micro-batch; the Trainer divides it by the accumulation steps."""

    def __init__(self, *args, teacher, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher
        # The labels' token count (num_items_in_batch) is not this loss's denominator: average per micro-batch.
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {k: v for k, v in inputs.items() if k != "labels"}  # unlabelled: every real token counts
        outputs = model(**inputs)
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                          use_cache=False).logits
        loss = distill_kl(outputs.logits, teacher_logits, inputs["attention_mask"])
        return (loss, outputs) if return_outputs else loss


def load_teacher(script, dtype, device):
    """The base checkpoint, frozen, in eval mode, whole on ``device`` (not partitioned even under ZeRO-3)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    # from_pretrained partitions weights as they load while a ZeRO-3 TrainingArguments is alive; the teacher
    # must stay a plain local module, so hide that config while it loads.
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:  # a kernel that keeps Gemma-2's soft-cap, which transformers' default SDPA drops
        teacher = load_causal_lm(script.model_dir, dtype=dtype, attn_implementation=script.attn_implementation)
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved
    teacher.requires_grad_(False)
    return teacher.to(device).eval()
