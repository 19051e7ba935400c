"""Layout advisor: candidate enumeration, pair costs against the UniAttn model itself, the CLI and bad input."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
import torch
from conftest import FAMILIES, STOCK, make_pair, random_batch, stock_config
from train_helpers import make_tokenizer, write_data

from uniattn.data import build_prompt, default_data_file, load_records
from uniattn.modeling.layout import SuperBlockLayout
from uniattn.tools.layout_search import enumerate_layouts, main, max_followers, pair_statistics, pairs_of


# ------------------------------------------------------------------ enumeration
@pytest.mark.parametrize("num_layers,g_max", [(5, 6), (8, 4), (13, 6), (30, 6)])
def test_enumeration_matches_a_brute_force(num_layers, g_max):
    brute = defaultdict(set)  # follower count -> distinct leader/follower assignments
    for g in range(1, g_max + 2):
        for b in range(-1, num_layers + 2):
            for e in range(-1, num_layers + 3):
                try:
                    lay = SuperBlockLayout(g, b, e, num_layers)
                except ValueError:
                    continue
                if lay.size <= g_max:
                    brute[len(lay.followers)].add(frozenset((lay.leader_of(f), f) for f in lay.followers))
    assert max(brute) == max_followers(num_layers, g_max)
    for n in range(0, max(brute) + 2):
        got = enumerate_layouts(num_layers, n, g_max)
        keys = [frozenset(pairs_of(lay)) for lay in got]
        assert len(keys) == len(set(keys)), "an assignment was listed twice"
        assert set(keys) == brute.get(n, set())
        for lay in got:
            assert len(lay.followers) == n and 2 <= lay.size <= g_max and lay.end <= num_layers + 1


def test_the_seed_layout_is_its_own_representative():
    layouts = [str(lay) for lay in enumerate_layouts(30, 12, 6)]
    assert "4 14 30" in layouts and "4 14 31" not in layouts  # E=31 gives the same assignment on 30 layers


# ------------------------------------------------------------------ pair costs
def _batches():
    out = []
    for seed in (0, 1):  # two batches: the sums must accumulate across them
        ids, mask = random_batch(batch=3, length=12, seed=seed)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def _capture(model, j, batch):
    seen = {}
    layer = model.model.layers[j]
    h1 = layer.register_forward_pre_hook(lambda m, a, k: seen.__setitem__("x", a[0] if a else k["hidden_states"]),
                                         with_kwargs=True)
    h2 = layer.self_attn.register_forward_hook(lambda m, a, k, o: seen.__setitem__("a", o[0]), with_kwargs=True)
    with torch.no_grad():
        model(batch["input_ids"], attention_mask=batch["attention_mask"])
    h1.remove(), h2.remove()
    return seen


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_pair_cost_matches_the_uniattn_model(family):
    """Cost of (i, i+1) == the error of follower i+1 in a real UniAttn model with layout ``2 i i+2``, W_c = 0."""
    stock, _ = make_pair(family, seed=3)
    batches = _batches()
    costs = pair_statistics(stock, batches, g_max=3, progress=False).costs()
    layers = stock.config.num_hidden_layers
    for i in range(layers - 1):
        j = i + 1
        _, uni = make_pair(family, layout=(2, i, i + 2), seed=3, compensation=False)
        num = den = stream = count = 0.0
        for batch in batches:
            s, u = _capture(stock, j, batch), _capture(uni, j, batch)
            real = batch["attention_mask"].bool()
            torch.testing.assert_close(s["x"], u["x"])  # the same input: only the Softmax differs
            diff = u["a"] - s["a"]
            if family == "gemma2":
                post = stock.model.layers[j].post_attention_layernorm
                diff = post(u["a"]) - post(s["a"])
                num += float(((u["a"] - s["a"])[real] ** 2).sum())
            else:
                num += float((diff[real] ** 2).sum())
            den += float((s["a"][real] ** 2).sum())
            stream += float(((diff[real] ** 2).sum(-1) / (s["x"][real] ** 2).sum(-1)).sum())
            count += int(real.sum())
        assert float(costs["attn"][i, j]) == pytest.approx(num / den, rel=1e-4, abs=1e-10)
        assert float(costs["stream"][i, j]) == pytest.approx(stream / count, rel=1e-4, abs=1e-10)
        assert costs["stream"][i, j] > 0


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_pair_cost_at_distance_two_matches_a_direct_computation(family):
    """(i, i+2) from the model's returned attentions, with K/V heads expanded the textbook way (repeat)."""
    stock, _ = make_pair(family, seed=5)
    batches = _batches()
    costs = pair_statistics(stock, batches, g_max=3, progress=False).costs()
    heads, kv = stock.config.num_attention_heads, stock.config.num_key_value_heads
    for i in range(stock.config.num_hidden_layers - 2):
        j, num, den = i + 2, 0.0, 0.0
        attn = stock.model.layers[j].self_attn
        for batch in batches:
            seen = _capture(stock, j, batch)
            probs = stock(batch["input_ids"], attention_mask=batch["attention_mask"], output_attentions=True).attentions
            u = stock.model.layers[j].input_layernorm(seen["x"])
            v = attn.v_proj(u).view(*u.shape[:2], kv, -1).transpose(1, 2).repeat_interleave(heads // kv, dim=1)
            mixed = ((probs[i] - probs[j]) @ v).transpose(1, 2).flatten(2)
            delta = torch.nn.functional.linear(mixed, attn.o_proj.weight)  # a difference: no bias
            real = batch["attention_mask"].bool()
            num += float((delta[real] ** 2).sum())
            den += float((seen["a"][real] ** 2).sum())
        assert float(costs["attn"][i, j]) == pytest.approx(num / den, rel=1e-4)


# ------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def tokenizer():
    records = load_records(default_data_file("pmc"))[:60]
    return make_tokenizer([build_prompt(r) + r["output"] for r in records], vocab_size=400)


def _checkpoint(path, family, tokenizer, uniform=(2, 3)):
    """A 5-layer random model whose layers ``uniform`` have Q = 0: identical (uniform causal) P, pair cost 0."""
    config = stock_config(family, attn="eager")
    config.vocab_size = len(tokenizer)
    if family == "gemma2":
        config.sliding_window = 256  # sliding and global layers must see the same keys for P to be equal
    torch.manual_seed(0)
    model = STOCK[family](config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        for i in uniform:
            q = model.model.layers[i].self_attn.q_proj
            q.weight.zero_()
            if q.bias is not None:
                q.bias.zero_()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _call(argv) -> int:
    try:
        return main(argv)
    except SystemExit as err:  # argparse's own errors
        return err.code


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_ranks_the_identical_pair_first(family, tokenizer, tmp_path, capsys):
    model = _checkpoint(tmp_path / "m", family, tokenizer)
    data = write_data(tmp_path / "d.json", n=6)
    out = tmp_path / "r.json"
    proxy = ["--proxy", "compensated"] if family == "llama" else []
    rc = _call(["--model_dir", str(model), "--data", str(data), "--followers", "1", "--max_length", "64",
                "--batch_size", "4", "--out", str(out), *proxy])
    assert rc == 0
    result = json.loads(out.read_text())
    rows = result["candidates"]
    assert [r["layout"] for r in rows][0] == "2 2 4" and len(rows) == 4
    assert rows[0]["score"] < 1e-9 < rows[1]["score"]
    assert result["pair_costs"]["stream"][2][3] < 1e-9 and result["pair_costs"]["attn"][0][0] is None
    if proxy:
        assert all(r["components"]["compensated"] >= 0 for r in rows)
    printed = capsys.readouterr().out
    assert "| 1 | 2 2 4 |" in printed and "wall time" in printed


def test_cli_scores_given_layouts(tokenizer, tmp_path, capsys):
    model = _checkpoint(tmp_path / "m", "mistral", tokenizer)
    data = write_data(tmp_path / "d.json", n=4)
    assert _call(["--model_dir", str(model), "--data", str(data), "--layouts", "2 1 6", "3 0 5",
                  "--max_length", "48", "--tokens", "response"]) == 0
    printed = capsys.readouterr().out
    assert "| 2 1 6 |" in printed and "| 3 0 5 |" in printed


@pytest.fixture(scope="module")
def bad_env(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "noconfig").mkdir()
    (root / "broken.json").write_text('[{"instruction": "x", "output": ')
    return _checkpoint(root / "m", "llama", tokenizer), write_data(root / "d.json", n=4), root


@pytest.mark.parametrize("args,needle", [
    (["--followers", "0"], "--followers 0"),
    (["--followers", "40"], "--followers 40"),
    (["--kv_saving", "0.7"], "--kv_saving 0.7"),
    (["--kv_saving", "0.01"], "--kv_saving 0.01"),
    (["--followers", "2", "--kv_saving", "0.2"], "only one"),
    ([], "--followers N"),
    (["--followers", "2", "--data", "{root}/missing.json"], "missing.json"),
    (["--followers", "2", "--data", "{root}/broken.json"], "broken.json"),
    (["--followers", "2", "--model_dir", "{root}/noconfig"], "config.json"),
    (["--layouts", "2 4 9"], "'2 4 9'"),
    (["--layouts", "2 x 4"], "'2 x 4'"),
    (["--followers", "1", "--layouts", "2 1 6"], "'2 1 6'"),
    (["--followers", "2", "--g_max", "1"], "--g_max 1"),
    (["--followers", "2", "--out", "{root}"], "--out"),
])
def test_bad_input_exits_2_and_writes_nothing(bad_env, args, needle, capsys):
    model, data, root = bad_env
    out = root / "never.json"
    argv = ["--model_dir", str(model), "--data", str(data), "--out", str(out)]
    argv += [a.replace("{root}", str(root)) for a in args]  # later flags override the defaults above
    assert _call(argv) == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()
