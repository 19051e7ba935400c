"""Tiny checkpoints, tokenizer, data and init files for the training tests (no hub, no download)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import STOCK, stock_config
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from uniattn.convert import uniattn_config_from
from uniattn.data import build_prompt, default_data_file, load_records
from uniattn.init_file import save_init
from uniattn.net import free_port

REPO = Path(__file__).resolve().parent.parent
LAYOUT = (2, 1, 6)  # 5 layers: leaders 1 3 5, followers 2 4
SPECIALS = ["<pad>", "<s>", "</s>"]  # ids 0 1 2, as in conftest's configs


def make_tokenizer(texts, vocab_size=1000) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def write_data(path: Path, n: int = 24, max_chars: int = 150) -> Path:
    """The first ``n`` shipped PMC records, shortened so a step takes milliseconds."""
    records = load_records(default_data_file("pmc"))[:n]
    short = [{k: (v[:max_chars] if isinstance(v, str) else v) for k, v in r.items()} for r in records]
    path.write_text(json.dumps(short))
    return path


def make_checkpoint(path: Path, family: str = "llama", seed: int = 0) -> Path:
    """A 5-layer random model with a byte-level BPE tokenizer, saved as a plain HF checkpoint."""
    records = load_records(default_data_file("pmc"))[:200]
    tokenizer = make_tokenizer([build_prompt(r) + r["output"] for r in records])
    config = stock_config(family, attn="sdpa")
    config.vocab_size = len(tokenizer)
    torch.manual_seed(seed)
    model = STOCK[family](config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_init(path: Path, model_dir: Path, layout=LAYOUT, seed: int = 1) -> Path:
    """A stand-in for the init-calc output: small random W_c of the right names and shapes."""
    from transformers import AutoConfig

    config = uniattn_config_from(AutoConfig.from_pretrained(model_dir), layout)
    config._name_or_path = str(model_dir)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in config.superblock_layout.followers:
        tensors[f"model.layers.{i}.self_attn.compensation.weight"] = torch.randn(
            config.hidden_size, config.hidden_size, generator=g) * 0.02
        if getattr(config, "attention_bias", False):
            tensors[f"model.layers.{i}.self_attn.compensation.bias"] = torch.zeros(config.hidden_size)
    return save_init(path, tensors, config)


def run_script(script: str, args: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``scripts/<script>`` as a user would; returns the finished process (output captured)."""
    full_env = {**os.environ, "PYTHON": sys.executable, "MASTER_PORT": str(free_port()), **env}
    return subprocess.run(["bash", str(REPO / "scripts" / script), *args], env=full_env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(Path(path) / "model.safetensors")


def fails(capsys, args, *needles) -> str:
    """``uniattn.train`` refuses ``args`` with exit 2 and a message holding every needle."""
    from uniattn.train import main as train_main

    assert train_main(args) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    return err

