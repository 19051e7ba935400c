"""Turn a plain LLaMA / Mistral / Gemma-2 checkpoint into a UniAttn checkpoint.

    python -m uniattn.convert BASE_DIR OUT_DIR --superblock G B E [--sharing kv|drop] [--no_compensation]

The family is read from ``BASE_DIR/config.json`` (``model_type``), never from
the path. Followers lose ``q_proj`` / ``k_proj``; every ``W_c`` starts at zero
(the closed-form values come from ``uniattn.init_calc``); ``--no_compensation``
leaves ``W_c`` out altogether (the "Softmax unification only" arm: followers
compute ``o_proj(P V)``, with no ``W_c`` matmul or parameters). ``--sharing kv``
builds the cross-layer KV sharing (CLA) baseline instead: followers lose
``k_proj`` / ``v_proj`` and have no ``W_c``. ``--sharing drop`` builds the
layer-dropping (LLMDrop) baseline: followers lose their whole attention
(``q/k/v/o_proj``; their layer norms stay) and have no ``W_c``. The tokenizer and
generation config are copied, and the saved checkpoint carries ``auto_map`` and
the modeling code, so it loads with ``trust_remote_code=True`` anywhere.
The output is staged under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from .io import atomic_dir

logger = logging.getLogger(__name__)

_DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def uniattn_config_from(base_config, superblock: tuple[int, int, int], sharing: str = "softmax",
                        compensation: bool = True):
    """A UniAttn config with the base config's fields, the layout ``(G, B, E)``, what followers share and,
    for ``sharing="softmax"``, whether they have the compensation ``W_c`` (False: Softmax unification only)."""
    from .modeling import UNIATTN_FAMILIES

    family = base_config.model_type
    if family.startswith("uniattn_"):
        raise ValueError(f"this checkpoint is already a UniAttn model ({family}); convert its base model instead")
    if family not in UNIATTN_FAMILIES:
        raise ValueError(
            f"model_type {family!r} is not supported; UniAttn converts {', '.join(sorted(UNIATTN_FAMILIES))}"
        )
    config_class, _ = UNIATTN_FAMILIES[family]
    fields = base_config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map", "quantization_config"):
        fields.pop(key, None)
    if not compensation and sharing != "softmax":
        raise ValueError(f"leaving W_c out (--no_compensation) is for sharing 'softmax' (UniAttn followers); "
                         f"{sharing!r} followers never have a W_c: drop --no_compensation")
    g, b, e = (int(v) for v in superblock)
    return config_class(**fields, superblock_size=g, superblock_begin=b, superblock_end=e, superblock_sharing=sharing,
                        superblock_compensation=bool(compensation))


# superblock_sharing -> the base attention projections a follower does not have
DROPPED_PROJECTIONS = {"softmax": "qk", "kv": "kv", "drop": "qkvo"}


def dropped_keys(config) -> set[str]:
    """Base weights a follower does not have: Q/K for UniAttn, K/V for CLA, Q/K/V/O for drop."""
    projections = DROPPED_PROJECTIONS[config.superblock_sharing]
    return {f"model.layers.{i}.self_attn.{p}_proj.{w}"
            for i in config.superblock_layout.followers for p in projections for w in ("weight", "bias")}


def load_converted(base_dir, superblock, dtype="auto", sharing: str = "softmax", compensation: bool = True):
    """Load a plain checkpoint straight into a UniAttn (or CLA, or drop) model (``W_c = 0``, or no ``W_c`` with
    ``compensation=False``); returns (model, config)."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    from .modeling import UNIATTN_FAMILIES

    base_config = AutoConfig.from_pretrained(base_dir)
    config = uniattn_config_from(base_config, superblock, sharing, compensation)
    _, model_class = UNIATTN_FAMILIES[base_config.model_type]
    # transformers reports the dropped follower Q/K and the new W_c as a loading problem;
    # they are expected, and checked exactly below, so its report is silenced here.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = model_class.from_pretrained(
            base_dir, config=config, dtype=_DTYPES.get(dtype, dtype), output_loading_info=True
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    layout = config.superblock_layout
    expected_missing = {f"model.layers.{i}.self_attn.compensation.{w}" for i in layout.followers for w in ("weight", "bias")}
    missing = set(info["missing_keys"]) - expected_missing
    unexpected = set(info["unexpected_keys"]) - dropped_keys(config)
    if missing or unexpected:
        raise ValueError(
            f"{base_dir} does not match a {base_config.model_type} model of this shape: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.config._name_or_path = str(base_dir)
    return model, config


def save_checkpoint(model, out_dir, tokenizer_from=None, overwrite: bool = False) -> Path:
    """Save model (+ tokenizer copied from ``tokenizer_from``) atomically to ``out_dir``."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    with atomic_dir(out) as staged:
        model.save_pretrained(staged)
        if tokenizer_from is not None:
            copy_tokenizer(tokenizer_from, staged)
    return out


def copy_tokenizer(src, dst) -> bool:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as err:
        logger.warning("no tokenizer copied from %s (%s)", src, err)
        return False
    tokenizer.save_pretrained(dst)
    return True


def convert(base_dir, out_dir, superblock, dtype="auto", overwrite: bool = False, sharing: str = "softmax",
            compensation: bool = True) -> Path:
    """Convert ``base_dir`` into a UniAttn (``sharing="kv"``: CLA, ``"drop"``: layer dropping) checkpoint
    with layout ``(G, B, E)``; ``compensation=False``: UniAttn followers without ``W_c`` (softmax only)."""
    import uniattn  # noqa: F401  (registers the auto classes so the save carries auto_map)

    base = Path(base_dir)
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"{base} has no config.json: pass a Hugging Face checkpoint directory")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    model, config = load_converted(base, superblock, dtype, sharing, compensation)
    logger.info("%s", config.superblock_layout.describe())
    return save_checkpoint(model, out, tokenizer_from=base, overwrite=overwrite)


def main(argv=None) -> int:
    from .modeling.configuration_uniattn import SHARINGS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base_dir", help="plain Hugging Face checkpoint (LLaMA, Mistral or Gemma-2)")
    parser.add_argument("out_dir", help="where to write the UniAttn checkpoint")
    parser.add_argument("--superblock", nargs=3, type=int, required=True, metavar=("G", "B", "E"),
                        help="SuperBlock size, first layer, end layer (exclusive), e.g. 4 16 33")
    parser.add_argument("--dtype", default="auto", choices=sorted(_DTYPES), help="weight dtype to save")
    parser.add_argument("--sharing", default="softmax", choices=SHARINGS,
                        help="what followers reuse: softmax (UniAttn), kv (cross-layer KV sharing, CLA) "
                             "or drop (no attention at all: layer dropping, LLMDrop)")
    parser.add_argument("--no_compensation", dest="compensation", action="store_false",
                        help="UniAttn followers without W_c (Softmax unification only: no W_c matmul or "
                             "parameters); for --sharing softmax")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = convert(args.base_dir, args.out_dir, tuple(args.superblock), args.dtype, args.overwrite, args.sharing,
                      args.compensation)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
