"""The training stages: their plan, dataset, model building, the Trainer loop and publishing."""


from __future__ import annotations

import gc
import json
import logging
import re
import shutil
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

import uniattn  # noqa: F401  (registers the UniAttn classes, so every save carries auto_map)

from ..convert import load_converted
from ..loading import load_causal_lm
from .distill import DistillTrainer, load_teacher
from ..data import collate, tokenize
from .resume import write_run_file

from .checks import Checked, Stage, callback_classes, plan_stages, sharing_of

logger = logging.getLogger(__name__)


class SFTDataset(torch.utils.data.Dataset):
    """Alpaca-style records, tokenised on access (response-only labels, see ``uniattn.data.tokenize``)."""

    def __init__(self, records, tokenizer, max_length):
        self.records, self.tokenizer, self.max_length = records, tokenizer, max_length

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return tokenize(self.records[i], self.tokenizer, self.max_length)


def collate_for_training(examples, pad_token_id: int) -> dict:
    batch = collate(examples, pad_token_id)
    # No KV cache while training, asked per batch so the saved configs keep use_cache on for inference.
    batch["use_cache"] = False
    return batch


def copy_compensation(model, tensors: dict, scale: float = 1.0) -> None:
    """Copy the init file's W_c, times ``scale``, into the model (gathering the ZeRO-3 shards while writing)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    params = dict(model.named_parameters())
    targets = [params[n] for n in tensors]
    if is_deepspeed_zero3_enabled():
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(targets, modifier_rank=0)
    else:
        ctx = nullcontext()
    with ctx, torch.no_grad():
        for name, tensor in tensors.items():
            if scale != 1.0:
                tensor = tensor * scale  # in the file's precision, then cast like the unscaled values
            params[name].copy_(tensor.to(params[name].dtype))


@contextmanager
def _quiet(name: str):
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def build_model(script, stage: Stage, stages: list[Stage], dtype, init_tensors):
    if stage.name == "stage2":
        model = load_causal_lm(stages[0].final, dtype=dtype)
    elif script.mode == "plain":
        # not transformers' default: for Gemma-2 that is SDPA, which drops the soft-cap
        model = load_causal_lm(script.model_dir, dtype=dtype, attn_implementation=script.attn_implementation)
    else:
        # load_converted checks the dropped / new keys itself; the stock load report would list them as
        # UNEXPECTED / MISSING and alarm the reader for nothing.
        with _quiet("transformers.modeling_utils"):
            # softmax mode: no W_c, except in a run begun with the frozen zero W_c (all_but_compensation)
            compensation = script.mode != "softmax" or stage.trainable == "all_but_compensation"
            model, _ = load_converted(script.model_dir, tuple(script.superblock), dtype, sharing_of(script.mode),
                                      compensation)
        if init_tensors is not None:
            copy_compensation(model, init_tensors, script.init_scale)
    if script.attn_implementation:
        model.set_attn_implementation(script.attn_implementation)
    for name, p in model.named_parameters():
        is_wc = ".compensation." in name
        if stage.trainable == "compensation":
            p.requires_grad_(is_wc)
        elif stage.trainable == "compensation_vo":
            p.requires_grad_(is_wc or is_follower_vo(name, model.config))
        elif stage.trainable == "all_but_compensation":
            p.requires_grad_(not is_wc)  # a softmax run begun with W_c: it stays at its zero init
        else:
            p.requires_grad_(True)
    size = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731  (ZeRO-3 leaves only a shard's numel)
    n_train = sum(size(p) for p in model.parameters() if p.requires_grad)
    n_all = sum(size(p) for p in model.parameters())
    logger.info("%s: training %s of %s parameters (%s)", stage.name, f"{n_train:,}", f"{n_all:,}", stage.trainable)
    return model


_VO = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.(?:v_proj|o_proj)\.")


def is_follower_vo(name: str, config) -> bool:
    """A follower's ``self_attn.v_proj`` / ``self_attn.o_proj`` weight or bias (FollowerAttention)."""
    m = _VO.search(name)
    return bool(m) and int(m.group(1)) in config.superblock_layout.followers


def publish_final(trainer: Trainer, final: Path, info: dict) -> None:
    """Save the trained model under a temporary name, then rename it: ``final`` only ever appears complete."""
    staged = final.parent / f".{final.name}.partial"
    if trainer.args.should_save:
        shutil.rmtree(staged, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staged))  # every rank: ZeRO-3 gathers the weights
    if trainer.args.should_save:
        (staged / "training_args.bin").unlink(missing_ok=True)
        (staged / "uniattn_train.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        staged.rename(final)
    trainer.accelerator.wait_for_everyone()


def train(script, targs: dict, checked: Checked) -> Path:
    out = Path(targs["output_dir"])
    stages = plan_stages(script.mode, out, script.stage1_trainable,
                         checked.softmax_compensation)
    tokenizer = checked.tokenizer
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of attention and loss anyway
    collator = partial(collate_for_training, pad_token_id=tokenizer.pad_token_id)
    # DeepSpeed keeps float32 master weights of a bf16 model; the plain Trainer would not (its updates would be
    # rounded to bf16), so without DeepSpeed the weights stay float32 and --bf16 means autocast.
    dtype = torch.bfloat16 if targs.get("bf16") and targs.get("deepspeed") else torch.float32
    for stage in stages:
        if stage.final.is_dir():
            logger.info("%s already finished (%s); not training it again", stage.name, stage.final)
            continue
        part = checked.plan.get(stage.name) or {"records": checked.records, "max_steps": None}
        dataset = SFTDataset(part["records"], tokenizer, script.max_length)
        overrides = {"output_dir": str(stage.trainer_dir)}
        if part["max_steps"]:
            overrides["max_steps"] = part["max_steps"]  # --stage1_share: this stage's part of --max_steps
        # TrainingArguments first: with ZeRO-3 it makes from_pretrained partition the weights as they load.
        args = TrainingArguments(**{**targs, **overrides})
        if args.deepspeed:
            import deepspeed

            # On CPU accelerate joins the ranks over gloo itself; DeepSpeed's comm layer must wrap that group
            # before ZeRO-3's zero.Init runs in from_pretrained, or it counts one process. No-op on GPU.
            deepspeed.init_distributed()
        if args.should_save:
            write_run_file(out, checked.identity)
        model = build_model(script, stage, stages, dtype, checked.init_tensors)
        kw = dict(model=model, args=args, train_dataset=dataset, data_collator=collator,
                  processing_class=tokenizer, callbacks=[cls() for cls in callback_classes(script.trainer_callback)])
        objective = "lm"
        if stage.name == "stage1" and script.stage1_objective == "kl":
            objective = "kl"
            trainer = DistillTrainer(**kw, teacher=load_teacher(script, dtype, args.device))
        else:
            trainer = Trainer(**kw)
        resume = checked.resume.get(stage.name)
        if resume:
            logger.info("%s: resuming from %s", stage.name, resume)
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        # From the log history, which survives a resume (the Trainer's own average does not).
        losses = [[e["step"], e["loss"]] for e in trainer.state.log_history if "loss" in e]
        info = {**checked.identity, "stage": stage.name, "trainable": stage.trainable,
                "global_step": result.global_step, "logged_losses": losses,
                "world_size": args.world_size, "preset": script.preset_path, "objective": objective,
                "records": len(part["records"]),
                # every stage's records and own max_steps (None: the Trainer's from --max_steps or the epochs):
                # with --stage1_share, stage1 + stage2 max_steps == --max_steps (equal-steps accounting)
                "stage_plan": {name: {"records": len(p["records"]), "max_steps": p["max_steps"]}
                               for name, p in checked.plan.items()}}
        publish_final(trainer, stage.final, info)
        logger.info("%s finished after %d steps: %s", stage.name, result.global_step, stage.final)
        del trainer, model
        gc.collect()
    return stages[-1].final


