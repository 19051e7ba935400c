"""The Triton decode kernels: dispatch and fallback here, the kernels themselves in Triton's interpreter.

The GPU side (bf16, the real kernels, compiled decode) is ``python -m uniattn.tools.decode_check``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_pair, random_batch
from transformers import StaticCache

from uniattn.modeling import kernels, triton_decode

ROOT = Path(__file__).resolve().parents[1]
KIT = Path(os.environ.get("VENV", ROOT / ".venv")) / "triton-interpreter"


def test_cpu_decode_takes_the_pytorch_path(monkeypatch):
    # On the CPU (no interpreter) the kernels never run: decode is the reference path, exactly.
    monkeypatch.setattr(triton_decode, "decode_attend", lambda *a, **k: pytest.fail("Triton kernel on the CPU"))
    _, uni = make_pair("llama", attn="sdpa", seed=5)
    ids, _ = random_batch(batch=2, length=8, seed=6)
    ids[:] = ids[0]
    with torch.no_grad():
        full = uni(ids).logits
        past = StaticCache(config=uni.config, max_cache_len=10)
        steps = [uni(ids[:, :5], past_key_values=past, use_cache=True).logits]
        steps += [uni(ids[:, t:t + 1], past_key_values=past, use_cache=True).logits for t in range(5, 8)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)


def test_only_leaders_with_softmax_followers_hand_on_rows():
    for sharing, expected in (("softmax", {1, 3}), ("kv", set())):
        _, uni = make_pair("llama", attn="sdpa", sharing=sharing)  # layout 2 1 6 on 5 layers: leaders 1, 3
        got = {i for i, layer in enumerate(uni.model.layers) if getattr(layer.self_attn, "hands_on_rows", False)}
        assert got == expected, (sharing, got)


def test_decode_kernel_choice_is_checked():
    with pytest.raises(ValueError, match="'triton'.*auto.*torch"):
        kernels.set_decode_kernel("triton")
    for name in ("UNIATTN_DECODE_KERNEL", "UNIATTN_DECODE_LAYER"):
        env = {**os.environ, name: "fast"}
        proc = subprocess.run([sys.executable, "-c", "import uniattn"], env=env, capture_output=True, text=True,
                              cwd=ROOT)
        assert proc.returncode != 0 and f"{name}='fast'" in proc.stderr, (name, proc.stderr[-500:])


@pytest.mark.skipif(not (KIT / ".complete").is_file(),
                    reason=f"no Triton interpreter kit at {KIT}: run bash scripts/setup_env.sh test")
def test_kernels_in_the_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(KIT), str(ROOT)])}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_interpreter_check.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert all(f"{part}: ok" in proc.stdout for part in ("kernels", "linear", "fused", "layers", "models")), (
        proc.stdout[-2000:])


@pytest.mark.skipif(not (KIT / ".complete").is_file(),
                    reason=f"no Triton interpreter kit at {KIT}: run bash scripts/setup_env.sh test")
def test_compiled_fused_decode_in_the_triton_interpreter():
    # The kernels as the opaque custom ops the GPU uses (fake shapes, declared mutations), compiled.
    env = {**os.environ, "TRITON_INTERPRET": "1", "UNIATTN_INTERPRET_OPS": "1",
           "PYTHONPATH": os.pathsep.join([str(KIT), str(ROOT)])}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_compile_check.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "compiled: ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_the_launch_shape_reaches_the_ops_as_an_argument(monkeypatch):
    # Read inside a traced op, CONFIG stayed out of torch.compile's cache key, and a compile after a
    # change took the cached kernels of the old launch shape (docs/BENCHMARK.md). Passed as an
    # argument from where dynamo traces, it is in the graph.
    seen = []

    def attend(q, k, v, mask, scale, softcap, write_rows, launch):
        seen.append(("attend", list(launch)))
        b, h, _, d = q.shape
        return q.new_zeros(b, h, 2, d), q.new_zeros(b, h, 2, 2), q.new_zeros(b, h, k.shape[2]), q.new_zeros(b, h, 3)

    def apply(rows, factor, value, launch, nxt=None, chunk=0):
        seen.append(("apply", list(launch)))
        return value.new_zeros(rows.shape[0], rows.shape[1], 2, value.shape[3])

    monkeypatch.setattr(triton_decode, "_attend_op", attend)
    monkeypatch.setattr(triton_decode, "_apply_op", apply)
    monkeypatch.setattr(triton_decode, "_merge_op", lambda p, ml, tmax, dtype, *ahead: (p[:, :, 0].to(dtype), tmax))
    for key, value in (("programs_per_sm", 3), ("block_n", 32), ("warps", 8), ("stages", 2), ("min_tiles", 5)):
        monkeypatch.setitem(triton_decode.CONFIG, key, value)
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 70, 16)
    _, rows = triton_decode.decode_attend(q, k, k, None, 0.25, None, write_rows=True)
    triton_decode.decode_apply(rows, k)
    assert seen == [("attend", [3, 32, 8, 2, 5]), ("apply", [3, 32, 8, 2, 5])] and rows.block == 32


def test_tiles_shrink_to_the_devices_shared_memory(monkeypatch):
    cuda = torch.device("cuda")
    for key, value in (("block_n", 128), ("stages", 2)):
        monkeypatch.setitem(triton_decode.CONFIG, key, value)
    keys = list(triton_decode.SETTINGS)
    for smem, block in ((227 << 10, 128), (100 << 10, 64), (40 << 10, 32), (8 << 10, 32)):
        monkeypatch.setattr(triton_decode, "_shared_memory", lambda device, smem=smem: smem)
        got = triton_decode.settings(cuda)
        assert got[keys.index("block_n")] == block and got[keys.index("stages")] == 2, (smem, got)
    assert triton_decode.settings()[keys.index("block_n")] == 128  # no device: CONFIG as it is


def test_product_tiles_follow_the_rule_and_the_overrides(monkeypatch):
    from uniattn.modeling import triton_linear, triton_qkv
    monkeypatch.setattr(triton_linear, "TILES", {})
    rule = {("linear", 4096, 4096): (32, 256, 5, 4), ("linear", 28672, 4096): (32, 128, 3, 4),
            ("linear", 4096, 14336): (32, 256, 5, 4), ("linear", 128256, 4096): (64, 128, 4, 4),
            ("linear", 6144, 4096): (64, 256, 4, 4), ("project", 6144, 4096): (64, 256, 4, 4),
            ("project", 5120, 4096): (64, 256, 4, 4), ("linear", 100, 256): None}
    for (kernel, n, k), tiles in rule.items():
        assert triton_linear.config(n, k, kernel) == tiles, (kernel, n, k)
    # a head of 32 halves the projection's 64 columns to fit; 16 fits none
    assert [triton_qkv._half(5120, 4096, d) for d in (128, 64, 32, 16)] == [32, 32, 16, None]
    triton_linear.TILES["linear", 4096, 4096] = (16, 512, 8, 8)
    triton_linear.TILES["linear", 4096, 14336] = (48, 128, 3, 4)  # 48 does not divide 4096: unusable
    assert triton_linear.config(4096, 4096) == (16, 512, 8, 8) and triton_linear.config(4096, 14336) is None
    assert triton_linear.config(4096, 4096, "project") == (64, 256, 4, 4)  # the override is the products' only
    # stages shrink (to 2 at the least) to the device's shared memory: stages - 1 tiles in flight
    cuda = torch.device("cuda")
    for smem, stages in ((227 << 10, 5), (100 << 10, 5), (72 << 10, 4), (24 << 10, 2), (1, 2)):
        monkeypatch.setattr(triton_linear, "shared_memory", lambda device, smem=smem: smem)
        assert triton_linear.fitted_stages(5, 32, 256, cuda) == stages, smem


def test_linear_sweep_checks_its_inputs(tmp_path, capsys):
    from uniattn.tools import decode_ab, linear_sweep
    settings = linear_sweep.grid_settings({"block_n": (32, 64), "block_k": (256, 512), "stages": (4, 8),
                                           "warps": (4,)})
    assert settings == [(32, 256, 4, 4), (32, 256, 8, 4), (32, 512, 4, 4), (64, 256, 4, 4)]  # 7 tiles of 24 KiB fit, 3 of 80 do not
    pick = tmp_path / "pick.json"
    pick.write_text('{"linear 4096x4096": [32, 256, 5, 4], "project 5120x4096": [64, 128, 6, 4]}')
    assert linear_sweep.load_tiles(str(pick)) == {("linear", 4096, 4096): (32, 256, 5, 4),
                                                  ("project", 5120, 4096): (64, 128, 6, 4)}
    for bad in ('{"linear 4096": [32, 256, 5, 4]}', '{"gemm 8x8": [1, 1, 1, 1]}', '{"linear 8x8": [0, 1, 1, 1]}', "["):
        pick.write_text(bad)
        with pytest.raises(ValueError, match="not a linear_sweep --pick file"):
            linear_sweep.load_tiles(str(pick))
    assert decode_ab.main(["--tiles", str(pick)]) == 2
    assert linear_sweep.main(["--grid", "stages=0"]) == 2 and linear_sweep.main(["--shapes", "Q"]) == 2
    err = capsys.readouterr().err
    assert "--tiles" in err and "stages=0" in err and "'Q'" in err


def test_the_launch_shape_is_read_in_a_fullgraph_compile():
    # decode_attend calls settings(device) where dynamo traces a compiled decode step.
    fn = torch.compile(lambda x: x * triton_decode.settings(x.device)[1], fullgraph=True, backend="eager")
    x = torch.randn(3)
    torch.testing.assert_close(fn(x), x * triton_decode.CONFIG["block_n"])


@pytest.mark.skipif(not (KIT / ".complete").is_file(),
                    reason=f"no Triton interpreter kit at {KIT}: run bash scripts/setup_env.sh test")
def test_prefetching_kernels_build_for_sm90_and_write_only_their_outputs():
    # Triton's compiler and ptxas with no GPU: the L2 prefetch is in the PTX, and Inductor's access
    # analysis does not take the prefetched weight for written (it would clone it on every call).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(KIT), str(ROOT)])
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "sm90_prefetch_check.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "access analysis: ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
