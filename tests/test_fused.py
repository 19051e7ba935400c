"""fuse_projections: one product per group of projections that share an input, for inference only."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, make_pair, random_batch
from transformers import AutoModelForCausalLM, DynamicCache

from uniattn import fuse_projections, unfuse_projections
from uniattn.modeling.attention import FUSED_MAX_TOKENS, FollowerAttention
from uniattn.modeling.decode_layer import FusedDecoderLayer
from uniattn.modeling.fused import DecodeLinear
from uniattn.modeling.triton_linear import MAX_ROWS


def _linear_calls(model, run):
    """Which nn.Linear modules ran (by name) during ``run()``."""
    ran, hooks = set(), []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            hooks.append(mod.register_forward_hook(lambda m, i, o, name=name: ran.add(name)))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return ran


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_model_gives_the_same_logits_and_state(family):
    stock, uni = make_pair(family, attn="sdpa", seed=11)
    if family == "gemma2":
        stock.set_attn_implementation("eager")  # stock SDPA drops the soft-cap, which the fused forward refuses
    ids, mask = random_batch(batch=2, length=9, seed=12)
    for model, groups in ((uni, 3 + 2 + 5), (stock, 5 + 5)):  # uni: 3 qkv, 2 v+W_c, 5 MLPs
        state = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            before = model(ids, attention_mask=mask).logits
        classes = [type(m) for m in model.modules()]
        assert fuse_projections(model) == groups
        assert fuse_projections(model) == 0  # idempotent
        singles = [model.model.layers[0].self_attn.o_proj, model.model.layers[0].mlp.down_proj, model.lm_head]
        assert all(isinstance(m, DecodeLinear) and isinstance(m, torch.nn.Linear) for m in singles), singles
        with torch.no_grad():
            ran = _linear_calls(model, lambda: model(ids, attention_mask=mask))
            after = model(ids, attention_mask=mask).logits
        # Only o_proj, down_proj and the head still run as their own products.
        assert {n.rsplit(".", 1)[-1] for n in ran} == {"o_proj", "down_proj", "lm_head"}, ran
        long_ids = torch.randint(3, 97, (2, FUSED_MAX_TOKENS // 2 + 1))  # prefill-size: separate products
        with torch.no_grad():
            ran_long = _linear_calls(model, lambda: model(long_ids))
        assert any(n.endswith("q_proj") for n in ran_long) and any(n.endswith("gate_proj") for n in ran_long)
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
        assert model.state_dict().keys() == state.keys()
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, state[k], rtol=0, atol=0)
        attn = model.model.layers[0].self_attn
        assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.fused_qkv_weight.untyped_storage().data_ptr()
        assert unfuse_projections(model) == groups
        assert [type(m) for m in model.modules()] == classes  # stock classes back
        assert attn.q_proj.weight.untyped_storage().data_ptr() != attn.k_proj.weight.untyped_storage().data_ptr()
        with torch.no_grad():
            torch.testing.assert_close(model(ids, attention_mask=mask).logits, before, rtol=1e-5, atol=1e-5)


def test_training_reads_the_parameters_and_updates_reach_the_fused_weights():
    _, uni = make_pair("llama", attn="sdpa", seed=13)
    ids, mask = random_batch(batch=2, length=9, seed=14)
    fuse_projections(uni)
    uni.train()
    opt = torch.optim.SGD(uni.parameters(), lr=0.1)
    ran = _linear_calls(uni, lambda: uni(ids, attention_mask=mask, labels=ids).loss.backward())
    assert any(n.endswith("q_proj") for n in ran) and any(n.endswith("compensation") for n in ran)
    follower = next(m for m in uni.modules() if isinstance(m, FollowerAttention))
    assert follower.compensation.weight.grad is not None and follower.compensation.weight.grad.abs().sum() > 0
    opt.step()
    uni.eval()
    with torch.no_grad():
        fused = uni(ids, attention_mask=mask).logits
        unfuse_projections(uni)
        plain = uni(ids, attention_mask=mask).logits
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_decode_matches_the_full_forward(family):
    _, uni = make_pair(family, attn="sdpa", seed=15)
    ids, _ = random_batch(batch=2, length=8, seed=16)
    with torch.no_grad():
        full = uni(ids).logits
        fuse_projections(uni)
        past = DynamicCache(config=uni.config)
        steps = [uni(ids[:, :5], past_key_values=past, use_cache=True).logits]
        steps += [uni(ids[:, t:t + 1], past_key_values=past, use_cache=True).logits for t in range(5, 8)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)


def test_a_fused_model_saves_the_separate_weights(tmp_path):
    _, uni = make_pair("mistral", attn="sdpa", seed=17)
    ids, _ = random_batch(batch=2, length=8, seed=18)
    with torch.no_grad():
        before = uni(ids).logits
    fuse_projections(uni)
    uni.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert not any("fused" in k for k in again.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, before, rtol=1e-5, atol=1e-5)


def test_stock_gemma2_on_sdpa_is_refused_after_fusing():
    stock, _ = make_pair("gemma2", attn="sdpa", seed=19)  # stock SDPA drops the soft-cap silently
    fuse_projections(stock)
    with torch.no_grad(), pytest.raises(RuntimeError, match="soft-cap.*eager"):
        stock(torch.randint(3, 97, (1, 6)))


def test_llama_style_layers_get_the_fused_decode_layer_and_gemma2_keeps_its_own():
    for family, fused in (("llama", True), ("mistral", True), ("gemma2", False)):
        _, uni = make_pair(family, attn="sdpa", seed=20)
        classes = [type(layer) for layer in uni.model.layers]
        keys = set(uni.state_dict())
        fuse_projections(uni)
        assert all(isinstance(layer, FusedDecoderLayer) == fused for layer in uni.model.layers), family
        if fused:
            layer = uni.model.layers[0]
            kv_heads = uni.config.num_key_value_heads
            assert layer.uniattn_ticket.shape == (1,) and layer.uniattn_tickets.shape == (MAX_ROWS * kv_heads,)
            assert layer.uniattn_tickets.dtype == torch.int32 and not layer.uniattn_tickets.any()
        assert set(uni.state_dict()) == keys  # the tickets are not state
        unfuse_projections(uni)
        assert [type(layer) for layer in uni.model.layers] == classes
        assert not any("ticket" in name for name, _ in uni.named_buffers())


def test_each_fused_layer_knows_the_weight_read_after_it():
    # The down product's prefetch target (triton_linear.L2_AHEAD): the next layer's attention input
    # weight, the output head's after the last layer. A plain reference, not a submodule.
    from uniattn.modeling.decode_layer import _next_weight
    _, uni = make_pair("llama", attn="sdpa", seed=21)
    modules, keys = len(list(uni.modules())), set(uni.state_dict())
    fuse_projections(uni)
    layers = uni.model.layers
    for layer, after in zip(layers, layers[1:]):
        attn = after.self_attn
        expected = attn.fused_v_wc_weight if isinstance(attn, FollowerAttention) else attn.fused_qkv_weight
        assert layer.uniattn_after is after and _next_weight(layer) is expected
    assert any(isinstance(layer.self_attn, FollowerAttention) for layer in layers[1:])
    assert _next_weight(layers[-1]) is uni.lm_head.weight
    assert len(list(uni.modules())) == modules and set(uni.state_dict()) == keys
    uni.to(torch.float64)  # the link follows the live modules, so it survives a cast
    assert _next_weight(layers[0]).dtype == torch.float64
    unfuse_projections(uni)
    assert not any(hasattr(layer, "uniattn_after") for layer in layers)
