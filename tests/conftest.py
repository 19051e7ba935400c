"""Shared fixtures: tiny random LLaMA / Mistral / Gemma-2 models and their UniAttn twins."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

import uniattn
from uniattn.convert import uniattn_config_from

FAMILIES = ("llama", "mistral", "gemma2")
LAYOUT = (2, 1, 6)  # 5 layers: 0 ordinary, leaders 1 3 5, followers 2 4

_COMMON = dict(
    vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=5,
    num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)


def stock_config(family: str, attn: str = "eager"):
    if family == "llama":
        cfg = LlamaConfig(**_COMMON, attention_bias=True)  # bias: W_c must get one too
    elif family == "mistral":
        cfg = MistralConfig(**_COMMON, sliding_window=5)
    elif family == "gemma2":
        cfg = Gemma2Config(**_COMMON, sliding_window=5, query_pre_attn_scalar=8,
                           attn_logit_softcapping=3.0, final_logit_softcapping=5.0)
    else:
        raise ValueError(family)
    cfg._attn_implementation = attn
    return cfg


STOCK = {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM, "gemma2": Gemma2ForCausalLM}


def _randomise(model, seed):
    # Norm weights start at 1 (or 0 for Gemma's 1+w): perturb every tensor so no path hides behind an identity.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def make_pair(family: str, layout=LAYOUT, attn: str = "eager", seed: int = 0, compensation: bool = True,
              sharing: str = "softmax", has_compensation: bool = True):
    """A stock model and a UniAttn (``sharing="kv"``: CLA, ``"drop"``: followers without attention) model
    sharing every weight; W_c random unless ``compensation=False`` (then zero), and no W_c at all with
    ``has_compensation=False`` (``superblock_compensation=False``: softmax unification only)."""
    torch.manual_seed(seed)
    stock = STOCK[family](stock_config(family, attn)).eval()
    _randomise(stock, seed)
    config = uniattn_config_from(stock.config, layout, sharing, compensation=has_compensation)
    config._attn_implementation = attn
    _, cls = uniattn.UNIATTN_FAMILIES[family]
    uni = cls(config).eval()
    missing, unexpected = uni.load_state_dict(stock.state_dict(), strict=False)
    assert all("compensation" in k for k in missing), missing
    dropped = {"kv": ("k_proj", "v_proj"), "drop": ("q_proj", "k_proj", "v_proj", "o_proj")}.get(
        sharing, ("q_proj", "k_proj"))
    assert all(k.split(".")[-2] in dropped for k in unexpected), unexpected
    if compensation:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in uni.named_parameters():
                if "compensation" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return stock, uni


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def random_batch(batch=3, length=12, vocab=97, padding="right", seed=0):
    """Random ids with ragged lengths; pads on the given side (attention_mask marks real tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b in range(1, batch):
        n_pad = min(2 * b + 1, length - 2)
        if padding == "right":
            mask[b, length - n_pad:] = 0
        else:
            mask[b, :n_pad] = 0
    ids[mask == 0] = 0
    return ids, mask


def _mapped_files() -> set[str]:
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            mapped.update(line.split(maxsplit=5)[-1].strip() for line in maps.read_text().splitlines())
        except OSError:  # the process ended while we looked
            pass
    return mapped


@pytest.fixture(scope="session", autouse=True)
def _no_shm_left_behind():
    """Runs the tests SIGKILL on purpose cannot unlink DeepSpeed's 66 MB /dev/shm buffer (a finished run does,
    and test_train_runs checks it); remove what this session's dead ranks left, or tmpfs fills the machine."""
    pattern = f"deepspeed_allreduce_buffer_{os.getuid()}_*"
    before = set(Path("/dev/shm").glob(pattern))
    yield
    mapped = _mapped_files()
    for path in set(Path("/dev/shm").glob(pattern)) - before:
        if str(path) not in mapped:
            path.unlink(missing_ok=True)
