"""Per-model training presets: the YAML files in ``configs/`` and how one is picked.

A preset has a ``training`` block (values for ``uniattn.train`` flags) and, except
``default.yaml``, a ``match`` block of config fields (``model_type``,
``num_hidden_layers``, ``hidden_size``, ...). The preset whose ``match`` agrees
with the checkpoint's ``config.json`` on every field is used; a UniAttn
checkpoint matches through its base model type. No match: ``default.yaml``, with
a warning. Flags given on the command line always win over the preset.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import yaml

logger = logging.getLogger(__name__)

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_PRESET = "default.yaml"


@dataclass
class Preset:
    path: Path
    match: dict
    training: dict


def read_preset(path) -> Preset:
    path = Path(path)
    if not path.is_file():
        alt = CONFIGS_DIR / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
        if not alt.is_file():
            known = ", ".join(sorted(p.name for p in CONFIGS_DIR.glob("*.yaml")))
            raise FileNotFoundError(f"preset {path} does not exist; pass a YAML file or one of: {known}")
        path = alt
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"preset {path} is not valid YAML ({err})") from err
    if not isinstance(data, dict) or not isinstance(data.get("training"), dict):
        raise ValueError(f"preset {path} needs a `training:` mapping of flag names to values")
    extra = set(data) - {"match", "training"}
    if extra:
        raise ValueError(f"preset {path} has unknown top-level keys {sorted(extra)}; only `match` and `training` exist")
    return Preset(path, data.get("match") or {}, data["training"])


def _config_value(config, key):
    if key == "model_type":  # a UniAttn checkpoint trains with its base family's preset
        return getattr(config, "base_model_type", None) or config.model_type
    return getattr(config, key, None)


def matches(preset: Preset, config) -> bool:
    return bool(preset.match) and all(_config_value(config, k) == v for k, v in preset.match.items())


def select_preset(config, configs_dir: Path = CONFIGS_DIR) -> Preset:
    """The preset of ``configs_dir`` whose ``match`` fits ``config``, else ``default.yaml``."""
    presets = [read_preset(p) for p in sorted(configs_dir.glob("*.yaml"))]
    hits = [p for p in presets if matches(p, config)]
    if len(hits) > 1:
        raise ValueError(
            f"presets {[p.path.name for p in hits]} all match this model; make their `match` blocks "
            "distinct or pass --preset"
        )
    if hits:
        return hits[0]
    fields = {k: _config_value(config, k) for k in ("model_type", "num_hidden_layers", "hidden_size", "vocab_size")}
    logger.warning(
        "no preset in %s matches this model (%s); using %s. Pass --preset FILE to choose one.",
        configs_dir, fields, DEFAULT_PRESET,
    )
    return read_preset(configs_dir / DEFAULT_PRESET)
