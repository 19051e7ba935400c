"""Command-line arguments of ``uniattn.train``: the parser, preset merging, and the usage error."""


from __future__ import annotations

import argparse
import logging
import os
from dataclasses import fields
from pathlib import Path

import torch
from transformers import AutoConfig, HfArgumentParser, TrainingArguments


from ..data import default_data_file
from ..modeling import UNIATTN_FAMILIES
from .presets import CONFIGS_DIR, read_preset, select_preset

logger = logging.getLogger(__name__)


MODES = ("plain", "softmax", "uniattn", "cla", "drop")
REPO_DIR = CONFIGS_DIR.parent
# Flags of this script; everything else is a TrainingArguments flag.
SCRIPT_FLAGS = ("mode", "model_dir", "data", "superblock", "init_path", "preset", "max_length",
                "effective_batch_size", "attn_implementation", "check_only", "include_eval_items", "zero_init",
                "trainer_callback")
# Stage-1 options of --mode uniattn and the seed's recipe. A run file without them (written before they
# existed) counts as having these values, so it still resumes.
STAGE1_DEFAULTS = {"stage1_objective": "lm", "stage1_trainable": "compensation", "stage1_share": None,
                   "init_scale": 1.0, "stage1_data": None}
# The default differs from the seed's (None: both stages the whole schedule): a short stage 1 beat both the
# seed's two full stages (with half their steps) and an even split, over 3 seeds (docs/results.md).
STAGE1_SHARE_DEFAULT = 0.1


def _stage1_share(text: str) -> float | None:
    if text.strip().lower() == "seed":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is neither a share in (0, 1) such as 0.1 nor 'seed'") from None


class UsageError(ValueError):
    """A bad argument combination; the message names the value and the fix."""



def build_parser() -> HfArgumentParser:
    parser = HfArgumentParser(TrainingArguments, description=__doc__, allow_abbrev=False,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("UniAttn")
    g.add_argument("--mode", required=True, choices=MODES, help="plain | softmax | uniattn | cla | drop (see above)")
    g.add_argument("--model_dir", required=True, help="plain Hugging Face checkpoint (LLaMA, Mistral, Gemma-2)")
    g.add_argument("--data", default=str(default_data_file("pmc")), help="SFT records, JSON list or JSONL")
    g.add_argument("--superblock", nargs=3, type=int, metavar=("G", "B", "E"),
                   help="SuperBlock layout (softmax, uniattn, cla)")
    g.add_argument("--init_path", help="init-calc output with the closed-form W_c (uniattn)")
    g.add_argument("--zero_init", action="store_true",
                   help="uniattn without init calc: W_c starts at zero (ablation; no --init_path)")
    s1 = parser.add_argument_group("UniAttn stage 1 (--mode uniattn; the defaults are the seed's recipe but --stage1_share)")
    s1.add_argument("--stage1_objective", choices=("lm", "kl"), default="lm",
                    help="lm: the SFT loss on response tokens; kl: distil the base model (--model_dir, frozen), "
                         "mean KL(teacher || student) of the next-token distribution over every real token")
    s1.add_argument("--stage1_data", metavar="FILE",
                    help="records whose prompt + response text stage 1 uses without labels (--stage1_objective kl; "
                         "default: the training records)")
    s1.add_argument("--stage1_trainable", choices=("compensation", "compensation_vo"), default="compensation",
                    help="compensation: only W_c; compensation_vo: also the followers' v_proj and o_proj")
    s1.add_argument("--stage1_share", type=_stage1_share, default=STAGE1_SHARE_DEFAULT, metavar="F|seed",
                    help="equal-steps protocol: stage 1 gets a share F in (0, 1) of the records (seeded by --seed) "
                         "and round(F * max_steps) steps (Python's round), stage 2 the other records and the rest "
                         "of the steps; with epochs each stage runs them over its own part. With --stage1_data only "
                         f"the steps are split. Default {STAGE1_SHARE_DEFAULT:g} (each stage at least 1 step and 1 "
                         "record); 'seed': the seed's protocol, both stages the whole schedule on the same data")
    s1.add_argument("--init_scale", type=float, default=1.0, metavar="S",
                    help="multiply the init-calc W_c (weight and bias) by S > 0 before stage 1 (ablation)")
    g.add_argument("--preset", help="YAML preset (default: the file in configs/ that matches the model)")
    g.add_argument("--max_length", type=int, default=1024, help="tokens per example (prompt + response)")
    g.add_argument("--effective_batch_size", type=int, default=48,
                   help="examples per optimizer step; sets --gradient_accumulation_steps unless that is given")
    g.add_argument("--attn_implementation", default=None, help="sdpa | eager | flash_attention_2 | flex_attention")
    g.add_argument("--check_only", action="store_true", help="check everything, train nothing, write nothing")
    g.add_argument("--trainer_callback", action="append", default=[], metavar="MODULE:NAME",
                   help="a transformers TrainerCallback class to add to every stage's Trainer (repeatable), "
                        "imported from MODULE, e.g. my_callbacks:LogGradNorm")
    g.add_argument("--include_eval_items", action="store_true",
                   help="also train on records the evaluation tasks hold out (uniattn.eval.split)")
    return parser


def _explicit_flags(argv: list[str]) -> set[str]:
    return {tok[2:].split("=", 1)[0].replace("-", "_") for tok in argv if tok.startswith("--")}


def _resolve_repo_path(value: str | None) -> str | None:
    # Presets name repo files (configs/ds_zero2.json) relative to the repo, not to the caller's directory.
    if value and not Path(value).exists() and (REPO_DIR / value).exists():
        return str(REPO_DIR / value)
    return value


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, dict, object]:
    """(script args, TrainingArguments kwargs, model config); preset values fill what the flags leave out."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # --mode must not read as --model_dir
    pre.add_argument("--model_dir")
    pre.add_argument("--preset")
    known, _ = pre.parse_known_args(argv)
    parser = build_parser()
    if "-h" in argv or "--help" in argv:
        parser.parse_args(argv)
    if known.model_dir is None:
        parser.error("the following arguments are required: --model_dir")
    config = load_model_config(known.model_dir)
    preset = read_preset(known.preset) if known.preset else select_preset(config)
    dests = {a.dest for a in parser._actions}
    unknown = sorted(set(preset.training) - dests)
    if unknown:
        raise UsageError(f"preset {preset.path} sets unknown flags {unknown}; see `python -m uniattn.train --help`")
    parser.set_defaults(**preset.training)
    ns = parser.parse_args(argv)
    explicit = _explicit_flags(argv)
    script = argparse.Namespace(**{k: getattr(ns, k) for k in (*SCRIPT_FLAGS, *STAGE1_DEFAULTS)},
                                preset_path=str(preset.path), output_dir_given="output_dir" in explicit,
                                stage1_given=sorted(explicit & set(STAGE1_DEFAULTS)))
    names = {f.name for f in fields(TrainingArguments) if f.init}
    targs = {k: v for k, v in vars(ns).items() if k in names}
    targs["deepspeed"] = _resolve_repo_path(targs.get("deepspeed"))
    if targs["deepspeed"] and not Path(targs["deepspeed"]).is_file():
        raise UsageError(f"DeepSpeed config {targs['deepspeed']} does not exist; pass --deepspeed configs/ds_zero2.json")
    if targs.get("bf16") and not torch.cuda.is_available() and "bf16" not in explicit:
        logger.info("no GPU: training in float32 (the preset's bf16 applies on GPU)")
        targs["bf16"] = False
    if not torch.cuda.is_available() and "use_cpu" not in explicit:
        # Without it accelerate sees no backend on a CPU-only machine and counts one process, so
        # DeepSpeed's batch arithmetic breaks with two; with it, ranks join over gloo.
        targs["use_cpu"] = True
        if "dataloader_pin_memory" not in explicit:
            targs["dataloader_pin_memory"] = False  # nothing to pin to without a GPU
    world = int(os.environ.get("WORLD_SIZE", 1))
    if "gradient_accumulation_steps" not in explicit:
        per_step = targs["per_device_train_batch_size"] * world
        targs["gradient_accumulation_steps"] = max(1, round(script.effective_batch_size / per_step))
        got = per_step * targs["gradient_accumulation_steps"]
        if got != script.effective_batch_size:
            logger.warning("effective batch %d is not a multiple of %d per device x %d processes; using %d",
                           script.effective_batch_size, targs["per_device_train_batch_size"], world, got)
    if "gradient_checkpointing_kwargs" not in explicit:
        targs["gradient_checkpointing_kwargs"] = {"use_reentrant": False}  # UniAttn needs non-re-entrant
    targs["remove_unused_columns"] = False  # our dataset yields token lists, not named columns
    if "use_cache" not in explicit:
        # The Trainer writes this into the model config, hence into every checkpoint: keep inference's KV
        # cache on there; training turns it off per batch (collate_for_training).
        targs["use_cache"] = True
    return script, targs, config


def load_model_config(model_dir: str):
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise UsageError(f"MODEL_DIR {model_dir} has no config.json; pass a Hugging Face checkpoint directory")
    config = AutoConfig.from_pretrained(path)
    supported = set(UNIATTN_FAMILIES) | {f"uniattn_{f}" for f in UNIATTN_FAMILIES}
    if config.model_type not in supported:
        raise UsageError(f"model_type {config.model_type!r} of {model_dir} is not supported; "
                         f"use one of {sorted(UNIATTN_FAMILIES)}")
    return config


