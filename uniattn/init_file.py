"""The init-calc output file: the closed-form ``W_c`` tensors plus metadata, in one safetensors file.

Tensor names are the UniAttn model's own state-dict keys
(``model.layers.{i}.self_attn.compensation.weight``), so applying the file is a
``load_state_dict``. The metadata records the layout, the base model and how the
statistics were gathered; ``load_init`` refuses a file made for another layout
or model before anything is trained.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .io import atomic_path

FORMAT = "uniattn-init/1"


def _identity(config) -> dict:
    return {
        "base_model_type": config.base_model_type,
        "num_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "superblock": str(config.superblock_layout),
    }


def save_init(path, tensors: dict[str, torch.Tensor], config, extra: dict | None = None) -> Path:
    """Write ``tensors`` + metadata atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    meta = {"format": FORMAT, **_identity(config), "base_model": str(config._name_or_path), **(extra or {})}
    with atomic_path(path, suffix=".tmp") as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                  metadata={"uniattn": json.dumps(meta, sort_keys=True)})
    return path


def read_metadata(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init file {path} does not exist; run scripts/train_deepspeed-init_calc.sh first")
    try:
        with safe_open(path, "pt") as f:
            meta = (f.metadata() or {}).get("uniattn")
    except Exception as err:  # safetensors raises its own error types for a damaged header
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from err
    if meta is None:
        raise ValueError(f"{path} is a safetensors file without UniAttn metadata; it was not written by init_calc")
    return json.loads(meta)


def load_init(path, config) -> dict[str, torch.Tensor]:
    """The ``W_c`` state dict of ``path``, after checking it was made for ``config``'s model and layout."""
    meta = read_metadata(path)
    want = _identity(config)
    wrong = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
    if wrong:
        details = ", ".join(f"{k}: file has {a!r}, model has {b!r}" for k, (a, b) in wrong.items())
        raise ValueError(f"init file {path} was made for another model or layout ({details}); rerun init calc for this one")
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    expected = {f"model.layers.{i}.self_attn.compensation.weight" for i in config.superblock_layout.followers}
    if not expected <= tensors.keys():
        raise ValueError(f"init file {path} lacks {sorted(expected - tensors.keys())[:3]}")
    return tensors


def apply_init(model, path) -> dict:
    """Copy the file's ``W_c`` into ``model`` (a UniAttn causal LM); returns the file's metadata."""
    tensors = load_init(path, model.config)
    state = model.state_dict()
    with torch.no_grad():
        for name, tensor in tensors.items():
            state[name].copy_(tensor.to(state[name].dtype))
    return read_metadata(path)
