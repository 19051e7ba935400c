"""Run by tests/test_triton_decode.py in a process of its own, under ``TRITON_INTERPRET=1`` with
``UNIATTN_INTERPRET_OPS=1``: the kernels' entry points are then the opaque custom ops the GPU uses,
with their fake (shape) functions and declared mutations, running Triton's interpreter underneath.

Compiles (``fullgraph=True``, the ``aot_eager`` backend: no GPU, no Inductor codegen) a static-cache
decode step of a tiny float16 UniAttn LLaMA with fused projections, where the fused decode layer
serves, and checks it against the eager step: the logits, every layer's projection kernel launched
at run time, the cache counters advanced once, the tickets left at zero. Once with the layer's
defaults but the splits merged in the attention kernels, and once with every fusion of
``decode_layer.FUSE`` on. (The default's separate merge goes through ``torch.library.triton_op``,
which needs a GPU to trace: ``decode_check``'s compiled row covers it.) Exits non-zero on a miss.
"""

import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, StaticCache

sys.path.insert(0, str(Path(__file__).parent))

import uniattn  # noqa: E402
from uniattn.convert import uniattn_config_from  # noqa: E402
from uniattn.modeling import decode_layer, triton_linear, triton_qkv  # noqa: E402
from uniattn.modeling.fused import fuse_projections  # noqa: E402
from uniattn.tools.decode_check import rel  # noqa: E402

assert triton_linear.INTERPRET and triton_linear.OPAQUE, "needs TRITON_INTERPRET=1 and UNIATTN_INTERPRET_OPS=1"


class Counted:
    """A Triton kernel that counts its launches (``kernel[grid](...)``)."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def main() -> None:
    cfg = LlamaConfig(vocab_size=101, hidden_size=256, intermediate_size=512, num_hidden_layers=5,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = uniattn.UNIATTN_FAMILIES["llama"][1](uniattn_config_from(cfg, (2, 1, 6)))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model = model.half().eval()
    ids = torch.randint(3, 101, (3, 10))
    cache = StaticCache(config=model.config, max_cache_len=16)
    kernel = triton_qkv._project_kernel
    saved = dict(decode_layer.FUSE)
    with torch.no_grad():
        model(ids[:, :9], past_key_values=cache, use_cache=True)

        def step():
            for layer in cache.layers:  # decode the same position again
                layer.cumulative_length.fill_(9)
            return model(input_ids=ids[:, 9:], position_ids=torch.full((3, 1), 9), past_key_values=cache,
                         use_cache=True).logits

        ref = step().clone()
        fuse_projections(model)
        try:
            for fuse in ({"merge": True}, {"norm": True, "gated": True, "residual": True, "merge": True}):
                decode_layer.FUSE.update(saved, **fuse)
                torch._dynamo.reset()
                counted = triton_qkv._project_kernel = Counted(kernel)
                compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
                errs = [rel(compiled(), ref) for _ in range(2)]
                counters = {int(layer.cumulative_length) for layer in cache.layers}
                tickets = [n for n, t in model.named_buffers() if "ticket" in n and t.any()]
                assert max(errs) < 5e-3, f"FUSE {fuse}: compiled vs eager {errs}"
                assert counted.launches == 2 * 5, f"FUSE {fuse}: {counted.launches} projections in 2 steps of 5 layers"
                assert counters == {10} and not tickets, f"FUSE {fuse}: counters {counters}, tickets left {tickets}"
        finally:
            triton_qkv._project_kernel = kernel
            decode_layer.FUSE.update(saved)
    print("compiled: ok", flush=True)


if __name__ == "__main__":
    main()
