"""Every check that runs before anything is written: data, init file, stage-1 flags, callbacks, resume."""


from __future__ import annotations

import json
import logging
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoTokenizer, TrainerCallback


from ..convert import uniattn_config_from
from ..data import IGNORE_INDEX, load_records, tokenize
from ..eval.split import train_eval_split
from ..init_file import load_init, read_metadata
from ..loading import attn_implementation_for
from .resume import RUN_FILE, CheckpointError, check_run_file, resume_point

from .arguments import STAGE1_DEFAULTS, UsageError

logger = logging.getLogger(__name__)


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
    _keep_protocol_of_begun_run(script, out)
    _check_stage1_flags(script, targs)
    if mode == "plain":
        try:  # a stock soft-capped model must not get a kernel that drops the cap (UniAttn maps it itself)
            attn_implementation_for(config, script.attn_implementation)
        except ValueError as err:
            raise UsageError(f"--attn_implementation: {err}") from None
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


def _share_asked(script) -> bool:
    """Whether --stage1_share was passed: the default gets each stage at least one step and record."""
    return "stage1_share" in script.stage1_given


def _keep_protocol_of_begun_run(script, out: Path) -> None:
    """A UniAttn run begun under the seed's protocol (explicitly, or before the default became a share)
    resumes under it when --stage1_share is not passed, rather than refusing to resume."""
    if script.mode != "uniattn" or _share_asked(script):
        return
    try:
        saved = json.loads((out / RUN_FILE).read_text())
    except (OSError, ValueError):
        return  # no run yet, or an unreadable run file (check_run_file reports that)
    if isinstance(saved, dict) and saved.get("mode") == "uniattn" and saved.get("stage1_share") is None:
        logger.info("%s was begun with the seed's protocol (both stages the whole schedule): it continues so; "
                    "for the equal-steps protocol start a new OUTPUT_DIR with --stage1_share F", out)
        script.stage1_share = None


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
    asked = _share_asked(script)
    if share is not None and steps > 0:
        first = part_size(share, steps, asked)
        if first < 1 or steps - first < 1:
            raise UsageError(f"--stage1_share {share} of --max_steps {steps} gives stage 1 {first} and stage 2 "
                             f"{steps - first} optimizer steps; each stage needs at least 1: raise --max_steps, "
                             "choose a share nearer 0.5, or pass --stage1_share seed (both stages the whole schedule)")
    if share is not None and script.stage1_data and steps <= 0:
        raise UsageError(f"--stage1_share {share}{'' if asked else ' (the default)'} with --stage1_data splits the "
                         "optimizer steps only (stage 1 has its own records), so it needs --max_steps N; or drop "
                         "--stage1_data to split the records, or pass --stage1_share seed (both stages the whole "
                         "schedule)")


def part_size(share: float, n: int, exact: bool = True) -> int:
    """Stage 1's part of ``n`` steps or records: round(share * n); unless ``exact`` (the default share, not
    asked for), at least 1 and at most n - 1 where n allows, so a short run still has both stages."""
    first = round(share * n)
    return first if exact or n < 2 else min(max(first, 1), n - 1)


def split_records(n: int, share: float, seed: int, exact: bool = True) -> tuple[list[int], list[int]]:
    """Indices of the stage-1 and stage-2 parts: a permutation seeded by ``seed``, ``part_size`` for stage 1.

    Disjoint, together every index once; each part in the original order."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    first = part_size(share, n, exact)
    return sorted(order[:first]), sorted(order[first:])


def _plan_stage_data(script, targs: dict, records: list) -> dict:
    """Each stage's records and max_steps (None: the Trainer's own, from --max_steps or the epochs)."""
    if script.mode != "uniattn":
        return {"train": {"records": records, "max_steps": None}}
    steps = targs.get("max_steps") or -1
    share = script.stage1_share
    first, second = records, records
    exact = _share_asked(script)
    if share is not None and not script.stage1_data:
        one, two = split_records(len(records), share, targs["seed"], exact)
        if not one or not two:
            raise UsageError(f"--stage1_share {share} of the {len(records)} training records of {script.data} gives "
                             f"stage 1 {len(one)} and stage 2 {len(two)} records; each stage needs at least 1: "
                             "use more records, a share nearer 0.5, or --stage1_share seed (both stages every record)")
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
        s1 = part_size(share, steps, exact)
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


