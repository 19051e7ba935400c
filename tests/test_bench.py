"""The GPU benchmark's CPU-checkable parts: its byte model, its stock process's arguments, its report,
and init_memory's long calibration records."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from conftest import make_pair
from transformers import LlamaConfig, LlamaForCausalLM

from uniattn.tools import bench, bench_report, init_memory


def test_byte_model_leaves_out_the_input_embedding_table_unless_tied():
    stock, uni = make_pair("llama")
    emb = stock.get_input_embeddings().weight
    assert bench.read_weight_bytes(stock) == bench.weight_bytes(stock) - emb.numel() * emb.element_size()
    # UniAttn shares the embedding and adds W_c: its bytes read differ from stock's by exactly that.
    w_c = sum(p.numel() * p.element_size() for n, p in uni.named_parameters() if "compensation" in n)
    qk = sum(p.numel() * p.element_size() for n, p in stock.named_parameters()
             if any(f"layers.{i}.self_attn.{x}_proj" in n for i in uni.config.superblock_layout.followers for x in "qk"))
    assert bench.read_weight_bytes(uni) == bench.read_weight_bytes(stock) + w_c - qk
    tied = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, tie_word_embeddings=True))
    assert bench.read_weight_bytes(tied) == bench.weight_bytes(tied)


def test_stock_process_rejects_a_bad_point():
    proc = subprocess.run([sys.executable, "-m", "uniattn.tools.bench_stock", "--points", "8x16k"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "'8x16k'" in proc.stderr and "BATCHxCONTEXT" in proc.stderr


def test_report_names_where_the_stock_column_ran(tmp_path):
    env = {"command": "c", "gpu": "g", "driver": "d", "torch": "t", "transformers": "x", "copy_bandwidth_TBps": 4.2,
           "triton": "3.6.0", "decode_kernel": "Triton split-context kernels"}
    res = {"stock": 40.0, "stock_grouped": 10.0, "uniattn": 9.0, "stock_source": "plain stock, own process"}
    row = bench.decode_row("m 4 16 33", "compiled", 8, 16384, res, 30e9, 27e9, 4.2e12)
    md = bench_report.render({"env": env, "rows": [row]}, tmp_path / "b")
    assert "compiled (stock: own process)" in md and "Triton 3.6.0" in md
    assert f"{row['uniattn_bw_frac']:.0%}" in md and round(row["method_ratio"], 3) == 0.9
    assert "fused projections" not in md.split("## ")[0]
    earlier = {**env, "command": "bench --part main", "copy_bandwidth_TBps": 4.26}
    md = bench_report.render({"env": {**env, "fused_projections": True, "earlier_parts": [earlier]}, "rows": [row]},
                             tmp_path / "b")
    header = md.split("## ")[0]
    assert "Earlier part: `bench --part main`" in header and "4.26 TB/s" in header and "fused projections" in header
    skipped = bench.not_measured("m 4 16 33", ["decode static batch 1 / 4096", "generate()"])
    md = bench_report.render({"env": env, "rows": [row, skipped]}, tmp_path / "b")
    assert "Not measured (m 4 16 33; past the run's `--minutes` budget): decode static batch 1 / 4096, generate()." in md
    # a largest-batch bisection cut by --minutes is printed as the lower bound it is
    batch = {"what": "largest_batch", "model": "m 4 16 33", "context": 16384, "stock": 54, "uniattn": 37,
             "uniattn_lower_bound": True}
    md = bench_report.render({"env": env, "rows": [batch]}, tmp_path / "b")
    assert "| m 4 16 33 at 16384 tokens | 54.0 | - | ≥ 37.0 | - |" in md and "ran out of the run's `--minutes`" in md
    md = bench_report.render({"env": env, "rows": [{**batch, "uniattn_lower_bound": False}]}, tmp_path / "b")
    assert "| 54.0 | - | 37.0 | -31.5% |" in md and "≥" not in md


def test_new_gpu_tools_check_their_arguments_first():
    for args, expected in ((["uniattn.tools.matmul_sweep", "--tokens", "8", "32"], "each must be 1-16"),
                           (["uniattn.tools.prefill_check", "--rounds", "0"], "must be positive"),
                           (["uniattn.tools.decode_sweep", "--grid", "warps=four"], "must be integers"),
                           (["uniattn.tools.launch_chain", "--tokens", "17"], "each must be 1-16"),
                           (["uniattn.tools.decode_ab", "--points", "8y16384"], "a point is BATCHxCONTEXT"),
                           (["uniattn.tools.decode_ab", "--variants", "fast"], "not among"),
                           (["uniattn.tools.decode_ab", "--attention", "blocks=4"], "with KEY one of"),
                           (["uniattn.tools.decode_profile", "--attention", "stages=0"], "N >= 1"),
                           (["uniattn.tools.fusion_sweep", "--rows", "17"], "must be 1-16")):
        proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)
        assert proc.returncode == 2 and expected in proc.stderr, (args, proc.stderr[-500:])


def test_decode_sweep_ranks_by_the_sum_of_times_over_each_shapes_best():
    from uniattn.tools.decode_sweep import rank
    big, small = (8, 16384, 128), (1, 4096, 128)
    # a: best at the big shape by 1%, 50% slower at the small one; b: 1% slower there, best at the small one
    times = {("a", big): 100.0, ("a", small): 15.0, ("b", big): 101.0, ("b", small): 10.0,
             ("c", big): 130.0, ("c", small): 12.0}
    ranked = rank(times)
    assert [values for _, values, _ in ranked] == ["b", "a", "c"]
    assert abs(ranked[0][0] - 2.01) < 1e-9 and ranked[0][2] == {small: 10.0, big: 101.0}


def test_long_records_fill_the_length(tmp_path):
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"instruction": f"q{i}", "input": "", "output": "x" * (50 + i)} for i in range(7)]))
    out = init_memory.long_records(data, 5, 64, tmp_path / "long.json")
    rows = json.loads(out.read_text())
    assert len(rows) == 5 and all(len(r["output"]) >= 6 * 64 for r in rows)
    assert rows[0]["output"].startswith("q0\n\n" + "x" * 50) and "q6" in "".join(r["output"] for r in rows)
    assert torch.tensor([len(r["output"]) for r in rows]).max() < 6 * 64 + 200  # joined no further than needed
