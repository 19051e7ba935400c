"""The cross-layer KV sharing (CLA) baseline: ``superblock_sharing="kv"`` on the same SuperBlock layout.

The naive-reference, incremental-decoding and KV-byte / parameter checks run for CLA in
test_modeling.py (``sharing``)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_pair, random_batch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from uniattn.convert import convert, main as convert_main
from uniattn.modeling import UniAttnLlamaConfig

def test_cla_differs_from_uniattn_and_from_stock():
    # Sanity for the reference test: the follower really uses its own Q (not the leader's P).
    stock, cla = make_pair("llama", seed=43, sharing="kv")
    _, uni = make_pair("llama", seed=43, compensation=False)
    ids, mask = random_batch(seed=44)
    with torch.no_grad():
        logits = [m(ids, attention_mask=mask).logits for m in (stock, cla, uni)]
    assert not torch.allclose(logits[0], logits[1], atol=1e-3)
    assert not torch.allclose(logits[1], logits[2], atol=1e-3)


def test_cla_generate_and_beam_search_with_cache_equal_without(family):
    _, cla = make_pair(family, attn="sdpa", seed=47, sharing="kv")
    ids, mask = random_batch(batch=2, length=5, padding="left", seed=48)
    kw = dict(attention_mask=mask, max_new_tokens=7, do_sample=False, pad_token_id=0)
    beams = dict(num_beams=3, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        assert torch.equal(cla.generate(ids, use_cache=True, **kw), cla.generate(ids, use_cache=False, **kw))
        cached = cla.generate(ids, use_cache=True, **kw, **beams)
        uncached = cla.generate(ids, use_cache=False, **kw, **beams)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores)


def test_cla_convert_save_and_reload(family, tmp_path):
    stock, _ = make_pair(family, seed=51)
    stock.save_pretrained(tmp_path / "base")
    out = convert(tmp_path / "base", tmp_path / "cla", superblock=(2, 1, 6), sharing="kv")
    assert json.loads((out / "config.json").read_text())["superblock_sharing"] == "kv"
    weights = load_file(out / "model.safetensors")
    base = stock.state_dict()
    for i in (2, 4):
        assert f"model.layers.{i}.self_attn.q_proj.weight" in weights
        assert f"model.layers.{i}.self_attn.v_proj.weight" not in weights
    assert not [n for n in weights if "compensation" in n]
    assert all(torch.equal(t, base[n]) for n, t in weights.items())
    again = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, attn_implementation="eager").eval()
    _, cla = make_pair(family, seed=51, sharing="kv")
    ids, mask = random_batch(seed=52)
    with torch.no_grad():
        assert torch.equal(again(ids, attention_mask=mask).logits, cla(ids, attention_mask=mask).logits)


def test_bad_sharing_is_rejected(tmp_path, capsys):
    with pytest.raises(ValueError, match="superblock_sharing 'qk' is not one of"):
        UniAttnLlamaConfig(num_hidden_layers=4, superblock_size=2, superblock_sharing="qk")
    with pytest.raises(SystemExit):
        convert_main([str(tmp_path), str(tmp_path / "out"), "--superblock", "2", "1", "6", "--sharing", "q"])
    assert "invalid choice: 'q'" in capsys.readouterr().err
