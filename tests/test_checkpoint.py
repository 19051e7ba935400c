"""Conversion, save / load, ``trust_remote_code`` loading without the package, and layout errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import make_pair, random_batch
from transformers import AutoModelForCausalLM

import uniattn
from uniattn.convert import convert, main as convert_main
from uniattn.modeling import SuperBlockLayout, UniAttnGemma2Config, UniAttnLlamaConfig, UniAttnMistralConfig


def _save_stock(family, path, seed=0):
    stock, _ = make_pair(family, seed=seed)
    stock.save_pretrained(path)
    return stock


def test_convert_drops_follower_qk_and_zero_inits_compensation(family, tmp_path):
    stock = _save_stock(family, tmp_path / "base", seed=21)
    out = convert(tmp_path / "base", tmp_path / "uni", superblock=(2, 1, 6))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == f"uniattn_{family}"
    assert "AutoModelForCausalLM" in config["auto_map"] and "AutoConfig" in config["auto_map"]
    assert (config["superblock_size"], config["superblock_begin"], config["superblock_end"]) == (2, 1, 6)
    from safetensors.torch import load_file

    weights = load_file(out / "model.safetensors")
    for i in (2, 4):
        assert f"model.layers.{i}.self_attn.q_proj.weight" not in weights
        assert f"model.layers.{i}.self_attn.k_proj.weight" not in weights
        assert torch.count_nonzero(weights[f"model.layers.{i}.self_attn.compensation.weight"]) == 0
    base = stock.state_dict()
    for name, tensor in weights.items():
        if "compensation" not in name:
            assert torch.equal(tensor, base[name]), name
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # staging directory renamed away


def test_family_comes_from_the_config_not_the_path(tmp_path):
    _save_stock("gemma2", tmp_path / "llama-7b-looking-path")
    out = convert(tmp_path / "llama-7b-looking-path", tmp_path / "mistral-out", superblock=(2, 1, 6))
    assert json.loads((out / "config.json").read_text())["model_type"] == "uniattn_gemma2"


def test_save_load_round_trip_is_identical(family, tmp_path):
    _, uni = make_pair(family, attn="eager", seed=22)
    uni.save_pretrained(tmp_path / "ck")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "ck", attn_implementation="eager").eval()
    assert type(again) is type(uni)
    for (n1, p1), (n2, p2) in zip(uni.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    ids, mask = random_batch(seed=23)
    with torch.no_grad():
        assert torch.equal(uni(ids, attention_mask=mask).logits, again(ids, attention_mask=mask).logits)


_REMOTE = textwrap.dedent(
    """
    import sys
    sys.modules["uniattn"] = None  # any `import uniattn` now fails: the package is not importable
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, attn_implementation="eager")
    assert "uniattn" not in type(model).__module__.split(".")[0], type(model).__module__
    ids = torch.load(sys.argv[2])
    with torch.no_grad():
        logits = model(ids["input_ids"], attention_mask=ids["attention_mask"]).logits
        gen = model.generate(ids["input_ids"][:1, :4], max_new_tokens=4, do_sample=False, pad_token_id=0)
    torch.save({"logits": logits, "generated": gen, "module": type(model).__module__}, sys.argv[3])
    """
)


@pytest.mark.parametrize("has_compensation", (True, False), ids=("wc", "no_wc"))
def test_trust_remote_code_load_without_the_package(family, tmp_path, has_compensation):
    _, uni = make_pair(family, attn="eager", seed=24, has_compensation=has_compensation)
    uni.save_pretrained(tmp_path / "ck")
    ids, mask = random_batch(seed=25)
    torch.save({"input_ids": ids, "attention_mask": mask}, tmp_path / "in.pt")
    (tmp_path / "remote.py").write_text(_REMOTE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    subprocess.run(
        [sys.executable, str(tmp_path / "remote.py"), str(tmp_path / "ck"), str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
        check=True, cwd=tmp_path, env=env,
    )
    out = torch.load(tmp_path / "out.pt")
    assert out["module"].startswith("transformers_modules")
    with torch.no_grad():
        assert torch.equal(out["logits"], uni(ids, attention_mask=mask).logits)
        want = uni.generate(ids[:1, :4], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(out["generated"], want)


@pytest.mark.parametrize(
    "layout, message",
    [
        ((1, 1, 6), "size 1 is too small"),
        ((0, 1, 6), "size 0 is too small"),
        ((2, -1, 6), "begin -1 is negative"),
        ((2, 4, 4), "begin 4 must be smaller than the end 4"),
        ((2, 1, 7), "end 7 is past the 5 layers of this model \\(allowed up to 6"),
        ((2, 4, 6), "has no follower"),
        ((4, 4, 5), "has no follower"),
    ],
)
def test_invalid_layouts_are_rejected(layout, message):
    g, b, e = layout
    with pytest.raises(ValueError, match=message):
        SuperBlockLayout(g, b, e, 5)
    for cls in (UniAttnLlamaConfig, UniAttnMistralConfig, UniAttnGemma2Config):
        with pytest.raises(ValueError, match=message):
            cls(num_hidden_layers=5, superblock_size=g, superblock_begin=b, superblock_end=e)


def test_seed_layout_on_llama_31_8b():
    layout = SuperBlockLayout(4, 16, 33, 32)
    assert layout.leaders == [16, 20, 24, 28]
    assert layout.followers == [17, 18, 19, 21, 22, 23, 25, 26, 27, 29, 30, 31]
    partial = SuperBlockLayout(4, 14, 32, 32)  # a partial last group is allowed: leader 30, follower 31
    assert partial.leaders[-1] == 30 and partial.followers[-1] == 31


def test_convert_without_compensation(family, tmp_path, capsys):
    # The softmax-only arm: followers without W_c; the same logits as the zero W_c a default conversion gives.
    _save_stock(family, tmp_path / "base", seed=26)
    base, zero_wc, no_wc = (str(tmp_path / n) for n in ("base", "zero_wc", "no_wc"))
    assert convert_main([base, zero_wc, "--superblock", "2", "1", "6"]) == 0
    assert convert_main([base, no_wc, "--superblock", "2", "1", "6", "--no_compensation"]) == 0
    config = json.loads((tmp_path / "no_wc" / "config.json").read_text())
    assert config["superblock_compensation"] is False and config["superblock_sharing"] == "softmax"
    assert json.loads((tmp_path / "zero_wc" / "config.json").read_text())["superblock_compensation"] is True
    from safetensors.torch import load_file

    with_wc, without = load_file(tmp_path / "zero_wc" / "model.safetensors"), load_file(tmp_path / "no_wc" / "model.safetensors")
    assert set(with_wc) - set(without) == {k for k in with_wc if ".compensation." in k} != set()
    assert all(torch.equal(t, with_wc[k]) for k, t in without.items())
    a = AutoModelForCausalLM.from_pretrained(zero_wc, attn_implementation="eager").eval()
    b = AutoModelForCausalLM.from_pretrained(no_wc, attn_implementation="eager").eval()
    assert not any(hasattr(b.model.layers[i].self_attn, "compensation") for i in (2, 4))
    ids, mask = random_batch(seed=27)
    with torch.no_grad():
        assert torch.equal(a(ids, attention_mask=mask).logits, b(ids, attention_mask=mask).logits)
    assert sum(p.numel() for p in a.parameters()) - sum(p.numel() for p in b.parameters()) == sum(
        t.numel() for k, t in with_wc.items() if ".compensation." in k)
    # W_c is a UniAttn follower's: CLA and drop followers never have one, so the flag is refused there
    assert convert_main([base, str(tmp_path / "cla"), "--superblock", "2", "1", "6", "--sharing", "kv",
                         "--no_compensation"]) == 2
    assert "--no_compensation" in capsys.readouterr().err and not (tmp_path / "cla").exists()


def test_config_without_the_compensation_field_keeps_wc(tmp_path):
    # Checkpoints saved before superblock_compensation existed all had W_c: they load with it.
    _, uni = make_pair("llama", seed=28)
    uni.save_pretrained(tmp_path / "old")
    config_file = tmp_path / "old" / "config.json"
    config = json.loads(config_file.read_text())
    del config["superblock_compensation"]
    config_file.write_text(json.dumps(config))
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "old").eval()
    assert again.config.superblock_compensation is True
    assert all(torch.equal(p, uni.state_dict()[n]) for n, p in again.state_dict().items())
    assert any(".compensation." in n for n in again.state_dict())
    for cls in (UniAttnLlamaConfig, UniAttnMistralConfig, UniAttnGemma2Config):
        with pytest.raises(ValueError, match="superblock_compensation 'no' must be true or false"):
            cls(num_hidden_layers=5, superblock_compensation="no")


def test_convert_cli_errors_are_clear_and_write_nothing(tmp_path, capsys):
    _save_stock("llama", tmp_path / "base")
    assert convert_main([str(tmp_path / "base"), str(tmp_path / "out"), "--superblock", "2", "1", "9"]) == 2
    assert "end 9 is past the 5 layers" in capsys.readouterr().err
    assert convert_main([str(tmp_path / "nowhere"), str(tmp_path / "out"), "--superblock", "2", "1", "6"]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]
    assert convert_main([str(tmp_path / "base"), str(tmp_path / "out"), "--superblock", "2", "1", "6"]) == 0
    assert convert_main([str(tmp_path / "out"), str(tmp_path / "out2"), "--superblock", "2", "1", "6"]) == 2
    assert "already a UniAttn model" in capsys.readouterr().err
    assert convert_main([str(tmp_path / "base"), str(tmp_path / "out"), "--superblock", "2", "1", "6"]) == 2
    assert "already exists" in capsys.readouterr().err
