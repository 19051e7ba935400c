"""Post-training on the Hugging Face Trainer with DeepSpeed: plain, softmax, UniAttn and CLA fine-tuning.

    deepspeed --num_gpus N --module uniattn.train --mode uniattn --model_dir BASE \\
        --data dataset/pmc_llama_instructions_1000.json --superblock 4 14 30 \\
        --init_path INIT.safetensors --output_dir outputs/uniattn [--max_steps 5 ...]

Modes (UNIATTN.md section 5):

* ``plain``: ordinary full fine-tuning of the checkpoint.
* ``softmax``: convert to SuperBlocks ``G B E`` with followers that have no
  compensation ``W_c`` at all (``superblock_compensation=False``: ``o_proj(P V)``,
  no ``W_c`` matmul or parameters) and fine-tune everything: the seed's
  "Softmax unification only" baseline. (Runs begun before this kept a frozen,
  all-zero ``W_c``, which computes the same; such a run resumes with it.)
* ``uniattn``: convert, load ``W_c`` from the init-calc file, then two stages in
  one command with the same data and schedule: stage 1 trains only the ``W_c``
  tensors (everything else ``requires_grad=False``), stage 2 trains everything,
  starting from stage 1's result. ``--zero_init`` starts ``W_c`` at zero instead
  of the init-calc values (the ablation "UniAttn without init").
  Stage-1 ablations (defaults = the seed's recipe): ``--stage1_objective kl``
  distils the base model's next-token distribution instead of the SFT loss
  (optionally on unlabelled ``--stage1_data``), ``--stage1_trainable
  compensation_vo`` also trains the followers' V/O projections,
  ``--stage1_share F`` splits the records and ``--max_steps`` between the
  stages (equal total steps, no record seen by both), ``--init_scale S``
  multiplies the init-calc ``W_c`` by ``S``.
* ``cla``: the cross-layer KV sharing baseline on the same layout: followers keep
  their Q and attend over the leader's K and V (their own K/V projections are
  dropped, no compensation); everything trains, one stage.
* ``drop``: the layer-dropping (LLMDrop) baseline on the same layout: followers
  lose their attention sub-layer (``h = x`` + MLP part; no Q/K/V/O projections,
  no cache, no compensation); everything trains, one stage.

Hyper-parameters come from the preset in ``configs/`` that matches the model
(see ``uniattn.presets``); any ``TrainingArguments`` flag overrides it. The
loss covers response tokens only; batches are padded to their longest example.
bf16 on GPU, float32 on a CPU-only machine.

Restarting the same command resumes: finished stages (a ``final`` folder) are
skipped, an unfinished one resumes from its newest checkpoint, which is checked
first (see ``uniattn.resume``). Every checkpoint is a loadable model with its
tokenizer (UniAttn ones carry ``auto_map`` and their code). Arguments, data,
init file and checkpoints are all checked before anything is written.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, Trainer, TrainerCallback,
                          TrainingArguments)

import uniattn  # noqa: F401  (registers the UniAttn classes, so every save carries auto_map)

from .convert import load_converted, uniattn_config_from
from .distill import DistillTrainer, load_teacher
from .data import IGNORE_INDEX, collate, default_data_file, load_records, tokenize
from .eval.split import train_eval_split
from .init_file import load_init, read_metadata
from .modeling import UNIATTN_FAMILIES
from .net import free_port
from .presets import CONFIGS_DIR, read_preset, select_preset
from .resume import RUN_FILE, CheckpointError, check_run_file, resume_point, write_run_file

logger = logging.getLogger(__name__)

MODES = ("plain", "softmax", "uniattn", "cla", "drop")
REPO_DIR = CONFIGS_DIR.parent
# Flags of this script; everything else is a TrainingArguments flag.
SCRIPT_FLAGS = ("mode", "model_dir", "data", "superblock", "init_path", "preset", "max_length",
                "effective_batch_size", "attn_implementation", "check_only", "include_eval_items", "zero_init",
                "trainer_callback")
# Stage-1 options of --mode uniattn and their defaults (the seed's recipe). A run file without them (written
# before they existed) counts as having these values, so it still resumes.
STAGE1_DEFAULTS = {"stage1_objective": "lm", "stage1_trainable": "compensation", "stage1_share": None,
                   "init_scale": 1.0, "stage1_data": None}


class UsageError(ValueError):
    """A bad argument combination; the message names the value and the fix."""


@dataclass
class Stage:
    name: str             # "train" (plain / softmax), "stage1", "stage2" (uniattn)
    trainer_dir: Path     # where the Trainer writes checkpoint-N
    final: Path           # the stage's finished model
    trainable: str        # "all", "all_but_compensation", "compensation", "compensation_vo"


def plan_stages(mode: str, out: Path, stage1_trainable: str = "compensation",
                softmax_compensation: bool = False) -> list[Stage]:
    """The stages of a run. ``softmax_compensation``: a softmax run begun with a frozen zero ``W_c``
    (before followers could leave it out) keeps training everything but it; without ``W_c`` that is "all"."""
    if mode == "plain":
        return [Stage("train", out, out / "final", "all")]
    if mode == "softmax":
        return [Stage("train", out, out / "final", "all_but_compensation" if softmax_compensation else "all")]
    if mode in ("cla", "drop"):
        return [Stage("train", out, out / "final", "all")]
    return [
        Stage("stage1", out / "stage1", out / "stage1" / "final", stage1_trainable),
        Stage("stage2", out / "stage2", out / "final", "all"),
    ]


# ---------------------------------------------------------------- arguments
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
    s1 = parser.add_argument_group("UniAttn stage 1 (--mode uniattn; the defaults are the seed's recipe)")
    s1.add_argument("--stage1_objective", choices=("lm", "kl"), default="lm",
                    help="lm: the SFT loss on response tokens; kl: distil the base model (--model_dir, frozen), "
                         "mean KL(teacher || student) of the next-token distribution over every real token")
    s1.add_argument("--stage1_data", metavar="FILE",
                    help="records whose prompt + response text stage 1 uses without labels (--stage1_objective kl; "
                         "default: the training records)")
    s1.add_argument("--stage1_trainable", choices=("compensation", "compensation_vo"), default="compensation",
                    help="compensation: only W_c; compensation_vo: also the followers' v_proj and o_proj")
    s1.add_argument("--stage1_share", type=float, metavar="F",
                    help="equal-steps protocol: stage 1 gets a share F in (0, 1) of the records (seeded by --seed) "
                         "and round(F * max_steps) steps (Python's round), stage 2 the other records and the rest "
                         "of the steps; with epochs each stage runs them over its own part "
                         "(default: both stages the whole schedule on the same data). With --stage1_data only "
                         "the steps are split")
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


# ---------------------------------------------------------------- checks before anything is written
@dataclass
class Checked:
    records: list
    tokenizer: object
    init_tensors: dict | None
    resume: dict          # stage name -> checkpoint path or None
    identity: dict
    finished: bool
    # stage name -> {"records": the records it trains on, "max_steps": its own max_steps or None (targs')}
    plan: dict = field(default_factory=dict)
    softmax_compensation: bool = False  # a softmax run begun with the frozen zero W_c (begun_with_compensation)


def check_everything(script, targs: dict, config) -> Checked:
    if not script.output_dir_given:
        raise UsageError("--output_dir is required (OUTPUT_DIR in the scripts)")
    mode, out = script.mode, Path(targs["output_dir"])
    if mode == "plain" and script.superblock:
        raise UsageError("--superblock is for --mode softmax / uniattn / cla; plain fine-tuning keeps the architecture")
    if mode != "plain" and not script.superblock:
        raise UsageError(f"--mode {mode} needs --superblock G B E (e.g. 4 14 30)")
    if mode != "uniattn" and script.init_path:
        raise UsageError(f"--init_path is only used by --mode uniattn, not {mode}")
    if script.zero_init and (mode != "uniattn" or script.init_path):
        raise UsageError("--zero_init is for --mode uniattn without --init_path (W_c starts at zero)")
    _check_stage1_flags(script, targs)
    init_tensors = None
    # softmax mode: followers without W_c, unless OUTPUT_DIR holds a run begun with the frozen zero W_c
    softmax_compensation = mode == "softmax" and begun_with_compensation(out)
    if mode != "plain":
        # rejects a bad layout, names the fix
        uni_config = uniattn_config_from(config, tuple(script.superblock), sharing_of(mode),
                                         compensation=mode != "softmax" or softmax_compensation)
        logger.info("%s", uni_config.superblock_layout.describe())
        if mode == "uniattn" and not script.zero_init:
            if not script.init_path:
                raise UsageError("--mode uniattn needs --init_path (INIT_PATH): the output of "
                                 "scripts/train_deepspeed-init_calc.sh for this model and layout "
                                 "(or --zero_init to start W_c at zero)")
            init_tensors = load_init(script.init_path, uni_config)
            _check_init_tensors(init_tensors, uni_config, script)
    if script.max_length < 2:
        raise UsageError(f"--max_length {script.max_length} is too small; the seed uses 1024")
    records = load_records(script.data)
    if not script.include_eval_items:
        # The lm-eval tasks are built from held-out PMC-LLaMA items: never train on them.
        records, held_out = train_eval_split(records)
        if not records:
            raise UsageError(f"every record of {script.data} is an evaluation item (uniattn.eval.split); "
                             "pass --include_eval_items to train on them anyway")
        logger.info("training split: %d records (%d held out for evaluation)", len(records), len(held_out))
    try:
        tokenizer = AutoTokenizer.from_pretrained(script.model_dir)
    except (OSError, ValueError) as err:
        raise UsageError(f"no tokenizer could be loaded from {script.model_dir} ({err}); the checkpoint needs one") from err
    if tokenizer.eos_token_id is None:
        raise UsageError(f"the tokenizer of {script.model_dir} has no EOS token; the response labels end with it")
    _check_lengths(records, tokenizer, script)
    callback_classes(script.trainer_callback)  # a bad one stops here, before anything is written
    identity = {
        "mode": mode,
        "model_dir": str(Path(script.model_dir).resolve()),
        "data": str(Path(script.data).resolve()),
        "superblock": list(script.superblock) if script.superblock else None,
        "init_path": str(Path(script.init_path).resolve()) if script.init_path else None,
    }
    if script.zero_init:
        identity["zero_init"] = True
    if mode == "softmax":
        identity["compensation"] = softmax_compensation
    plan = _plan_stage_data(script, targs, records)
    if mode == "uniattn":
        identity.update({k: getattr(script, k) for k in STAGE1_DEFAULTS},
                        stage1_data=str(Path(script.stage1_data).resolve()) if script.stage1_data else None)
        if script.stage1_share is not None:
            # the split and the step counts: resuming with another seed or max_steps would mix two splits
            identity["stage1_split"] = {"seed": targs["seed"], **{name: {"records": len(p["records"]),
                                        "max_steps": p["max_steps"]} for name, p in plan.items()}}
    # a run file without "compensation" was written when every softmax follower had a W_c
    check_run_file(out, identity, {**STAGE1_DEFAULTS, "stage1_split": None, "compensation": True})
    world = int(os.environ.get("WORLD_SIZE", 1))
    resume, finished = {}, True
    stages = plan_stages(mode, out, script.stage1_trainable, softmax_compensation)
    for i, stage in enumerate(stages):
        if stage.final.is_dir():
            resume[stage.name] = None
            continue
        finished = False
        later = stages[i + 1:]
        if any(s.final.is_dir() or resume_point(s.trainer_dir, world, bool(targs["deepspeed"])) for s in later):
            raise CheckpointError(f"{out} has results of a stage after {stage.name} but not {stage.final}; "
                                  "delete OUTPUT_DIR to start over")
        resume[stage.name] = resume_point(stage.trainer_dir, world, bool(targs["deepspeed"]))
        break
    return Checked(records, tokenizer, init_tensors, resume, identity, finished, plan, softmax_compensation)


def begun_with_compensation(out: Path) -> bool:
    """Whether OUTPUT_DIR holds a softmax run begun when softmax followers still had a frozen, all-zero W_c
    (its run file records no "compensation"): its checkpoints hold W_c, so it resumes with it."""
    try:
        saved = json.loads((out / RUN_FILE).read_text())
    except (OSError, ValueError):
        return False  # no run yet, or an unreadable run file (check_run_file reports that)
    return isinstance(saved, dict) and saved.get("mode") == "softmax" and saved.get("compensation", True) is True


def _check_stage1_flags(script, targs: dict) -> None:
    """The stage-1 options: only for --mode uniattn, and each value in range (nothing is read yet)."""
    given = script.stage1_given
    if script.mode != "uniattn":
        if given:
            names = " ".join(f"--{k}" for k in given)
            raise UsageError(f"{names}: stage-1 option{'s' if len(given) > 1 else ''} of --mode uniattn, "
                             f"not --mode {script.mode}; drop {'them' if len(given) > 1 else 'it'} "
                             "or use --mode uniattn")
        return
    share, scale = script.stage1_share, script.init_scale
    if share is not None and not 0 < share < 1:
        raise UsageError(f"--stage1_share {share} is outside (0, 1): pass stage 1's fraction of the records and "
                         "steps, e.g. 0.5 (leave it out for the seed's protocol: both stages the whole schedule)")
    if not (math.isfinite(scale) and scale > 0):
        raise UsageError(f"--init_scale {scale} must be a finite number > 0 (1 keeps the init-calc W_c, "
                         "0.5 halves it); for W_c starting at zero use --zero_init")
    if script.zero_init and "init_scale" in given:
        raise UsageError(f"--init_scale {scale} scales the init-calc W_c, but --zero_init starts W_c at zero; "
                         "drop one of them")
    if script.stage1_data and script.stage1_objective != "kl":
        raise UsageError(f"--stage1_data {script.stage1_data} is read without labels, for distillation: add "
                         "--stage1_objective kl, or drop --stage1_data to train stage 1 on the training data")
    steps = targs.get("max_steps") or -1
    if share is not None and steps > 0:
        first = round(share * steps)
        if first < 1 or steps - first < 1:
            raise UsageError(f"--stage1_share {share} of --max_steps {steps} gives stage 1 {first} and stage 2 "
                             f"{steps - first} optimizer steps; each stage needs at least 1: raise --max_steps "
                             "or choose a share nearer 0.5")
    if share is not None and script.stage1_data and steps <= 0:
        raise UsageError(f"--stage1_share {share} with --stage1_data splits the optimizer steps only (stage 1 has "
                         "its own records), so it needs --max_steps N; or drop --stage1_data to split the records")


def split_records(n: int, share: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of the stage-1 and stage-2 parts: a permutation seeded by ``seed``, round(share * n) for stage 1.

    Disjoint, together every index once; each part in the original order."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    first = round(share * n)
    return sorted(order[:first]), sorted(order[first:])


def _plan_stage_data(script, targs: dict, records: list) -> dict:
    """Each stage's records and max_steps (None: the Trainer's own, from --max_steps or the epochs)."""
    if script.mode != "uniattn":
        return {"train": {"records": records, "max_steps": None}}
    steps = targs.get("max_steps") or -1
    share = script.stage1_share
    first, second = records, records
    if share is not None and not script.stage1_data:
        one, two = split_records(len(records), share, targs["seed"])
        if not one or not two:
            raise UsageError(f"--stage1_share {share} of the {len(records)} training records of {script.data} gives "
                             f"stage 1 {len(one)} and stage 2 {len(two)} records; each stage needs at least 1: "
                             "use more records or a share nearer 0.5")
        first, second = [records[i] for i in one], [records[i] for i in two]
    if script.stage1_data:
        first = load_records(script.stage1_data)  # DataError names the file, the record and the fix
        if not script.include_eval_items:
            first, _ = train_eval_split(first)
            if not first:
                raise UsageError(f"every record of --stage1_data {script.stage1_data} is an evaluation item "
                                 "(uniattn.eval.split); pass --include_eval_items to use them anyway")
        logger.info("stage 1 distils on %d records of %s", len(first), script.stage1_data)
    if share is not None and steps > 0:
        s1 = round(share * steps)
        budget = {"stage1": s1, "stage2": steps - s1}
    else:
        budget = {"stage1": None, "stage2": None}
    if share is not None:
        logger.info("equal-steps protocol: stage 1 %d records / %s steps, stage 2 %d records / %s steps",
                    len(first), budget["stage1"] or "epochs", len(second), budget["stage2"] or "epochs")
    return {"stage1": {"records": first, "max_steps": budget["stage1"]},
            "stage2": {"records": second, "max_steps": budget["stage2"]}}


def sharing_of(mode: str) -> str:
    return {"cla": "kv", "drop": "drop"}.get(mode, "softmax")


def _check_init_tensors(tensors: dict, config, script) -> None:
    """Names and shapes must be this model's W_c (load_init checks the layout and model identity)."""
    bias = getattr(config, "attention_bias", False)
    want = {f"model.layers.{i}.self_attn.compensation.{w}": (config.hidden_size,) * (2 if w == "weight" else 1)
            for i in config.superblock_layout.followers for w in (("weight", "bias") if bias else ("weight",))}
    wrong = [f"{k} {tuple(v.shape)}" for k, v in tensors.items() if want.get(k) != tuple(v.shape)]
    if wrong:
        raise UsageError(f"init file {script.init_path} holds tensors this model does not have or in another shape "
                         f"({', '.join(wrong[:3])}); rerun init calc for this model")
    base = read_metadata(script.init_path).get("base_model")
    if base and Path(base).resolve() != Path(script.model_dir).resolve():
        logger.warning("init file %s was computed from %s, not from %s; the shapes and layout match, so it is used",
                       script.init_path, base, script.model_dir)


def _check_lengths(records, tokenizer, script, probe: int = 64) -> None:
    """Refuse a max_length that cuts every response away (the loss would be empty); report any record it empties."""
    sample = records[:probe]
    empty = sum(all(l == IGNORE_INDEX for l in tokenize(r, tokenizer, script.max_length).labels) for r in sample)
    if empty == len(sample):
        raise UsageError(f"--max_length {script.max_length} leaves no response token in the first {len(sample)} "
                         f"records of {script.data} (the prompts are longer); raise it (the seed uses 1024)")
    if empty:
        logger.warning("--max_length %d cuts the whole response of %d of the first %d records; they add no loss",
                       script.max_length, empty, len(sample))


# ---------------------------------------------------------------- data, model, stages
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
        model = AutoModelForCausalLM.from_pretrained(stages[0].final, dtype=dtype)
    elif script.mode == "plain":
        model = AutoModelForCausalLM.from_pretrained(script.model_dir, dtype=dtype)
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


def callback_classes(specs: list[str]) -> list[type]:
    """``--trainer_callback MODULE:NAME`` values -> TrainerCallback classes; UsageError naming a bad one."""
    import importlib

    classes = []
    for spec in specs:
        module, _, name = spec.partition(":")
        try:
            cls = getattr(importlib.import_module(module), name) if module and name else None
        except (ImportError, AttributeError) as err:
            raise UsageError(f"--trainer_callback {spec}: {err}; pass MODULE:NAME of an importable "
                             "TrainerCallback class (MODULE on PYTHONPATH)") from None
        if not (isinstance(cls, type) and issubclass(cls, TrainerCallback)):
            raise UsageError(f"--trainer_callback {spec!r} is not MODULE:NAME of a transformers TrainerCallback class")
        classes.append(cls)
    return classes


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


def _launcher_env() -> None:
    # DeepSpeed without a launcher looks for MPI; one process needs only these.
    if "WORLD_SIZE" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # DeepSpeed 0.19 calls torch.distributed functions that torch 2.13 deprecates, once per bucket per step.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        script, targs, config = parse_args(argv)
        checked = check_everything(script, targs, config)
    except (ValueError, FileNotFoundError, CheckpointError) as err:  # DataError, UsageError, layout errors
        if rank == 0:
            print(f"error: {err}", file=sys.stderr)
        return 2
    if script.check_only:
        print("ok: arguments, data, init file and OUTPUT_DIR are usable")
        return 0
    if checked.finished:
        if rank == 0:
            print(f"{targs['output_dir']}/final exists: this run already finished; pass a new OUTPUT_DIR to train again")
        return 0
    _launcher_env()
    final = train(script, targs, checked)
    if rank == 0:
        print(f"final model: {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
