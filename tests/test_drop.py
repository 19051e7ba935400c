"""The layer-dropping (LLMDrop) baseline: ``superblock_sharing="drop"`` on the same SuperBlock layout.

A follower's attention sub-layer is removed: the block computes ``h = x`` and then its MLP part.
The reference below is built independently of the UniAttn code: the stock model with forward hooks
that zero the follower layers' ``self_attn`` output (and one layer checked by hand)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import FAMILIES, LAYOUT, make_pair, random_batch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, DynamicCache, StaticCache

from uniattn.convert import convert, main as convert_main
from uniattn.modeling import UniAttnGemma2Config, UniAttnLlamaConfig
from uniattn.modeling.attention import DropFollowerAttention
from uniattn.modeling.cache import cache_nbytes

FOLLOWERS = (2, 4)  # of LAYOUT (2, 1, 6) on 5 layers
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")


def _layer_bytes(layer) -> int:
    return sum(t.numel() * t.element_size() for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
               if isinstance(t, torch.Tensor))


@torch.no_grad()
def skipped_attention_logits(stock, ids, mask, layers=FOLLOWERS):
    """Stock logits with the attention branch of ``layers`` skipped: their self_attn output is zeroed."""
    stock.set_attn_implementation("eager")  # stock SDPA drops Gemma-2's soft-cap
    hooks = [stock.model.layers[i].self_attn.register_forward_hook(
        lambda mod, args, out: (torch.zeros_like(out[0]), *out[1:])) for i in layers]
    try:
        return stock(ids, attention_mask=mask).logits
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("padding", ("right", "left"))
@pytest.mark.parametrize("attn", ("eager", "sdpa"))
def test_drop_matches_stock_with_follower_attention_skipped(family, attn, padding):
    stock, drop = make_pair(family, attn=attn, seed=60, sharing="drop")
    ids, mask = random_batch(length=14, padding=padding, seed=61)  # 14 > window 5
    with torch.no_grad():
        got = drop(ids, attention_mask=mask).logits
        plain = stock(ids, attention_mask=mask).logits
    want = skipped_attention_logits(stock, ids, mask)
    real = mask.bool()
    if attn == "eager":
        torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-6)
    else:
        torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-5)
    # The test can fail: dropping differs from stock, and from skipping only one of the followers.
    assert not torch.allclose(got[real], plain[real], atol=1e-3)
    one = skipped_attention_logits(stock, ids, mask, layers=FOLLOWERS[:1])
    assert not torch.allclose(got[real], one[real], atol=1e-3)


def test_follower_layer_is_residual_plus_mlp_by_hand(family):
    # One follower layer written out by hand: h = x, then the family's MLP part (Gemma-2: pre/post norms).
    _, drop = make_pair(family, seed=62, sharing="drop")
    layer = drop.model.layers[FOLLOWERS[0]]
    seen = {}
    pre = layer.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(x=args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    post = layer.register_forward_hook(lambda mod, args, out: seen.update(y=out[0] if isinstance(out, tuple) else out))
    ids, mask = random_batch(seed=63)
    with torch.no_grad():
        drop(ids, attention_mask=mask)
        x = seen["x"]
        if family == "gemma2":
            want = x + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x)))
        else:
            want = x + layer.mlp(layer.post_attention_layernorm(x))
    pre.remove()
    post.remove()
    torch.testing.assert_close(seen["y"], want, rtol=0, atol=1e-6)


def test_followers_have_no_attention_and_leaders_publish_nothing(family):
    _, drop = make_pair(family, seed=64, sharing="drop")
    layout = drop.config.superblock_layout
    for i, layer in enumerate(drop.model.layers):
        attn = layer.self_attn
        if i in layout.followers:
            assert isinstance(attn, DropFollowerAttention)
            assert not list(attn.parameters()) and not list(attn.buffers())
            assert not any(hasattr(attn, n) for n in (*ATTN_PROJ, "compensation"))
        else:
            assert not attn.is_leader  # nothing reads a leader's state in drop mode


@pytest.mark.parametrize("attn", ("eager", "sdpa"))
@pytest.mark.parametrize("cache", ("dynamic", "static"))
def test_incremental_decoding_equals_full_forward(family, attn, cache):
    _, drop = make_pair(family, attn=attn, seed=65, sharing="drop")
    ids, _ = random_batch(batch=2, length=13, seed=66)
    ids[:, :] = ids[0]
    prefix = 4
    with torch.no_grad():
        full = drop(ids).logits
        past = DynamicCache(config=drop.config) if cache == "dynamic" else StaticCache(config=drop.config, max_cache_len=16)
        out = drop(ids[:, :prefix], past_key_values=past, use_cache=True)
        steps = [out.logits]
        for t in range(prefix, ids.shape[1]):
            out = drop(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)


def test_generate_and_beam_search_with_cache_equal_without(family):
    _, drop = make_pair(family, attn="sdpa", seed=67, sharing="drop")
    ids, mask = random_batch(batch=2, length=5, padding="left", seed=68)
    kw = dict(attention_mask=mask, max_new_tokens=7, do_sample=False, pad_token_id=0)
    beams = dict(num_beams=3, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        uncached = drop.generate(ids, use_cache=False, **kw)
        assert torch.equal(drop.generate(ids, use_cache=True, **kw), uncached)
        assert torch.equal(drop.generate(ids, use_cache=True, cache_implementation="static", **kw), uncached)
        cached = drop.generate(ids, use_cache=True, **kw, **beams)
        plain = drop.generate(ids, use_cache=False, **kw, **beams)
    assert torch.equal(cached.sequences, plain.sequences)
    torch.testing.assert_close(cached.sequences_scores, plain.sequences_scores)


@pytest.mark.parametrize("cache", ("dynamic", "static"))
def test_kv_cache_bytes_and_parameter_count(family, cache):
    stock, drop = make_pair(family, seed=69, sharing="drop")
    layout = drop.config.superblock_layout
    L, F = layout.num_layers, len(layout.followers)
    # Prompt shorter than the window (5): every stock layer then caches the same tokens (dynamic).
    ids, _ = random_batch(batch=2, length=4, seed=70)

    def prefill(model):
        past = DynamicCache(config=model.config) if cache == "dynamic" else StaticCache(config=model.config, max_cache_len=12)
        with torch.no_grad():
            return model(ids, past_key_values=past, use_cache=True).past_key_values

    stock_past, drop_past = prefill(stock), prefill(drop)
    for i in layout.followers:
        assert _layer_bytes(drop_past.layers[i]) == 0
    # Each dropped layer saves exactly what its stock layer cached (K and V); the rest is unchanged.
    saved = sum(_layer_bytes(stock_past.layers[i]) for i in layout.followers)
    assert cache_nbytes(drop_past) == cache_nbytes(stock_past) - saved
    if family == "llama" or cache == "dynamic":  # same cache size in every stock layer: saving 2F / 2L
        assert cache_nbytes(drop_past) * L == cache_nbytes(stock_past) * (L - F)

    cfg, hidden = drop.config, drop.config.hidden_size
    bias = getattr(cfg, "attention_bias", False)
    q_out, kv_out = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    per_layer = (hidden * q_out + 2 * hidden * kv_out + q_out * hidden
                 + bias * (q_out + 2 * kv_out + hidden))  # q, k, v, o (+ biases)
    assert sum(p.numel() for p in drop.parameters()) == sum(p.numel() for p in stock.parameters()) - F * per_layer


def test_gradient_checkpointing_and_idle_norm_gradients(family):
    _, drop = make_pair(family, attn="sdpa", seed=71, sharing="drop")
    drop.train()
    ids, mask = random_batch(seed=72)
    labels = ids.masked_fill(mask == 0, -100)

    def grads():
        drop.zero_grad(set_to_none=True)
        drop(ids, attention_mask=mask, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in drop.named_parameters() if p.grad is not None}

    plain = grads()
    drop.gradient_checkpointing_enable()
    checkpointed = grads()
    drop.gradient_checkpointing_disable()
    # Every parameter gets a gradient (the followers' idle input_layernorm a zero one): no unused
    # parameters for distributed training to trip over.
    assert plain.keys() == checkpointed.keys() == {n for n, _ in drop.named_parameters()}
    for i in FOLLOWERS:
        assert torch.count_nonzero(plain[f"model.layers.{i}.input_layernorm.weight"]) == 0
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6)


_REMOTE = textwrap.dedent(
    """
    import sys
    sys.modules["uniattn"] = None  # any `import uniattn` now fails: the package is not importable
    import torch
    from transformers import AutoModelForCausalLM
    ids = torch.load(sys.argv[1])
    result = {}
    for ck in sys.argv[3:]:
        model = AutoModelForCausalLM.from_pretrained(ck, trust_remote_code=True, attn_implementation="eager")
        with torch.no_grad():
            logits = model(ids["input_ids"], attention_mask=ids["attention_mask"]).logits
            gen = model.generate(ids["input_ids"][:1, :4], max_new_tokens=4, do_sample=False, pad_token_id=0)
        result[ck] = {"logits": logits, "generated": gen, "module": type(model).__module__,
                      "sharing": model.config.superblock_sharing}
    torch.save(result, sys.argv[2])
    """
)


def test_convert_reload_and_trust_remote_code_without_the_package(tmp_path, capsys):
    ids, mask = random_batch(seed=74)
    outs, models = [], {}
    for family in FAMILIES:
        stock, drop = make_pair(family, seed=73, sharing="drop")
        base = tmp_path / f"base-{family}"
        stock.save_pretrained(base)
        out = tmp_path / f"drop-{family}"
        assert convert_main([str(base), str(out), "--superblock", *map(str, LAYOUT), "--sharing", "drop"]) == 0
        assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
        assert json.loads((out / "config.json").read_text())["superblock_sharing"] == "drop"
        weights, base_weights = load_file(out / "model.safetensors"), load_file(base / "model.safetensors")
        gone = {f"model.layers.{i}.self_attn.{p}.{w}" for i in FOLLOWERS for p in ATTN_PROJ for w in ("weight", "bias")}
        gone &= set(base_weights)
        assert gone and set(weights) == set(base_weights) - gone  # followers' norms and MLPs stay
        assert all(torch.equal(t, base_weights[n]) for n, t in weights.items())
        again = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
        assert isinstance(again.model.layers[FOLLOWERS[0]].self_attn, DropFollowerAttention)
        with torch.no_grad():
            want = drop(ids, attention_mask=mask).logits
            assert torch.equal(again(ids, attention_mask=mask).logits, want)
        outs.append(out)
        models[str(out)] = drop

    torch.save({"input_ids": ids, "attention_mask": mask}, tmp_path / "in.pt")
    (tmp_path / "remote.py").write_text(_REMOTE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    subprocess.run([sys.executable, str(tmp_path / "remote.py"), str(tmp_path / "in.pt"), str(tmp_path / "res.pt"),
                    *map(str, outs)], check=True, cwd=tmp_path, env=env)
    result = torch.load(tmp_path / "res.pt")
    for ck, model in models.items():
        assert result[ck]["module"].startswith("transformers_modules") and result[ck]["sharing"] == "drop"
        with torch.no_grad():
            assert torch.equal(result[ck]["logits"], model(ids, attention_mask=mask).logits)
            want = model.generate(ids[:1, :4], max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(result[ck]["generated"], want)


def test_bad_values_give_clear_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="superblock_sharing 'dropped' is not one of .*'drop'.*layer dropping"):
        UniAttnLlamaConfig(num_hidden_layers=4, superblock_size=2, superblock_sharing="dropped")
    assert UniAttnGemma2Config(num_hidden_layers=4, superblock_size=2, superblock_sharing="drop").superblock_sharing == "drop"
    with pytest.raises(SystemExit):
        convert_main([str(tmp_path), str(tmp_path / "out"), "--superblock", "2", "1", "6", "--sharing", "skip"])
    err = capsys.readouterr().err
    assert "invalid choice: 'skip'" in err and "'drop'" in err
    # The usual conversion errors are unchanged with --sharing drop.
    assert convert_main([str(tmp_path / "none"), str(tmp_path / "out"), "--superblock", "2", "1", "6",
                         "--sharing", "drop"]) == 2
    assert "has no config.json" in capsys.readouterr().err
    stock, _ = make_pair("llama", seed=75)
    stock.save_pretrained(tmp_path / "base")
    assert convert_main([str(tmp_path / "base"), str(tmp_path / "out"), "--superblock", "1", "1", "6",
                         "--sharing", "drop"]) == 2
    assert "size 1 is too small" in capsys.readouterr().err
    convert(tmp_path / "base", tmp_path / "out", (2, 1, 6), sharing="drop")
    with pytest.raises(ValueError, match="already a UniAttn model"):
        convert(tmp_path / "out", tmp_path / "again", (2, 1, 6), sharing="drop")
    assert not (tmp_path / "again").exists()


def test_train_mode_drop_plans_one_stage_and_the_script_passes_it(tmp_path):
    from train_helpers import REPO, make_checkpoint, write_data

    from uniattn.train import main as train_main, plan_stages, sharing_of

    (stage,) = plan_stages("drop", tmp_path)
    assert (stage.name, stage.trainable, stage.final) == ("train", "all", tmp_path / "final")
    assert sharing_of("drop") == "drop" and sharing_of("cla") == "kv" and sharing_of("uniattn") == "softmax"
    base, data = make_checkpoint(tmp_path / "base"), write_data(tmp_path / "data.json", n=8)
    args = ["--mode", "drop", "--model_dir", str(base), "--data", str(data), "--output_dir", str(tmp_path / "o"),
            "--max_length", "256", "--superblock", *map(str, LAYOUT)]
    assert train_main(args + ["--check_only"]) == 0
    assert not (tmp_path / "o").exists()
    # The shell script: same interface as the CLA one (a stand-in interpreter records the launch).
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "MODEL_DIR": str(base), "DATA_DIR": str(data), "NUM_GPUS": "1"}
    env.pop("OUTPUT_DIR", None)
    run = subprocess.run(["bash", str(REPO / "scripts" / "train_deepspeed-ft_drop.sh"), "2", "1", "6"], env=env,
                         capture_output=True, text=True, check=True)
    assert "--module uniattn.train" in run.stdout and "--mode drop --superblock 2 1 6" in run.stdout
    assert "outputs/ft_drop_2_1_6" in run.stdout
    bad = subprocess.run(["bash", str(REPO / "scripts" / "train_deepspeed-ft_drop.sh"), "2", "1"], env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "expected 3 numbers G B E" in bad.stderr
