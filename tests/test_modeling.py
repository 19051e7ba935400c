"""UniAttn modeling against stock transformers and against the naive reference of the spec."""

from __future__ import annotations

import pytest
import torch
from conftest import make_pair, random_batch
from reference import reference_logits
from transformers import DynamicCache, StaticCache

from uniattn.modeling.cache import cache_nbytes

ATTN = ("eager", "sdpa")
SHARINGS = ("softmax", "kv")  # UniAttn, and the CLA baseline on the same layout
SOFTMAX_ONLY = "softmax_only"  # UniAttn followers without W_c (superblock_compensation=False)


def make_arm(family, sharing, **kw):
    """make_pair for a sharing kind, or for the softmax-only arm (UniAttn followers without W_c)."""
    if sharing == SOFTMAX_ONLY:
        return make_pair(family, has_compensation=False, **kw)
    return make_pair(family, sharing=sharing, **kw)


@pytest.mark.parametrize("attn", ATTN)
def test_layers_before_first_follower_match_stock(family, attn):
    stock, uni = make_pair(family, attn=attn, seed=1)
    if family == "gemma2":
        stock.set_attn_implementation("eager")  # stock SDPA drops Gemma-2's soft-cap: compare with eager
    ids, mask = random_batch(padding="left", seed=2)
    with torch.no_grad():
        h_stock = stock(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        h_uni = uni(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    first = uni.config.superblock_layout.followers[0]
    # hidden_states[i] is the input of layer i: everything up to the first follower's input is stock (at real
    # tokens: a padding query attends to nothing, which flex_attention and eager fill differently).
    real = mask.bool()
    for i in range(first + 1):
        torch.testing.assert_close(h_uni[i][real], h_stock[i][real], rtol=0, atol=0 if attn == "eager" else 1e-6)
    # ... and the follower changes the stream (the test can fail).
    assert not torch.allclose(h_uni[first + 1], h_stock[first + 1], atol=1e-3)


def test_without_followers_range_matches_stock_logits_where_layout_starts_late():
    # Layout starting at the last two layers: all earlier layers and the leader are stock.
    stock, uni = make_pair("llama", layout=(2, 3, 5), seed=3, compensation=False)
    ids, mask = random_batch(seed=4)
    with torch.no_grad():
        hs = stock(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        hu = uni(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for i in range(5):
        torch.testing.assert_close(hu[i], hs[i], rtol=0, atol=0)


@pytest.mark.parametrize("sharing", SHARINGS)
@pytest.mark.parametrize("padding", ("right", "left"))
@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("layout", ((2, 1, 6), (2, 0, 6), (3, 1, 6)))
def test_follower_matches_naive_reference(family, attn, padding, layout, sharing):
    # sharing "kv" is the CLA baseline: the reference then gives followers their own Q over the leader's K, V.
    _, uni = make_pair(family, layout=layout, attn=attn, seed=5, sharing=sharing)
    ids, mask = random_batch(length=14, padding=padding, seed=6)  # 14 > window 5: windows matter
    with torch.no_grad():
        got = uni(ids, attention_mask=mask).logits
        want = reference_logits(uni, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("requested,kernel", (("sdpa", "uniattn_flex_attention"), ("flex_attention", "uniattn_flex_attention"),
                                              ("uniattn_sdpa", "uniattn_sdpa")))
def test_gemma2_sdpa_keeps_the_softcap(requested, kernel):
    # transformers 5.17's SDPA drops the soft-cap; UniAttn must not: "sdpa" (the default) becomes the fused
    # flex kernel, stock flex_attention becomes it too (its lse must not reach followers), uniattn_sdpa stays.
    stock, uni = make_pair("gemma2", attn="sdpa", seed=7)
    uni.set_attn_implementation("eager")
    uni.set_attn_implementation(requested)
    assert uni.config._attn_implementation == kernel
    ids, mask = random_batch(seed=8)
    with torch.no_grad():
        got = uni(ids, attention_mask=mask).logits
        stock_sdpa = stock(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], reference_logits(uni, ids, mask)[real], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, stock_sdpa, atol=1e-2)  # sanity: the cap does change the output here
    uni.config._attn_implementation_internal = "sdpa"  # behind the model's back: refused, not silent
    with pytest.raises(RuntimeError, match="soft-cap"):
        uni(ids)


@pytest.mark.parametrize("sharing", SHARINGS + (SOFTMAX_ONLY,))
@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("cache", ("dynamic", "static"))
@pytest.mark.parametrize("layout", ((2, 1, 6), (2, 0, 6)))  # Gemma-2 (sliding even layers): global / sliding leaders
def test_incremental_decoding_equals_full_forward(family, attn, cache, sharing, layout):
    if layout != (2, 1, 6) and family != "gemma2":
        pytest.skip("only Gemma-2 alternates window kinds: elsewhere the leaders' kind does not change")
    _, uni = make_arm(family, sharing, attn=attn, seed=9, layout=layout)
    ids, _ = random_batch(batch=2, length=13, padding="right", seed=10)
    ids[:, :] = ids[0]  # no padding here: positions must line up token by token
    prefix = 4
    with torch.no_grad():
        full = uni(ids).logits
        past = DynamicCache(config=uni.config) if cache == "dynamic" else StaticCache(config=uni.config, max_cache_len=16)
        out = uni(ids[:, :prefix], past_key_values=past, use_cache=True)
        steps = [out.logits]
        for t in range(prefix, ids.shape[1]):
            out = uni(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("cache", ("dynamic", "static"))
def test_multi_token_decode_across_the_explicit_row_boundary_equals_full_forward(family, attn, cache):
    # Assisted decoding feeds q > 1 tokens against a longer cache: q = 16 takes the explicit-row decode path
    # (DECODE_MAX_QUERIES), q = 17 the prefill kernel, q = 3 decode again; all must equal one full forward.
    from uniattn.modeling.attention import DECODE_MAX_QUERIES

    assert DECODE_MAX_QUERIES == 16  # the chunks below sit on either side of it
    _, uni = make_pair(family, attn=attn, seed=41)
    ids, _ = random_batch(batch=2, length=42, padding="right", seed=42)
    ids[:, :] = ids[0]
    chunks = [6, 16, 17, 3]  # kv after each: 6, 22, 39, 42; every decode chunk has kv > q
    with torch.no_grad():
        full = uni(ids).logits
        past = DynamicCache(config=uni.config) if cache == "dynamic" else StaticCache(config=uni.config, max_cache_len=48)
        got, start = [], 0
        for n in chunks:
            out = uni(ids[:, start:start + n], past_key_values=past, use_cache=True)
            past, start = out.past_key_values, start + n
            got.append(out.logits)
    torch.testing.assert_close(torch.cat(got, dim=1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sharing", ("softmax", SOFTMAX_ONLY))
@pytest.mark.parametrize("cache", (None, "static"))
def test_generate_with_cache_equals_without(family, cache, sharing):
    _, uni = make_arm(family, sharing, attn="sdpa", seed=11)
    ids, mask = random_batch(batch=2, length=6, padding="left", seed=12)
    kw = dict(attention_mask=mask, max_new_tokens=9, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = uni.generate(ids, use_cache=True, cache_implementation=cache, **kw)
        uncached = uni.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached, uncached)


def test_beam_search_with_cache_equals_without(family):
    _, uni = make_pair(family, attn="eager", seed=13)
    ids, mask = random_batch(batch=2, length=5, padding="left", seed=14)
    kw = dict(attention_mask=mask, max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=0,
              output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        cached = uni.generate(ids, use_cache=True, **kw)
        uncached = uni.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores)


# drop: the layer-dropping baseline (test_drop.py); softmax_only: UniAttn followers without W_c
@pytest.mark.parametrize("sharing", SHARINGS + ("drop", SOFTMAX_ONLY))
@pytest.mark.parametrize("cache", ("dynamic", "static"))
def test_kv_cache_bytes_and_parameter_count(cache, sharing):
    stock, uni = make_arm("llama", sharing, seed=15)
    ids, _ = random_batch(batch=2, length=10, seed=16)
    layout = uni.config.superblock_layout
    L, F = layout.num_layers, len(layout.followers)

    def prefill(model):
        past = DynamicCache(config=model.config) if cache == "dynamic" else StaticCache(config=model.config, max_cache_len=32)
        with torch.no_grad():
            return model(ids, past_key_values=past, use_cache=True).past_key_values

    cfg, hidden = uni.config, uni.config.hidden_size
    q = hidden * cfg.num_attention_heads * cfg.head_dim + cfg.num_attention_heads * cfg.head_dim  # weight + bias
    k = hidden * cfg.num_key_value_heads * cfg.head_dim + cfg.num_key_value_heads * cfg.head_dim  # v_proj alike
    w_c = hidden * hidden + hidden
    n_stock = sum(p.numel() for p in stock.parameters())
    n_uni = sum(p.numel() for p in uni.parameters())
    if sharing == "softmax":  # UniAttn followers: V only, no q/k projections, plus W_c
        assert cache_nbytes(prefill(uni)) * 2 * L == cache_nbytes(prefill(stock)) * (2 * L - F)
        assert n_uni == n_stock - F * (q + k) + F * w_c
        kept, gone = ("v_proj", "o_proj", "compensation"), ("q_proj", "k_proj")
    elif sharing == SOFTMAX_ONLY:  # the same followers without W_c: the same cache, no hidden x hidden tensor
        assert cache_nbytes(prefill(uni)) * 2 * L == cache_nbytes(prefill(stock)) * (2 * L - F)
        assert n_uni == n_stock - F * (q + k)
        kept, gone = ("v_proj", "o_proj"), ("q_proj", "k_proj", "compensation")
    elif sharing == "kv":  # CLA followers: no cache at all, no k/v projections, no W_c
        assert cache_nbytes(prefill(uni)) * L == cache_nbytes(prefill(stock)) * (L - F)
        assert n_uni == n_stock - F * 2 * k
        kept, gone = ("q_proj", "o_proj"), ("k_proj", "v_proj", "compensation")
    else:  # dropped followers: no cache, no attention parameters at all (q, k, v and o projections gone)
        assert cache_nbytes(prefill(uni)) * L == cache_nbytes(prefill(stock)) * (L - F)
        o = hidden * cfg.num_attention_heads * cfg.head_dim + hidden
        assert n_uni == n_stock - F * (q + 2 * k + o)
        assert all(not list(uni.model.layers[i].self_attn.parameters()) for i in layout.followers)
        kept, gone = (), ("q_proj", "k_proj", "v_proj", "o_proj", "compensation")
    for i in layout.followers:
        attn = uni.model.layers[i].self_attn
        assert all(hasattr(attn, n) for n in kept) and not any(hasattr(attn, n) for n in gone)


def test_fresh_model_has_zero_compensation(family):
    _, uni = make_pair(family, compensation=False)
    comps = [p for n, p in uni.named_parameters() if "compensation" in n]
    assert comps and all(torch.count_nonzero(p) == 0 for p in comps)


@pytest.mark.parametrize("padding", ("right", "left"))
@pytest.mark.parametrize("attn", ATTN)
def test_softmax_only_equals_an_all_zero_compensation(family, attn, padding):
    # The softmax-only arm used to carry a frozen, all-zero W_c; without it the logits are the same, bit for bit.
    _, zero_wc = make_pair(family, attn=attn, seed=30, compensation=False)
    _, no_wc = make_pair(family, attn=attn, seed=30, has_compensation=False)
    assert no_wc.config.superblock_compensation is False and zero_wc.config.superblock_compensation is True
    assert not [n for n in no_wc.state_dict() if "compensation" in n]
    wc = {n for n in zero_wc.state_dict() if "compensation" in n}
    assert wc and set(zero_wc.state_dict()) - wc == set(no_wc.state_dict())
    assert all(torch.equal(p, zero_wc.state_dict()[n]) for n, p in no_wc.state_dict().items())
    ids, mask = random_batch(length=14, padding=padding, seed=31)
    with torch.no_grad():
        got, want = no_wc(ids, attention_mask=mask).logits, zero_wc(ids, attention_mask=mask).logits
        naive = reference_logits(no_wc, ids, mask)
    assert torch.equal(got, want)
    real = mask.bool()
    torch.testing.assert_close(got[real], naive[real], rtol=1e-4, atol=1e-5)
    # ... and the followers do change the stream (not a model that equals the stock one by accident)
    stock, _ = make_pair(family, attn="eager", seed=30)
    with torch.no_grad():
        assert not torch.allclose(stock(ids, attention_mask=mask).logits[real], got[real], atol=1e-3)


@pytest.mark.parametrize("sharing", ("softmax", SOFTMAX_ONLY))
@pytest.mark.parametrize("attn", ATTN)
def test_gradient_checkpointing_gives_the_same_gradients(family, attn, sharing):
    _, uni = make_arm(family, sharing, attn=attn, seed=17)
    uni.train()
    ids, mask = random_batch(seed=18)
    labels = ids.masked_fill(mask == 0, -100)

    def grads():
        uni.zero_grad()
        uni(ids, attention_mask=mask, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in uni.named_parameters() if p.grad is not None}

    plain = grads()
    uni.gradient_checkpointing_enable()
    checkpointed = grads()
    uni.gradient_checkpointing_disable()
    assert plain.keys() == checkpointed.keys()
    leader_q = f"model.layers.{uni.config.superblock_layout.leaders[0]}.self_attn.q_proj.weight"
    assert leader_q in plain and plain[leader_q].abs().sum() > 0  # followers' loss reaches the leader's Q
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6)


def test_reentrant_checkpointing_is_refused():
    _, uni = make_pair("llama")
    with pytest.raises(ValueError, match="use_reentrant"):
        uni.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})


@pytest.mark.parametrize("stock", ("LlamaConfig", "MistralConfig", "Gemma2Config"))
def test_each_family_the_readme_names_builds_through_the_auto_classes(stock):
    # The README's three families, named by their transformers config classes (not by the package's own list).
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    from uniattn.convert import uniattn_config_from

    config = getattr(transformers, stock)(num_hidden_layers=5, hidden_size=32, intermediate_size=64,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=64)
    uni = uniattn_config_from(config, (2, 1, 6))
    assert uni.model_type == f"uniattn_{config.model_type}"
    assert type(AutoConfig.for_model(uni.model_type)) is type(uni)
    model = AutoModelForCausalLM.from_config(uni)
    assert type(model).__name__.startswith("UniAttn") and model.config.superblock_layout.followers == [2, 4]


def test_grouped_sdpa_serves_stock_models_too():
    # The registered "uniattn_sdpa" kernel is a drop-in for stock models (prefill SDPA, grouped decode).
    stock, _ = make_pair("llama", attn="sdpa", seed=40)
    ids, _ = random_batch(batch=2, length=9, seed=41)
    ids[:] = ids[0]
    with torch.no_grad():
        full = stock(ids).logits
        stock.set_attn_implementation("uniattn_sdpa")
        past = StaticCache(config=stock.config, max_cache_len=12)
        out = stock(ids[:, :5], past_key_values=past, use_cache=True)
        steps = [out.logits]
        for t in range(5, 9):
            out = stock(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sharing", ("softmax", SOFTMAX_ONLY))
def test_static_cache_decode_compiles_without_graph_breaks(family, sharing):
    # fullgraph=True fails on any graph break in UniAttn code; the eager backend keeps this fast on CPU.
    torch._dynamo.reset()  # one compiled lambda per case: the cases together would pass dynamo's recompile limit
    _, uni = make_arm(family, sharing, attn="sdpa", seed=42)
    ids, _ = random_batch(batch=2, length=7, seed=43)
    ids[:] = ids[0]
    with torch.no_grad():
        full = uni(ids).logits
        past = StaticCache(config=uni.config, max_cache_len=10)
        out = uni(ids[:, :4], past_key_values=past, use_cache=True)
        step = torch.compile(lambda tok, pos: uni(input_ids=tok, position_ids=pos, past_key_values=past,
                                                  use_cache=True).logits, fullgraph=True, backend="eager")
        steps = [out.logits] + [step(ids[:, t : t + 1], torch.full((2, 1), t)) for t in range(4, 7)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)
