"""Closed-form W_c: the solver, the layer-by-layer propagation, distributed runs and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_pair

from uniattn.init_calc import NormalEquations, gemma2_stream_target, main as init_main, propagate
from uniattn.init_file import apply_init, load_init, read_metadata


@pytest.mark.parametrize("bias", (False, True))
@pytest.mark.parametrize("ridge", (0.0, 1e-2))
def test_normal_equations_match_a_direct_solve(bias, ridge):
    g = torch.Generator().manual_seed(0)
    u, t = torch.randn(300, 7, generator=g, dtype=torch.float64), torch.randn(300, 5, generator=g, dtype=torch.float64)
    eq = NormalEquations(7, 5, bias)
    for chunk in range(0, 300, 64):  # streamed in pieces
        eq.add(u[chunk : chunk + 64], t[chunk : chunk + 64])
    x = eq.solve(ridge)
    design = torch.cat([u, torch.ones(300, 1, dtype=torch.float64)], 1) if bias else u
    if ridge == 0:
        want = torch.linalg.lstsq(design, t).solution
    else:
        lam = ridge * (design.T @ design).diagonal().mean()
        want = torch.linalg.solve(design.T @ design + lam * torch.eye(design.shape[1], dtype=torch.float64), design.T @ t)
    torch.testing.assert_close(x, want)
    resid = ((design @ x - t) ** 2).sum() / 300
    assert eq.residual(x) == pytest.approx(float(resid), rel=1e-9)


def _batches(n=6, length=11, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in range(0, n, batch):
        ids = torch.randint(3, 97, (batch, length), generator=g)
        mask = torch.ones_like(ids)
        mask[1, -4:] = 0  # padding must not enter the statistics
        ids[mask == 0] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def _slow_reference(stock, uni, batches, ridge):
    """One full forward of each model per follower, with hooks: the textbook (expensive) procedure."""
    cfg = uni.config
    gemma = cfg.base_model_type == "gemma2"
    for f in cfg.superblock_layout.followers:
        comp = uni.model.layers[f].self_attn.compensation
        torch.nn.init.zeros_(comp.weight)
        eq = NormalEquations(cfg.hidden_size, cfg.hidden_size, comp.bias is not None)
        for b in batches:
            seen = {}

            def grab(model, key):
                layer = model.model.layers[f]
                h1 = layer.register_forward_pre_hook(lambda m, a, k: seen.__setitem__(key + "x", a[0]), with_kwargs=True)
                h2 = layer.self_attn.register_forward_hook(
                    lambda m, a, k, o: seen.update({key + "u": k.get("hidden_states", a[0] if a else None), key + "a": o[0]}),
                    with_kwargs=True)
                return h1, h2

            handles = grab(stock, "b") + grab(uni, "u")
            with torch.no_grad():
                stock(b["input_ids"], attention_mask=b["attention_mask"])
                uni(b["input_ids"], attention_mask=b["attention_mask"])
            for h in handles:
                h.remove()
            if gemma:  # the linearised stream objective; tests/test_init_calc_gemma2.py checks that function itself
                norm = uni.model.layers[f].post_attention_layernorm
                target = gemma2_stream_target(norm, seen["ba"], seen["ua"], seen["bx"] - seen["ux"])
            else:
                target = (seen["bx"] + seen["ba"]) - (seen["ux"] + seen["ua"])
            real = b["attention_mask"].bool()
            eq.add(seen["uu"][real], target[real])
        x = eq.solve(ridge)
        with torch.no_grad():
            comp.weight.copy_(x[: cfg.hidden_size].T)
            if comp.bias is not None:
                comp.bias.copy_(x[cfg.hidden_size])
    return {n: p.clone() for n, p in uni.named_parameters() if "compensation" in n}


def test_layer_by_layer_equals_one_forward_per_follower(family):
    batches = _batches()
    stock, fast = make_pair(family, layout=(2, 1, 6), compensation=False, seed=31)
    _, slow = make_pair(family, layout=(2, 1, 6), compensation=False, seed=31)
    report = propagate(stock, fast, batches, fit=True, ridge=1e-3, progress=False)
    want = _slow_reference(stock, slow, batches, ridge=1e-3)
    got = {n: p for n, p in fast.named_parameters() if "compensation" in n}
    assert got.keys() == want.keys() and len(got) >= 2
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)
        assert torch.count_nonzero(got[name]) > 0
    assert [r["layer"] for r in report] == [2, 4]
    assert all(r["tokens"] == 6 * 11 - 4 * 2 for r in report)  # padding excluded
    assert all(r["fit_mse"] < r["target_mse"] for r in report)


def test_fit_reduces_the_in_sample_stream_error(family):
    # Held-out gains need real weights (tests/test_real_weights.py); random tiny models only show the fit works.
    batches = _batches(n=12, seed=1)
    stock, uni = make_pair(family, layout=(2, 1, 6), compensation=False, seed=32)
    without = propagate(stock, uni, batches, fit=False, progress=False)
    with_wc = propagate(stock, uni, batches, fit=True, ridge=1e-6, progress=False)
    assert with_wc[0]["stream_rel_error"] < 0.5 * without[0]["stream_rel_error"]
    assert sum(r["stream_rel_error"] for r in with_wc) < sum(r["stream_rel_error"] for r in without)


# ------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny random LLaMA checkpoint with the real SmolLM2 tokenizer (vocab folded to the tiny size)."""
    from transformers import AutoTokenizer

    from uniattn.tools.smollm2 import ensure_smollm2

    path = tmp_path_factory.mktemp("tiny") / "base"
    stock, _ = make_pair("llama", seed=33)
    stock.config.vocab_size = 49152
    big = type(stock)(stock.config)
    big.save_pretrained(path)
    AutoTokenizer.from_pretrained(ensure_smollm2()).save_pretrained(path)
    return path


def _data(tmp_path, n=12):
    rows = [{"instruction": f"Say {i}.", "input": "" if i % 2 else f"context {i}", "output": f"The answer is {i}."} for i in range(n)]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def _args(base, data, out, *extra):
    return ["--model_dir", str(base), "--data", str(data), "--superblock", "2", "1", "6", "--num_layers", "5",
            "--output", str(out), "--batch_size", "4", "--max_length", "48", "--include_eval_items", *extra]


def test_cli_writes_file_and_checkpoint(tiny_base, tmp_path):
    data = _data(tmp_path)
    out = tmp_path / "o" / "init.safetensors"
    assert init_main(_args(tiny_base, data, out, "--save_model", str(tmp_path / "model"))) == 0
    meta = read_metadata(out)
    assert meta["superblock"] == "2 1 6" and meta["samples"] == 12 and meta["tokens"] > 0
    assert [f["layer"] for f in meta["followers"]] == [2, 4]
    import uniattn  # noqa: F401
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    tensors = load_init(out, model.config)
    for name, tensor in tensors.items():
        assert torch.equal(model.state_dict()[name], tensor)
    # apply_init puts the file's W_c into another model: zero it first, so only the file can restore it.
    other = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    with torch.no_grad():
        for name in tensors:
            other.get_parameter(name).zero_()
    apply_init(other, out)
    for name, tensor in tensors.items():
        assert torch.count_nonzero(tensor) > 0 and torch.equal(other.get_parameter(name), tensor)


def test_calibration_leaves_out_the_evaluation_items_by_default(tiny_base, tmp_path):
    from uniattn.data import load_records
    from uniattn.eval.split import train_eval_split

    data = _data(tmp_path, n=40)
    train, held_out = train_eval_split(load_records(data))
    assert held_out, "the sample should hold some evaluation items"
    out = tmp_path / "init.safetensors"
    args = [a for a in _args(tiny_base, data, out) if a != "--include_eval_items"]
    assert init_main(args) == 0
    assert read_metadata(out)["samples"] == len(train)


def test_one_and_two_processes_agree(tiny_base, tmp_path):
    data = _data(tmp_path, n=16)
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    assert init_main(_args(tiny_base, data, one)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                    "-m", "uniattn.init_calc", *_args(tiny_base, data, two)], check=True, env=env)
    a, b = load_init(one, _config(tiny_base)), load_init(two, _config(tiny_base))
    assert read_metadata(two)["world_size"] == 2
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-7)


def _config(base):
    from uniattn.convert import uniattn_config_from
    from transformers import AutoConfig

    return uniattn_config_from(AutoConfig.from_pretrained(base), (2, 1, 6))


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist"),
        ("malformed", "line 2 is not valid JSON"),
        ("empty", "holds no records"),
        ("no_output", "no non-empty 'output'"),
        ("layers", "layer count 7 does not match"),
        ("layout", "has no follower"),
        ("unwritable", "not a writable folder"),
    ],
)
def test_bad_input_fails_clearly_and_writes_nothing(tiny_base, tmp_path, capsys, case, message):
    data = _data(tmp_path)
    out = tmp_path / "out" / "init.safetensors"
    args = _args(tiny_base, data, out)
    if case == "missing":
        args[args.index("--data") + 1] = str(tmp_path / "nope.json")
    elif case == "malformed":
        data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": oops}\n')
    elif case == "empty":
        data.write_text("[]")
    elif case == "no_output":
        data.write_text('[{"instruction": "a", "input": ""}]')
    elif case == "layers":
        args[args.index("--num_layers") + 1] = "7"
    elif case == "layout":
        args[args.index("--superblock") + 1 : args.index("--superblock") + 4] = ["2", "4", "6"]
    elif case == "unwritable":
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "init.safetensors"
        args[args.index("--output") + 1] = str(out)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert init_main(args) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


# ------------------------------------------------------------------ --ridge auto
from uniattn.init_calc import holdout_flags, select_ridge  # noqa: E402


@pytest.mark.parametrize("bias", (False, True))
def test_heldout_error_from_sufficient_statistics_is_the_direct_mse(bias):
    g = torch.Generator().manual_seed(5)
    u, t = torch.randn(123, 6, generator=g, dtype=torch.float64), torch.randn(123, 4, generator=g, dtype=torch.float64)
    w = torch.randn(6 + bias, 4, generator=g, dtype=torch.float64)
    held = NormalEquations(6, 4, bias)
    for chunk in range(0, 123, 50):
        held.add(u[chunk : chunk + 50], t[chunk : chunk + 50])
    design = torch.cat([u, torch.ones(123, 1, dtype=torch.float64)], 1) if bias else u
    direct = float(((design @ w - t) ** 2).sum() / 123)
    assert held.residual(w) == pytest.approx(direct, rel=1e-12)
    # and the merged statistics are the statistics of the union
    other = NormalEquations(6, 4, bias)
    other.add(u[:7], t[:7])
    both = held.merged(other)
    assert int(both.count) == 130 and both.residual(w) == pytest.approx(
        float((((design @ w - t) ** 2).sum() + ((design[:7] @ w - t[:7]) ** 2).sum()) / 130), rel=1e-12)


def test_auto_picks_a_larger_ridge_when_few_fit_tokens_and_large_noise():
    g = torch.Generator().manual_seed(7)
    d, n_fit, n_held = 24, 30, 600
    w_star = torch.randn(d, 5, generator=g, dtype=torch.float64) * 0.1
    u = torch.randn(n_fit + n_held, d, generator=g, dtype=torch.float64)
    t = u @ w_star + 3.0 * torch.randn(n_fit + n_held, 5, generator=g, dtype=torch.float64)
    fit, held = NormalEquations(d, 5, False), NormalEquations(d, 5, False)
    fit.add(u[:n_fit], t[:n_fit])
    held.add(u[n_fit:], t[n_fit:])
    grid = (1e-6, 1e-4, 1e-2, 1e-1, 1.0, 10.0)
    chosen, errors = select_ridge(fit, held, grid)
    assert chosen > min(grid)
    assert errors[grid.index(chosen)] == min(errors)
    assert errors[grid.index(chosen)] < errors[0]
    for r, e in zip(grid, errors):  # each error is the direct held-out MSE of that ridge's fit-part solution
        x = fit.solve(r)
        assert e == pytest.approx(float(((u[n_fit:] @ x - t[n_fit:]) ** 2).sum() / n_held), rel=1e-9)


def _with_holdout(batches, every=2):
    return [{**b, "holdout": torch.arange(len(b["input_ids"])) % every == k % every} for k, b in enumerate(batches)]


def test_auto_with_one_grid_value_equals_that_fixed_ridge_on_all_tokens(family):
    batches = _batches(n=9)
    stock, fixed = make_pair(family, layout=(2, 1, 6), compensation=False, seed=34)
    _, auto = make_pair(family, layout=(2, 1, 6), compensation=False, seed=34)
    want_report = propagate(stock, fixed, batches, fit=True, ridge=1e-2, progress=False)
    report = propagate(stock, auto, _with_holdout(batches), fit=True, ridge="auto", ridge_grid=(1e-2,), progress=False)
    want = {n: p for n, p in fixed.named_parameters() if "compensation" in n}
    got = {n: p for n, p in auto.named_parameters() if "compensation" in n}
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-9)
    for r, w in zip(report, want_report):
        assert r["ridge"] == 1e-2 and len(r["holdout_mse"]) == 1
        assert r["fit_tokens"] > 0 and r["holdout_tokens"] > 0 and r["fit_tokens"] + r["holdout_tokens"] == w["tokens"]
        assert r["tokens"] == w["tokens"] and r["fit_mse"] == pytest.approx(w["fit_mse"], rel=1e-6)


def test_holdout_split_is_deterministic_and_keeps_copies_of_a_question_together():
    rows = [{"instruction": f"As a doctor, {i}", "input": f"###Question: q{i % 10}\n###Options: A"} for i in range(60)]
    flags = holdout_flags(rows, 0.3)
    assert flags == holdout_flags(list(rows), 0.3)
    assert all(flags[i] == flags[i % 10] for i in range(60))
    assert 0 < sum(flags[:10]) < 10


def test_cli_ridge_auto_records_the_choice(tiny_base, tmp_path):
    data = _data(tmp_path, n=16)
    out, ref = tmp_path / "auto.safetensors", tmp_path / "fixed.safetensors"
    assert init_main(_args(tiny_base, data, out, "--ridge", "auto", "--holdout_fraction", "0.4")) == 0
    meta = read_metadata(out)
    assert meta["ridge"] == "auto" and meta["holdout_fraction"] == 0.4
    assert meta["ridge_grid"] == [1e-6, 1e-4, 1e-2, 1e-1, 1.0, 10.0]
    assert meta["fit_tokens"] > 0 and meta["holdout_tokens"] > 0
    assert meta["fit_tokens"] + meta["holdout_tokens"] == meta["tokens"]
    for f in meta["followers"]:
        assert len(f["holdout_mse"]) == len(meta["ridge_grid"])
        assert f["ridge"] in meta["ridge_grid"]
        assert f["holdout_mse"][meta["ridge_grid"].index(f["ridge"])] == min(f["holdout_mse"])
        assert (f["fit_tokens"], f["holdout_tokens"]) == (meta["fit_tokens"], meta["holdout_tokens"])
    # one grid value: the same W_c as that fixed ridge on every token
    one = tmp_path / "one.safetensors"
    assert init_main(_args(tiny_base, data, one, "--ridge", "auto", "--ridge_grid", "0.01")) == 0
    assert init_main(_args(tiny_base, data, ref, "--ridge", "0.01")) == 0
    assert read_metadata(ref)["ridge"] == 0.01 and "ridge_grid" not in read_metadata(ref)
    a, b = load_init(one, _config(tiny_base)), load_init(ref, _config(tiny_base))
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-9)


def test_default_ridge_is_chosen_on_held_out_records_unless_too_few(tiny_base, tmp_path):
    data = _data(tmp_path, n=16)
    auto, small = tmp_path / "auto.safetensors", tmp_path / "small.safetensors"
    assert init_main(_args(tiny_base, data, auto)) == 0
    assert read_metadata(auto)["ridge"] == "auto" and read_metadata(auto)["holdout_tokens"] > 0
    # One record cannot be split: the default falls back to the seed's ridge, an explicit auto refuses.
    assert init_main(_args(tiny_base, data, small, "--num_samples", "1")) == 0
    assert read_metadata(small)["ridge"] == 1e-4 and "ridge_grid" not in read_metadata(small)
    assert init_main(_args(tiny_base, data, tmp_path / "x.safetensors", "--num_samples", "1", "--ridge", "auto")) == 2
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--ridge", "lots"], "--ridge 'lots' is not a positive number"),
        (["--ridge", "-0.5"], "--ridge '-0.5' is not a positive number"),
        (["--ridge", "0"], "--ridge '0' is not a positive number"),
        (["--ridge", "auto", "--ridge_grid"], "--ridge_grid is empty"),
        (["--ridge", "auto", "--ridge_grid", "1e-2", "-1"], "--ridge_grid value '-1' is not a positive number"),
        (["--ridge", "auto", "--ridge_grid", "1e-2", "x"], "--ridge_grid value 'x' is not a positive number"),
        (["--ridge", "auto", "--holdout_fraction", "0"], "--holdout_fraction '0' is outside (0, 1)"),
        (["--ridge", "auto", "--holdout_fraction", "1"], "--holdout_fraction '1' is outside (0, 1)"),
        (["--ridge", "auto", "--holdout_fraction", "half"], "--holdout_fraction 'half' is outside (0, 1)"),
        (["--ridge", "auto", "--holdout_fraction", "1e-12"], "leaves the held-out part without all tokens"),
        (["--ridge", "auto", "--holdout_fraction", "0.999999999999"], "leaves the fit part without all tokens"),
    ],
)
def test_bad_ridge_options_fail_clearly_and_write_nothing(tiny_base, tmp_path, capsys, extra, message):
    data = _data(tmp_path)
    out = tmp_path / "out" / "init.safetensors"
    args = _args(tiny_base, data, out, "--save_model", str(tmp_path / "model"), *extra)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert init_main(args) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_ridge_auto_two_processes_one_without_a_batch_agree_with_one(tiny_base, tmp_path):
    from uniattn.data import load_records

    data = _data(tmp_path, n=8)
    flags = holdout_flags(load_records(data), 0.5)
    assert 0 < sum(flags) < len(flags)  # both sides hold records
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    extra = ("--ridge", "auto", "--holdout_fraction", "0.5", "--batch_size", "8")  # one batch: rank 1 gets none
    assert init_main(_args(tiny_base, data, one, *extra)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29518",
                    "-m", "uniattn.init_calc", *_args(tiny_base, data, two, *extra)], check=True, env=env)
    m1, m2 = read_metadata(one), read_metadata(two)
    assert m2["world_size"] == 2
    assert [f["ridge"] for f in m2["followers"]] == [f["ridge"] for f in m1["followers"]]
    for f1, f2 in zip(m1["followers"], m2["followers"]):
        assert f2["holdout_mse"] == pytest.approx(f1["holdout_mse"], rel=1e-6)
    a, b = load_init(one, _config(tiny_base)), load_init(two, _config(tiny_base))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ bounded memory (uniattn.activations)
def test_offloaded_activations_give_the_same_w_c_and_leave_no_files(family, tmp_path):
    batches = _batches(n=9, seed=4)
    stock, _ = make_pair(family, layout=(2, 1, 6), compensation=False, seed=41)
    got = {}
    for mode in ("device", "cpu", "disk"):
        _, uni = make_pair(family, layout=(2, 1, 6), compensation=False, seed=41)
        report = propagate(stock, uni, batches, fit=True, ridge=1e-3, progress=False, offload=mode, offload_dir=tmp_path)
        got[mode] = (report, {n: p.clone() for n, p in uni.named_parameters() if "compensation" in n})
    for mode in ("cpu", "disk"):
        assert [r["stream_rel_error"] for r in got[mode][0]] == pytest.approx(
            [r["stream_rel_error"] for r in got["device"][0]], rel=1e-6)
        for name, want in got["device"][1].items():
            torch.testing.assert_close(got[mode][1][name], want, rtol=1e-5, atol=1e-8)
    assert list(tmp_path.iterdir()) == []  # the disk store removed its folder


def test_auto_offload_keeps_small_sets_on_the_device_and_spills_large_ones():
    from uniattn.activations import choose_mode

    assert choose_mode("auto", torch.device("cpu"), 10, 100) == "device"
    assert choose_mode("auto", torch.device("cpu"), 1000, 100) == "disk"
    assert choose_mode("auto", torch.device("cuda"), 1000, 100) == "cpu"
    assert choose_mode("cpu", torch.device("cpu"), 10, 100) == "cpu"


def test_three_processes_with_one_batch_agree_with_one(tiny_base, tmp_path):
    data = _data(tmp_path, n=6)
    one, three = tmp_path / "one.safetensors", tmp_path / "three.safetensors"
    extra = ("--batch_size", "8", "--ridge", "1e-3", "--offload", "disk")  # one batch: ranks 1 and 2 get none
    assert init_main(_args(tiny_base, data, one, *extra)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "3", "--master_port", "29519",
                    "-m", "uniattn.init_calc", *_args(tiny_base, data, three, *extra)], check=True, env=env, timeout=300)
    assert read_metadata(three)["world_size"] == 3 and read_metadata(three)["offload"] == "disk"
    a, b = load_init(one, _config(tiny_base)), load_init(three, _config(tiny_base))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-7)


def test_tokens_response_fits_on_the_response_tokens_only(tiny_base, tmp_path):
    from transformers import AutoTokenizer

    from uniattn.data import load_records
    from uniattn.init_calc import make_batches

    data = _data(tmp_path, n=12)
    every, response = tmp_path / "all.safetensors", tmp_path / "response.safetensors"
    assert init_main(_args(tiny_base, data, every, "--ridge", "1e-3")) == 0
    assert init_main(_args(tiny_base, data, response, "--ridge", "1e-3", "--tokens", "response")) == 0
    m_all, m_resp = read_metadata(every), read_metadata(response)
    batches = make_batches(load_records(data), AutoTokenizer.from_pretrained(tiny_base), 48, 4)
    want = sum(int((b["labels"] != -100).sum()) for b in batches)  # independent count: the labelled tokens
    assert m_resp["token_selection"] == "response" and m_resp["tokens"] == want < m_all["tokens"]
    assert all(f["tokens"] == want for f in m_resp["followers"])
    a, b = load_init(every, _config(tiny_base)), load_init(response, _config(tiny_base))
    assert any(not torch.allclose(a[n], b[n]) for n in a)  # a different token set gives a different fit
