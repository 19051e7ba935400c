"""kv_report's KV accounting by context length (sliding windows, global vs sliding leaders) against hand
counts and against the cache a real forward leaves; its CLI; the benchmark's KV figures built on it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_pair, random_batch
from transformers import DynamicCache, Gemma2Config, MistralConfig

from uniattn.convert import uniattn_config_from
from uniattn.modeling.cache import cache_nbytes
from uniattn.modeling.layout import SuperBlockLayout
from uniattn.tools import kv_report
from uniattn.tools.kv_report import by_context, cache_bytes, counterpart, filled_cache, load_config, sliding_layers

REPO = Path(__file__).resolve().parent.parent
# 6 layers, window 8 (the cache keeps the last 7 tokens), 2 KV heads x 4: one token of K or V = 16 bf16 bytes
TINY = dict(vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, head_dim=4, sliding_window=8)


def tiny(family):
    return Gemma2Config(**TINY, query_pre_attn_scalar=4) if family == "gemma2" else MistralConfig(**TINY)


def uni(config, layout):
    return uniattn_config_from(config, layout, "softmax")


# Hand counts, in bytes, at 4 / 8 / 32 tokens. Gemma-2: layers 0 2 4 slide, 1 3 5 are global.
#  stock: sliding layers K+V of min(T, 7) tokens, global ones K+V of T.
#  "2 1 5" (global leaders 1 3): followers 2 4 were sliding, now keep V of every token.
#  "2 2 6" (sliding leaders 2 4): followers 3 5 were global, now keep V of 7 tokens only.
GEMMA2 = {"stock": {4: 768, 8: 1440, 32: 3744},
          (2, 1, 5): {4: 640, 8: 1248, 32: 4320},   # 224 + 1024 + 512 + 1024 + 512 + 1024 at 32
          (2, 2, 6): {4: 640, 8: 1152, 32: 1920}}   # 224 + 1024 + 224 + 112 + 224 + 112 at 32
# Mistral: every layer slides; followers 2 4 keep V of min(T, 7) tokens.
MISTRAL = {"stock": {4: 768, 8: 1344, 32: 1344}, (2, 1, 5): {4: 640, 8: 1120, 32: 1120}}


@pytest.mark.parametrize("family, expected", [("gemma2", GEMMA2), ("mistral", MISTRAL)])
def test_accounting_matches_hand_count(family, expected):
    config = tiny(family)
    for t, want in expected["stock"].items():
        assert cache_bytes(config, t) == want, (family, "stock", t)
    for layout, counts in expected.items():
        if layout != "stock":
            for t, want in counts.items():
                assert cache_bytes(uni(config, layout), t) == want, (family, layout, t)


def test_followers_keep_their_leaders_window():
    config = tiny("gemma2")
    assert sliding_layers(config) == [True, False] * 3
    kept = lambda cfg: [(layer.keys.shape[-2] * bool(layer.keys.shape[-1]), layer.values.shape[-2])
                        for layer in filled_cache(cfg, 32).layers]  # (K tokens, V tokens) per layer
    assert kept(config) == [(7, 7), (32, 32)] * 3
    assert kept(uni(config, (2, 1, 5))) == [(7, 7), (32, 32), (0, 32), (32, 32), (0, 32), (32, 32)]
    assert kept(uni(config, (2, 2, 6))) == [(7, 7), (32, 32), (7, 7), (0, 7), (7, 7), (0, 7)]
    assert kept(uni(tiny("mistral"), (2, 1, 5))) == [(7, 7), (7, 7), (0, 7), (7, 7), (0, 7), (7, 7)]


def test_counterpart_and_leader_types():
    sliding = sliding_layers(tiny("gemma2"))
    layout = SuperBlockLayout(2, 1, 5, 6)
    assert kv_report.leader_kind(layout, sliding) == "global"
    assert counterpart(layout, sliding) == SuperBlockLayout(2, 2, 6, 6)  # B + 1, E + 1: two followers each
    assert kv_report.leader_kind(SuperBlockLayout(3, 0, 6, 6), sliding).startswith("mixed")
    assert counterpart(SuperBlockLayout(3, 0, 6, 6), sliding) is None
    assert counterpart(layout, sliding_layers(tiny("mistral"))) is None  # one layer type: no choice
    config, _ = load_config("gemma2-9b")
    nine = sliding_layers(config)
    assert nine == [i % 2 == 0 for i in range(42)]  # Gemma-2: even layers slide
    assert counterpart(SuperBlockLayout(4, 21, 43, 42), nine) == SuperBlockLayout(4, 22, 43, 42)


def test_gemma2_9b_global_leaders_reach_stock_at_16k():
    # 4 21 43: 15 followers, 10 were sliding (they now keep V of all T tokens instead of K+V of 4095) and
    # 5 were global (they drop K of T): the difference is 10 (T - 2 * 4095) - 5 T per token slot, zero at 16380.
    config, _ = load_config("gemma2-9b")
    rows = {(r["layout"], r["context"]): r for r in by_context(
        config, [SuperBlockLayout(4, 21, 43, 42), SuperBlockLayout(4, 22, 43, 42)], (4096, 16384, 32768))}
    g16, g32 = rows["4 21 43", 16384], rows["4 21 43", 32768]
    assert (g16["followers"], g16["followers_were_sliding"], g16["break_even"]) == (15, 10, 16380)
    assert g16["uniattn"] - g16["stock"] == 4 * 4096 * 5 / 16384  # 4 tokens past 16380, 5 net slots of 4 KiB
    assert 1.05 < g32["ratio"] < 1.06
    assert rows["4 21 43", 4096]["ratio"] < 0.83
    assert all(rows["4 22 43", t]["ratio"] < 0.83 for t in (4096, 16384, 32768))
    assert rows["4 22 43", 16384]["break_even"] is None


@pytest.mark.parametrize("family", ["gemma2", "mistral"])
def test_accounting_equals_the_cache_a_forward_leaves(family):
    stock, model = make_pair(family)  # window 5, layout 2 1 6 on 5 layers
    ids, _ = random_batch(batch=1, length=12)
    for m in (stock, model):
        with torch.no_grad():
            past = m(ids, past_key_values=DynamicCache(config=m.config), use_cache=True).past_key_values
            assert cache_nbytes(past) == cache_bytes(m.config, 12, torch.float32)
            m(ids[:, :1], past_key_values=past, use_cache=True)  # one decode step
        assert cache_nbytes(past) == cache_bytes(m.config, 13, torch.float32)


def test_cli_prints_the_table(capsys):
    assert kv_report.main(["gemma2-9b", "--layouts", "4 21 43", "--contexts", "4096", "32768"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 4 2")]
    assert len(rows) == 4 and "| 4 22 43 | sliding | 15 (5) | 32768 |" in out
    assert "| 4 21 43 | global | 15 (10) | 32768 | 193,530.8 | 203,773.2 | 1.0529 |" in out
    assert "keeps the last 4095 tokens" in out and "from 16,380 tokens on" in out
    assert kv_report.main(["mistral-7b", "--layouts", "4 16 33", "--contexts", "4096", "--exact"]) == 0
    out = capsys.readouterr().out
    assert "| 4 16 33 | sliding | 12 (12) | 4096 | 131,040.0 | 106,470.0 | 0.8125 |" in out


@pytest.mark.parametrize("argv, named", [
    (["gemma2-9b", "--layouts", "4 21 99"], "99"),
    (["gemma2-9b", "--layouts", "4 x 43"], "4 x 43"),
    (["gemma2-9x", "--layouts", "4 21 43"], "gemma2-9x"),
    (["gemma2-9b", "--layouts", "4 21 43", "--contexts", "0"], "[0]"),
    (["gemma2-9b"], "--layouts"),
])
def test_cli_bad_input_exits_2(argv, named, capsys):
    with pytest.raises(SystemExit) as done:
        kv_report.main(argv)
    assert done.value.code == 2 and named in capsys.readouterr().err


def test_module_runs_from_the_command_line():
    run = lambda *a: subprocess.run([sys.executable, "-m", "uniattn.tools.kv_report", *a], cwd=REPO,
                                    capture_output=True, text=True, timeout=120)
    ok = run("gemma2-2b", "--layouts", "4 13 25", "--contexts", "4096")
    assert ok.returncode == 0 and "| 4 14 26 | sliding | 9 (3) | 4096 |" in ok.stdout, ok.stderr
    bad = run("gemma2-2b", "--layouts", "4 13 40")
    assert bad.returncode == 2 and "superblock end 40" in bad.stderr


def test_checkpoint_dirs(tmp_path, capsys):
    stock, model = make_pair("gemma2")
    stock.save_pretrained(tmp_path / "base")
    model.save_pretrained(tmp_path / "uni")
    assert kv_report.main([str(tmp_path / "base"), str(tmp_path / "uni"), "--tokens", "12"]) == 0  # two checkpoints
    assert "| UniAttn | 2 1 6 |" in capsys.readouterr().out
    assert kv_report.main([str(tmp_path / "uni"), "--contexts", "32", "--exact"]) == 0  # its own layout
    assert "| 2 1 6 | global | 2 (2) | 32 |" in capsys.readouterr().out
    assert kv_report.main([str(tmp_path / "base"), "--layouts", "2 1 6", "--contexts", "32"]) == 0
    out = capsys.readouterr().out
    assert "| 2 1 6 | global |" in out and "| 2 0 5 | sliding | 2 (0) | 32 |" in out  # 2 2 6: one follower


def test_bench_kv_figures_use_the_accounting(tmp_path):
    from uniattn.tools import bench, bench_report

    stock, model = make_pair("gemma2")
    assert bench.kv_bytes_per_token(model, 32) == cache_bytes(model.config, 32) / 32
    assert bench.kv_bytes_per_token(model, 32) > bench.kv_bytes_per_token(stock, 32)  # global leaders, past 5
    env = {"command": "x", "gpu": "g", "driver": "d", "torch": "t", "transformers": "t", "copy_bandwidth_TBps": 1}
    rows = [{"what": "kv_bytes_per_token", "model": "m 2 1 6", "context": 32, "stock": 100.0, "uniattn": 105.0},
            {"what": "kv_bytes_per_token", "model": "old", "stock": 131072, "uniattn": 106496}]
    md = bench_report.render({"env": env, "rows": rows}, tmp_path / "b")
    assert "| m 2 1 6 | 32 | 100.0 | 105.0 | +5.00% |" in md and "| old | - | 131,072.0 | 106,496.0 | -18.75% |" in md
