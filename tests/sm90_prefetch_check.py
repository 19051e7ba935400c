"""Run by tests/test_triton_decode.py in a process of its own, with the Triton kit on the path (no GPU,
no interpreter): the kernels that can prefetch the next weight into L2 (``triton_linear.L2_AHEAD``),
built for an H100/H200 (sm_90) by Triton's own compiler and ``ptxas``, and analysed as Inductor
analyses a ``triton_op``'s kernels.

* The product, merge and follower kernels compile for sm_90 with the prefetch on, and their PTX holds
  the ``cp.async.bulk.prefetch.L2`` (the merge's and the follower's asm is marked pure, and only the
  never-taken ``sink`` store keeps it from being dropped: this checks it is not).
* Inductor's access analysis (``identify_accessed_tensors``) of the merge and the follower's kernel takes
  the prefetched weight as neither read nor written, and the kernels' outputs as written. With an
  impure asm it fails and takes every argument as written: under ``torch.compile`` that would clone
  the V cache and the weight on every call. An impure variant is checked to show that failure.

Triton asks its driver for the target; with no GPU there is none, so a stand-in answering sm_90 is set.
Exits non-zero on a miss.
"""

import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
import triton.runtime
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from uniattn.modeling import triton_decode, triton_linear  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)


class _Sm90:
    def get_current_target(self):
        return SM90

    def get_current_device(self):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


triton.runtime.driver._active = triton.runtime.driver._default = _Sm90()


def ptx(kernel, pointers, ints, constexprs, **options):
    sig = {**{n: "*bf16" for n in pointers}, **{n: "i32" for n in ints}, **{k: "constexpr" for k in constexprs}}
    if "eps" in ints:
        sig["eps"] = "fp32"
    built = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs), target=SM90, options=options)
    return built.asm["ptx"]


@triton.jit
def _impure_merge(PART, OUT, NXT, chunk):
    triton_linear.to_l2(NXT, 0, chunk, triton_linear._LANES)
    d = tl.arange(0, 128)
    tl.store(OUT + d, tl.load(PART + d))


def accesses(kernel, kwargs):
    from torch._higher_order_ops import triton_kernel_wrap as wrap
    if hasattr(wrap, "identify_accessed_tensors"):
        rw = wrap.identify_accessed_tensors(kernel, kwargs, {}).read_writes
        return {d.name for d in rw.reads}, {d.name for d in rw.writes}
    return set(), set(wrap.identify_mutated_tensors(kernel, kwargs, {}))  # older torch: writes only


def main() -> int:
    prefetch = "cp.async.bulk.prefetch.L2.global"
    linear = dict(HAS_BIAS=False, NORM=False, GATED=False, RESIDUAL=False, EXTRA=False, PREFETCH=True, PDL=False,
                  EARLY=False, LATE_TRIGGER=False, AHEAD=True, BLOCK_M=16, BLOCK_N=32, BLOCK_K=256)
    merge = dict(D=128, BLOCK_S=8, BLOCK_T=256, WRITE_ROWS=True, AHEAD=True)
    apply = dict(G=4, BLOCK_G=16, D=128, BLOCK_N=128, MERGE=False, BLOCK_S=8, AHEAD=True)
    texts = {
        "product": ptx(triton_linear._linear_kernel, "X W B Y NW R E NXT".split(),
                       "M K sx sw sy sr se up_rows eps ahead_from ahead_chunk".split(), linear,
                       num_warps=4, num_stages=4),
        "merge": ptx(triton_decode._decode_merge_kernel, "PART ML TMAX OUT FACTOR NXT".split(),
                     "n_splits n_tiles ahead_chunk".split(), merge, num_warps=4),
        "follower": ptx(triton_decode._decode_apply_kernel, "ROWS FACTOR V O TICKETS OUT NXT".split(),
                        "sr_b sr_h sv_b sv_h sv_n kv_len kv_heads per_split n_tiles_total ahead_chunk".split(), apply,
                        num_warps=4, num_stages=2),
    }
    missing = [name for name, text in texts.items() if prefetch not in text]
    if missing:
        print(f"no L2 prefetch in the sm_90 PTX of: {missing}")
        return 1
    print("sm_90 build: ok")
    bf = lambda *s: torch.empty(*s, dtype=torch.bfloat16)  # noqa: E731
    f32 = lambda *s: torch.empty(*s, dtype=torch.float32)  # noqa: E731
    o_weight = bf(4096, 4096)
    reads, writes = accesses(triton_decode._decode_merge_kernel, dict(
        PART=f32(8, 32, 5, 128), ML=f32(8, 32, 5, 2), TMAX=f32(8, 32, 640), OUT=bf(8, 32, 128),
        FACTOR=f32(8, 32, 640), NXT=o_weight, n_splits=5, n_tiles=640, ahead_chunk=64, **merge))
    if "NXT" in writes or writes != {"OUT", "FACTOR"}:
        print(f"merge: Inductor takes {sorted(writes)} as written")
        return 1
    reads, writes = accesses(triton_decode._decode_apply_kernel, dict(
        ROWS=bf(8, 32, 16384), FACTOR=f32(8, 32, 128), V=bf(8, 8, 16384, 128), O=f32(8, 32, 5, 128),
        TICKETS=f32(1), OUT=bf(8, 32, 0), NXT=o_weight, sr_b=32 * 16384, sr_h=16384, sv_b=8 * 16384 * 128,
        sv_h=16384 * 128, sv_n=128, kv_len=16384, kv_heads=8, per_split=26, n_tiles_total=128, ahead_chunk=64,
        **apply))
    if "NXT" in writes or "V" in writes or writes != {"O"}:
        print(f"follower: Inductor takes {sorted(writes)} as written")
        return 1
    _, writes = accesses(_impure_merge, dict(PART=bf(128), OUT=bf(128), NXT=o_weight, chunk=64))
    if "NXT" not in writes:
        print(f"an impure prefetch was expected to defeat the analysis, but it took {sorted(writes)} as written")
        return 1
    print("access analysis: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
