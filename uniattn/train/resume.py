"""What a training OUTPUT_DIR holds, so a restarted command picks up where it stopped.

Layout written by ``uniattn.train``::

    OUTPUT_DIR/uniattn_run.json      what the run is (mode, model, data, layout, init file)
    OUTPUT_DIR/checkpoint-N/         Trainer + DeepSpeed checkpoints   (plain, softmax)
    OUTPUT_DIR/stage1/checkpoint-N/  stage 1 checkpoints               (uniattn)
    OUTPUT_DIR/stage1/final/         stage 1 result, stage 2's start   (uniattn)
    OUTPUT_DIR/stage2/checkpoint-N/  stage 2 checkpoints               (uniattn)
    OUTPUT_DIR/final/                the trained model

A ``final`` folder appears only complete (written under a temporary name, then
renamed), so its presence means the stage is done. Trainer checkpoints are
written in place, so a crash while saving can leave the newest one half
written; it is reported (naming the missing or damaged file and the fix), never
skipped silently, because resuming from an older one would quietly repeat work
with a different random state.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

from safetensors import safe_open

from ..io import write_json

RUN_FILE = "uniattn_run.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    """An OUTPUT_DIR or checkpoint that cannot be resumed; the message says why and what to do."""


def checkpoints(folder: Path) -> list[Path]:
    """``checkpoint-N`` folders of ``folder``, oldest step first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


def _broken(path: Path, problem: str, previous: Path | None) -> CheckpointError:
    fix = (
        f"delete {path} to resume from {previous.name}" if previous is not None
        else f"delete {path} to start this stage again"
    )
    return CheckpointError(
        f"checkpoint {path} is incomplete or damaged: {problem}. It was probably cut off while being saved; {fix}"
    )


def _check_zip(path: Path) -> str | None:
    # torch.save writes zip archives; a truncated one has no central directory at its end.
    try:
        with zipfile.ZipFile(path) as zf:
            zf.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        return f"{path.name} is unreadable ({err})"
    return None


def _check_weights(path: Path) -> str | None:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as err:
            return f"{index.name} is unreadable ({err})"
    elif (path / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        return "no model weights (model.safetensors)"
    for shard in shards:
        try:
            with safe_open(path / shard, "pt") as f:  # reads the header; a truncated file fails its size check
                f.keys()
        except Exception as err:  # safetensors has its own error types for a bad header or a short file
            return f"{shard} is unreadable ({err})"
    return None


def check_checkpoint(path: Path, world_size: int, deepspeed: bool = True) -> int:
    """Check that ``path`` holds everything the Trainer needs to resume; returns its global step."""
    path = Path(path)
    found = checkpoints(path.parent)
    older = found[: found.index(path)] if path in found else found
    previous = older[-1] if older else None
    state_file = path / "trainer_state.json"
    if not state_file.is_file():
        raise _broken(path, "trainer_state.json is missing", previous)
    try:
        step = int(json.loads(state_file.read_text())["global_step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise _broken(path, f"trainer_state.json is unreadable ({err})", previous) from err
    try:
        json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise _broken(path, f"config.json is missing or unreadable ({err})", previous) from err
    problem = _check_weights(path)
    if problem:
        raise _broken(path, problem, previous)
    if deepspeed:
        latest = path / "latest"
        if not latest.is_file():
            raise _broken(path, "the DeepSpeed file `latest` is missing", previous)
        tag_dir = path / latest.read_text().strip()
        optim = sorted(tag_dir.glob("*optim_states.pt"))
        model_states = sorted(tag_dir.glob("*model_states.pt"))
        if not optim or not model_states:
            raise _broken(path, f"{tag_dir.name}/ lacks DeepSpeed model or optimizer states", previous)
        for f in optim + model_states:
            problem = _check_zip(f)
            if problem:
                raise _broken(path, f"{tag_dir.name}/{problem}", previous)
        if len(optim) != world_size:
            raise CheckpointError(
                f"checkpoint {path} was written by {len(optim)} processes and this run has {world_size}; "
                f"DeepSpeed shards the optimizer per process, so resume with {len(optim)} processes "
                f"(NUM_GPUS={len(optim)})"
            )
    for rng in path.glob("rng_state*.pth"):
        problem = _check_zip(rng)
        if problem:
            raise _broken(path, problem, previous)
    return step


def resume_point(folder: Path, world_size: int, deepspeed: bool = True) -> Path | None:
    """The newest checkpoint of ``folder`` after checking it, or None when there is none."""
    found = checkpoints(folder)
    if not found:
        return None
    check_checkpoint(found[-1], world_size, deepspeed)
    return found[-1]


def check_run_file(output_dir: Path, identity: dict, defaults: dict | None = None) -> None:
    """Refuse an OUTPUT_DIR that holds another run (or something else): resuming it would mix two runs.

    ``defaults`` gives the value of a setting that a run file written before that setting existed lacks
    (and that ``identity`` may leave out), so such a run still resumes when the setting is at its default.
    """
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise CheckpointError(f"OUTPUT_DIR {output_dir} is a file; pass a directory")
    run_file = output_dir / RUN_FILE
    if not run_file.is_file():
        if any(output_dir.iterdir()):
            raise CheckpointError(
                f"OUTPUT_DIR {output_dir} is not empty and holds no {RUN_FILE}, so it was not written by "
                "uniattn.train; choose a new or empty directory"
            )
        return
    try:
        saved = json.loads(run_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{run_file} is unreadable ({err}); delete OUTPUT_DIR {output_dir} to start over") from err
    defaults = defaults or {}
    keys = list(identity) + [k for k in defaults if k not in identity]
    both = {k: (saved.get(k, defaults.get(k)), identity.get(k, defaults.get(k))) for k in keys}
    differ = {k: (a, b) for k, (a, b) in both.items() if a != b}
    if differ:
        details = "; ".join(f"{k}: there {a!r}, now {b!r}" for k, (a, b) in differ.items())
        raise CheckpointError(
            f"OUTPUT_DIR {output_dir} holds another run ({details}); pass a new OUTPUT_DIR or delete this one"
        )


def write_run_file(output_dir: Path, identity: dict) -> None:
    write_json(output_dir / RUN_FILE, identity, ensure_ascii=True)
