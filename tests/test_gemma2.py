"""Gemma-2's attention soft-cap in every path that builds or loads a model, the fused flex kernel, and bf16.

transformers 5.17's default kernel for a stock Gemma-2 is SDPA, which drops the cap: every loader
of the project must pick an exact one. Each path below is compared with the stock model in eager
attention, the reference, on a tiny random Gemma-2 saved as a plain checkpoint.
"""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from conftest import make_pair, random_batch
from train_helpers import make_checkpoint
from transformers import AutoModelForCausalLM

import uniattn.modeling.kernels as kernels
from uniattn.loading import attn_implementation_for, load_causal_lm


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("gemma2") / "base", family="gemma2", seed=3)
    eager = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    sdpa = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    ids, mask = random_batch(batch=3, length=20, vocab=eager.config.vocab_size, padding="left", seed=4)
    with torch.no_grad():
        want = eager(ids, attention_mask=mask).logits
        dropped = sdpa(ids, attention_mask=mask).logits
    real = mask.bool()
    # The yardstick can fail: without the cap the logits move by far more than assert_exact's atol (1e-5).
    assert (dropped - want)[real].abs().max() > 1e-4
    return SimpleNamespace(path=path, ids=ids, mask=mask, want=want, real=real)


def assert_exact(model, gemma):
    with torch.no_grad():
        got = model.eval()(gemma.ids, attention_mask=gemma.mask).logits
    torch.testing.assert_close(got[gemma.real], gemma.want[gemma.real], rtol=1e-4, atol=1e-5)


def test_the_loader_picks_the_fused_exact_kernel(gemma):
    model = load_causal_lm(gemma.path)
    assert model.config._attn_implementation == kernels.GROUPED_FLEX
    assert_exact(model, gemma)
    with pytest.raises(ValueError, match="soft-cap.*'eager'"):
        attn_implementation_for(model.config, "sdpa")


def test_tools_load_the_base_with_an_exact_kernel(gemma):
    from uniattn.init_calc import load_models
    from uniattn.tools.loss_eval import load_model

    assert_exact(load_model(gemma.path)[0], gemma)
    assert_exact(load_models(gemma.path, (2, 1, 6), torch.float32, "cpu")[0], gemma)


def test_training_paths_load_exact_models(gemma):
    # The plain arm's model and the distillation teacher, as the training stages build them.
    from uniattn.train.distill import load_teacher
    from uniattn.train.stages import build_model

    script = SimpleNamespace(mode="plain", model_dir=gemma.path, attn_implementation=None)
    stage = SimpleNamespace(name="stage1", trainable="all")
    assert_exact(build_model(script, stage, [stage], torch.float32, None), gemma)
    assert_exact(load_teacher(script, torch.float32, "cpu"), gemma)


def test_plain_arm_refuses_a_kernel_that_drops_the_cap(gemma, tmp_path, capsys):
    from train_helpers import write_data

    from uniattn.train import main as train_main

    data = write_data(tmp_path / "data.json", n=8)
    code = train_main(["--mode", "plain", "--model_dir", str(gemma.path), "--data", str(data), "--output_dir",
                       str(tmp_path / "out"), "--attn_implementation", "sdpa", "--check_only"])
    err = capsys.readouterr().err
    assert code == 2 and "--attn_implementation" in err and "soft-cap" in err, err
    assert not (tmp_path / "out").exists()


def test_benchmark_and_lm_eval_give_the_stock_model_exact_kernels(gemma):
    from uniattn.eval.run import _kernel_arg
    from uniattn.tools.bench import stock_kernels

    model = AutoModelForCausalLM.from_pretrained(gemma.path)
    for kernel in stock_kernels(model.config).values():
        model.set_attn_implementation(kernel)
        assert_exact(model, gemma)
    # lm-eval loads in its own process, without UniAttn's kernels: it must be told to use eager.
    kwargs = dict(item.split("=") for item in _kernel_arg(gemma.path).strip(",").split(","))
    assert_exact(AutoModelForCausalLM.from_pretrained(gemma.path, **kwargs), gemma)


@pytest.mark.parametrize("layout", ((2, 1, 6), (2, 0, 6)))  # global leaders (1 3 5) / sliding leaders (0 2 4)
def test_prefill_runs_flex_in_every_layer_and_followers_use_the_leaders_q_and_k(layout, monkeypatch):
    calls = Counter()
    flex, explicit = kernels.flex_attention, kernels.explicit_attention
    monkeypatch.setattr(kernels, "flex_attention", lambda *a, **k: calls.update(["flex"]) or flex(*a, **k))
    monkeypatch.setattr(kernels, "explicit_attention", lambda *a, **k: calls.update(["explicit"]) or explicit(*a, **k))
    _, uni = make_pair("gemma2", layout=layout, attn="sdpa", seed=21)
    _, ref = make_pair("gemma2", layout=layout, attn="eager", seed=21)
    ids, mask = random_batch(length=14, padding="right", seed=22)
    with torch.no_grad():
        got = uni(ids, attention_mask=mask).logits
        want = ref(ids, attention_mask=mask).logits
    assert calls == {"flex": 5}  # 5 layers, no T x T matrix anywhere: followers called flex with the leader's Q, K
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-4, atol=1e-5)


def test_cpu_training_takes_the_explicit_path_with_eager_gradients():
    # flex_attention has no backward on the CPU: a forward that records gradients gets the explicit rows.
    _, uni = make_pair("gemma2", attn="sdpa", seed=23)
    _, ref = make_pair("gemma2", attn="eager", seed=23)
    ids, mask = random_batch(length=14, padding="right", seed=24)
    grads = []
    for model in (uni, ref):
        model.train()
        model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("seed", (0, 1))
def test_bf16_error_is_no_larger_than_stock(family, seed):
    """bf16 against each model's own float32 eager forward: UniAttn's error must stay within 1.5x (mean) and
    2x (max) of the stock model's bf16 error on its fastest exact kernel, and the mean below 0.01 (logits
    here are ~0.3 in size; bf16 keeps 8 bits)."""
    stock, uni = make_pair(family, attn="eager", seed=seed)
    ids, mask = random_batch(batch=3, length=40, padding="left", seed=seed + 5)
    real = mask.bool()
    errors = []
    with torch.no_grad():
        for model, kernel in ((stock, "eager" if family == "gemma2" else "sdpa"), (uni, "sdpa")):
            want = model(ids, attention_mask=mask).logits
            model.to(torch.bfloat16).set_attn_implementation(kernel)
            got = model(ids, attention_mask=mask).logits.float()
            errors.append((got - want)[real].abs())
    if family == "gemma2":
        assert uni.config._attn_implementation == kernels.GROUPED_FLEX
    stock_err, uni_err = errors
    assert uni_err.mean() <= 1.5 * stock_err.mean() and uni_err.mean() < 0.01, (uni_err.mean(), stock_err.mean())
    assert uni_err.max() <= 2 * stock_err.max(), (uni_err.max(), stock_err.max())
