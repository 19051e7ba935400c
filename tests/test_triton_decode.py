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
