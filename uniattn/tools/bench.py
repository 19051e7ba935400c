"""GPU benchmark: stock transformers against UniAttn, side by side, in one process.

    python -m uniattn.tools.bench --out docs/bench [--quick]

Models with the shapes of LLaMA-3.1-8B (layouts 4 16 33, 2 16 32, 4 0 32),
Mistral-7B and Gemma-2-9B, random bf16 weights (no checkpoint needed). The
UniAttn model shares every weight tensor with the stock one (only W_c is new),
so both fit on one GPU at once. Figures: KV-cache bytes; prefill latency;
decode ms/token (compiled with static cache first, then eager with static and
dynamic cache); generate() tokens/s; peak memory; the largest batch that fits at a
context. Every decode figure also comes as the UniAttn/stock ratio next to the
ideal ratio of a byte model (the bytes a step must read: weights but the input
embedding table, of which it reads one row per sequence, plus the K/V it attends
over, over the measured copy bandwidth) and as the fraction of that bandwidth
limit reached. Each compiled point is compiled afresh with static shapes. Its
stock column is plain stock transformers compiled in a process of its own
(``bench_stock``), the fastest stock configuration; stock + grouped and UniAttn
run here on the same kernels. Times are medians of repeated runs with CUDA
events after warm-up. Writes ``OUT.md`` (markdown tables with the command, card,
versions and measured bandwidth) and PNG plots.

The headline (``--part main``, LLaMA-3.1-8B shapes, layout 4 16 33) took 8.3 minutes on
one H200 (docs/BENCHMARK.md). ``--part others`` and ``--part extra`` append to the same JSON:
give them the ``--out`` of a run of this version, whose byte model leaves the embedding out.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache, MistralConfig, StaticCache

import uniattn
from uniattn.convert import uniattn_config_from
from uniattn.loading import soft_capped
from uniattn.io import write_text
from uniattn.modeling.cache import make_value_only
from uniattn.modeling.fused import fuse_projections, unfuse_projections
from uniattn.tools.kv_report import PRESETS, cache_bytes, has_window
from uniattn.modeling import triton_decode
from uniattn.modeling.kernels import DECODE_KERNELS, GROUPED_FLEX, GROUPED_SDPA, set_decode_kernel

# kv_report's shape presets, except that the benchmark's Mistral is v0.2 / v0.3, without the sliding window
SHAPES = {
    "llama3.1-8b": PRESETS["llama3.1-8b"],
    "mistral-7b": (MistralConfig, {**PRESETS["mistral-7b"][1], "sliding_window": None}),
    "gemma2-9b": PRESETS["gemma2-9b"],
}


# ------------------------------------------------------------------ timing helpers
def cuda_median_ms(fn, repeat=10, warmup=3, inner=1) -> float:
    """Median ms of ``fn`` over ``repeat`` timings of ``inner`` back-to-back calls each.

    ``inner > 1`` is the steady state of a decode loop: the host queues the next step while the GPU
    runs this one, so the host's per-call work (CUDA graph launch, guards) hides behind the GPU's
    unless it is the longer of the two. With ``inner = 1`` every call starts on an idle GPU and
    that host work adds to the time."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def parse_point(text: str) -> tuple[int, int]:
    """``"8x16384"`` -> ``(8, 16384)``: a decode point as BATCHxCONTEXT; ``ValueError`` otherwise."""
    batch, context = (int(v) for v in text.lower().split("x"))
    return batch, context


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), 4 GiB buffers."""
    src = torch.empty(2**31, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_median_ms(lambda: dst.copy_(src), repeat=20)
    nbytes = 2 * src.numel() * src.element_size()
    del src, dst
    return nbytes / (ms / 1e3)


def free():
    gc.collect()
    torch.cuda.empty_cache()


# ------------------------------------------------------------------ models
def random_stock(shape: str, attn: str = "sdpa"):
    """The stock transformers model of ``shape`` (through the Auto class), random bf16 weights from
    N(0, 0.02), on the GPU; ``attn="sdpa"`` gives the fastest exact stock kernel (``stock_kernels``)."""
    cls, kw = SHAPES[shape]
    config = cls(**kw, dtype=torch.bfloat16)
    config._attn_implementation = stock_kernels(config)["stock"] if attn == "sdpa" else attn
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            stock = AutoModelForCausalLM.from_config(config).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    for p in stock.parameters():
        p.data.normal_(0, 0.02)
    return stock


def build_pair(shape: str, layout, attn: str = "sdpa"):
    """A random bf16 stock model and a UniAttn model that shares its modules (only W_c is new)."""
    stock = random_stock(shape, attn)
    config = stock.config
    torch.set_default_dtype(torch.bfloat16)
    try:
        uconfig = uniattn_config_from(config, layout)
        uconfig._attn_implementation = attn
        with torch.device("meta"):
            uni = uniattn.UNIATTN_FAMILIES[config.model_type][1](uconfig).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    for name in ("embed_tokens", "norm", "rotary_emb"):
        setattr(uni.model, name, getattr(stock.model, name))
    uni.lm_head = stock.lm_head
    for sl, ul in zip(stock.model.layers, uni.model.layers):
        for name, module in sl.named_children():
            if name != "self_attn":
                setattr(ul, name, module)
        attn_u, attn_s = ul.self_attn, sl.self_attn
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if hasattr(attn_u, proj):
                setattr(attn_u, proj, getattr(attn_s, proj))
        if hasattr(attn_u, "compensation"):
            h = config.hidden_size
            attn_u.compensation = torch.nn.Linear(h, h, bias=False, device="cuda", dtype=torch.bfloat16)
            attn_u.compensation.weight.data.normal_(0, 0.01)
    leftover = [n for n, t in list(uni.named_parameters()) + list(uni.named_buffers()) if t.is_meta]
    assert not leftover, leftover
    return stock, uni


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def read_weight_bytes(model) -> int:
    """Weight bytes one decode step reads: all but the input embedding table (one row per sequence
    is read), unless the output head shares it."""
    emb = model.get_input_embeddings().weight
    if emb.data_ptr() == model.get_output_embeddings().weight.data_ptr():
        return weight_bytes(model)
    return weight_bytes(model) - emb.numel() * emb.element_size()


def filled_static_cache(model, batch: int, context: int, max_len: int, randomise: bool = True):
    """A static cache that already holds ``context`` tokens (random K/V), without running a prefill."""
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    if hasattr(model.config, "superblock_layout"):
        make_value_only(cache, model.config.superblock_layout)
    cfg = model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cache.early_initialization(batch_size=batch, num_heads=cfg.num_key_value_heads, head_dim=hd,
                               dtype=torch.bfloat16, device=torch.device("cuda"))
    for layer in cache.layers:
        if randomise:
            layer.values.normal_()
            if layer.keys.numel():
                layer.keys.normal_()
        layer.cumulative_length.fill_(min(context, layer.max_cache_len))
        if hasattr(layer, "cumulative_length_int"):
            layer.cumulative_length_int = context
    return cache


def filled_dynamic_cache(model, batch: int, context: int):
    cache = DynamicCache(config=model.config)
    if hasattr(model.config, "superblock_layout"):
        make_value_only(cache, model.config.superblock_layout)
    cfg = model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    for layer in cache.layers:
        n = min(context, layer.sliding_window - 1) if getattr(layer, "is_sliding", False) else context
        v = torch.randn(batch, cfg.num_key_value_heads, n, hd, dtype=torch.bfloat16, device="cuda")
        k = v[..., :0] if getattr(layer, "value_only", False) else torch.randn_like(v)
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length = context
    return cache


def decode_ms(model, batch, context, mode) -> float:
    ids = torch.randint(0, 1000, (batch, 1), device="cuda")
    pos = torch.full((batch, 1), context, device="cuda")
    if mode == "dynamic":
        cache = filled_dynamic_cache(model, batch, context)

        def step():
            model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)
            for layer in cache.layers:  # keep the context fixed across repeats
                if getattr(layer, "is_sliding", False):
                    layer.cumulative_length -= 1  # the layer already trimmed itself to the window
                else:
                    layer.keys, layer.values = layer.keys[..., :-1, :], layer.values[..., :-1, :]
        return cuda_median_ms(step)
    step = static_decode_step(model, batch, context, compiled=mode == "compiled")
    if mode == "compiled":
        ms = cuda_median_ms(step, repeat=10, warmup=5, inner=DECODE_STEPS)
        graphs = {k: v for k, v in torch._dynamo.utils.counters["inductor"].items() if "cudagraph" in k}
        if graphs:  # a skip here would mean the step ran outside CUDA graphs: the host timed, not the kernels
            print(f"cudagraph counters: {graphs}", flush=True)
        return ms
    return cuda_median_ms(step, repeat=10, warmup=3)


def static_decode_step(model, batch: int, context: int, compiled: bool):
    """One decode step over a static cache that holds ``context`` tokens, reset on every call so the
    context stays fixed. ``compiled``: under ``torch.compile(mode="reduce-overhead")`` (CUDA graphs),
    compiled afresh with static shapes, so no later point recompiles with dynamic ones."""
    ids = torch.randint(0, 1000, (batch, 1), device="cuda")
    pos = torch.full((batch, 1), context, device="cuda")
    cache = filled_static_cache(model, batch, context, context + 64)
    fn = model.forward
    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True, dynamic=False)

    # The reset is harness, not decode, so it is one launch for all the layers' counters: a fill_ per
    # layer put 32 eager launches ahead of every graph replay at LLaMA-3.1-8B's 32 layers.
    counters = [layer.cumulative_length for layer in cache.layers]
    starts = [torch.full_like(c, min(context, layer.max_cache_len)) for c, layer in zip(counters, cache.layers)]
    sliding = [layer for layer in cache.layers if hasattr(layer, "cumulative_length_int")]

    def step():
        torch._foreach_copy_(counters, starts)
        for layer in sliding:
            layer.cumulative_length_int = context
        return fn(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return step


def kv_bytes_per_token(model, context: int) -> float:
    """bf16 KV bytes per token at ``context`` tokens, counted on the model's own DynamicCache (kv_report's
    accounting): sliding layers keep their window only and a follower its leader's window, so with a window
    the figure depends on the context (the static cache reads its window buffer: one token more per layer)."""
    return cache_bytes(model.config, context) / context


DECODE_STEPS = 10  # compiled decode: steps timed back to back, as in a generation loop
KV_CONTEXTS = (4096, 16384, 32768)  # where a windowed model's KV per token is reported
HEADLINE = ((1, 4096), (8, 16384), (4, 32768))  # compiled decode points of --part main
EXTRA_COMPILED = ((16, 4096),)  # --part extra


def stock_process(shape: str, points) -> dict:
    """Plain compiled stock decode ms per (batch, context), from ``bench_stock`` in its own process."""
    cmd = [sys.executable, "-m", "uniattn.tools.bench_stock", "--shape", shape,
           "--points", *(f"{b}x{c}" for b, c in points)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    found = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            found[row["batch"], row["context"]] = row["ms"]
    if proc.returncode != 0:
        print(f"bench_stock exited {proc.returncode}; in-process stock instead where missing:\n"
              f"{proc.stderr[-2000:]}", flush=True)
    return found


# ------------------------------------------------------------------ main
def gpu_driver() -> str:
    """The NVIDIA driver version (one line: every GPU of a host runs the same driver)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        out = []
    return out[0] if out else "unknown"


def git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/bench")
    p.add_argument("--quick", action="store_true", help="fewer points")
    p.add_argument("--part", choices=("all", "main", "others", "extra"), default="all",
                   help="main: LLaMA-3.1-8B 4 16 33 in full; others: the other layouts and models; "
                        "extra: training step and the remaining compiled decode points (both append)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--decode_kernel", choices=DECODE_KERNELS, default="auto",
                   help="auto: UniAttn's Triton decode kernels; torch: its PyTorch reference path")
    p.add_argument("--no_fuse", action="store_true",
                   help="UniAttn and stock on its kernel without fused projections (uniattn.fuse_projections)")
    p.add_argument("--minutes", type=float, default=8.0, help="time budget; later points are skipped past it")
    args = p.parse_args(argv)
    torch._dynamo.config.cache_size_limit = 64  # one graph per (kernel, batch, context)
    torch._dynamo.config.accumulated_cache_size_limit = 512
    if not torch.cuda.is_available():
        print("error: the benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {"env": {
        "command": "python -m uniattn.tools.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
        "driver": gpu_driver(),
        "commit": git_rev(),
    }, "rows": []}
    bw = copy_bandwidth()
    results["env"]["copy_bandwidth_TBps"] = round(bw / 1e12, 3)
    set_decode_kernel(args.decode_kernel)
    global FUSE
    FUSE = not args.no_fuse
    results["env"]["fused_projections"] = FUSE
    triton = triton_decode.triton
    results["env"]["triton"] = triton.__version__ if triton is not None else "none"
    results["env"]["decode_kernel"] = ("Triton split-context kernels" if args.decode_kernel == "auto" and triton is not None
                                       else "PyTorch grouped rows")
    print(json.dumps(results["env"]), flush=True)
    main_run = ("llama3.1-8b", (4, 16, 33))
    others = [("llama3.1-8b", (2, 16, 32)), ("llama3.1-8b", (4, 0, 32)), ("mistral-7b", (4, 16, 33)),
              ("gemma2-9b", (4, 21, 43))]
    if out.with_suffix(".json").exists() and args.part in ("others", "extra"):  # append to earlier parts
        earlier = json.loads(out.with_suffix(".json").read_text())
        results["rows"] = earlier["rows"]
        earlier_env = earlier["env"]
        results["env"]["earlier_parts"] = earlier_env.pop("earlier_parts", []) + [earlier_env]
    if args.part == "extra":
        return extra(out, results, bw)
    runs = {"all": [main_run, *others], "main": [main_run], "others": others}[args.part]
    deadline = time.time() + args.minutes * 60
    for shape, layout in runs:
        if time.time() > deadline:
            print(f"deadline reached: {shape} {layout} not measured", flush=True)
            results["rows"].append(not_measured(f"{shape} {' '.join(map(str, layout))}", ["every row"]))
            continue
        is_main = (shape, layout) == main_run
        compile_ = not args.no_compile and is_main
        plain = stock_process(shape, HEADLINE) if compile_ else {}  # before this process takes the GPU's memory
        stock, uni = build_pair(shape, layout)
        rows = measure(shape, layout, stock, uni, bw, full=is_main and not args.quick,
                       compile_=compile_, deadline=deadline, plain=plain)
        results["rows"].extend(rows)
        del stock, uni
        free()
        write(out, results)
    write(out, results)
    print(f"wrote {out}.md and {out}.json")
    return 0


VARIANTS = ("stock", "stock_grouped", "uniattn")  # fastest exact stock kernel, stock on UniAttn's kernel, UniAttn


def stock_kernels(config) -> dict:
    """The stock model's kernels: the fastest exact one, and UniAttn's.

    A soft-capped model (Gemma-2) has no exact fast stock kernel in transformers 5.17: SDPA drops the
    cap, eager builds every T x T matrix, and flex_attention under a static cache evaluates its mask
    after the cache has advanced its position counter (see kernels.grouped_flex_mask). Both columns
    then run UniAttn's flex kernel (flex prefill, explicit decode rows), which is exact.
    """
    if soft_capped(config):
        return {"stock": GROUPED_FLEX, "stock_grouped": GROUPED_FLEX}
    return {"stock": "sdpa", "stock_grouped": GROUPED_SDPA}


FUSE = True  # UniAttn and stock on its kernel serve with fused projections (--no_fuse: without)


def run_variants(stock, uni, fn, names=VARIANTS):
    """``fn(model)`` for the variants in ``names``; the stock model switches kernels in between, and
    the variants on UniAttn's serving path get its fused projections (``fuse_projections``), which
    the plain stock variant never has."""
    res = {}
    kernels = stock_kernels(stock.config)
    try:
        for name in names:
            model = uni if name == "uniattn" else stock
            if model is stock:
                stock.set_attn_implementation(kernels[name])
            if FUSE and name != "stock":
                fuse_projections(model)
            res[name] = fn(model)
            free()
    finally:  # the two models share their modules: leave both plain
        unfuse_projections(stock)
        unfuse_projections(uni)
        stock.set_attn_implementation(kernels["stock"])
        free()
    return res


def decode_row(tag, mode, batch, ctx, res, bytes_stock, bytes_uni, bw) -> dict:
    """One decode result with its ratios and its place against the byte model (bytes read per step / bandwidth)."""
    return {
        "what": "decode_ms", "model": tag, "mode": mode, "batch": batch, "context": ctx, **res,
        "ratio": res["uniattn"] / res["stock"], "method_ratio": res["uniattn"] / res["stock_grouped"],
        "ideal_ratio": bytes_uni / bytes_stock,
        "stock_bw_frac": bytes_stock / bw / (res["stock"] / 1e3),
        "stock_grouped_bw_frac": bytes_stock / bw / (res["stock_grouped"] / 1e3),
        "uniattn_bw_frac": bytes_uni / bw / (res["uniattn"] / 1e3),
        "limit_ms_stock": bytes_stock / bw * 1e3, "limit_ms_uniattn": bytes_uni / bw * 1e3,
    }


def compiled_decode(stock, uni, batch, ctx, plain: dict) -> dict:
    """Compiled decode ms of the three variants; stock from ``plain`` (its own process) where measured."""
    if (batch, ctx) in plain:
        res = run_variants(stock, uni, lambda m: decode_ms(m, batch, ctx, "compiled"), names=VARIANTS[1:])
        return {"stock": plain[batch, ctx], **res, "stock_source": "plain stock, own process"}
    res = run_variants(stock, uni, lambda m: decode_ms(m, batch, ctx, "compiled"))
    return {**res, "stock_source": "stock model, this process"}


def not_measured(tag: str, items: list) -> dict:
    """A row naming what the ``--minutes`` budget left out, so that the report says so."""
    return {"what": "not_measured", "model": tag, "items": items}


def measure(shape, layout, stock, uni, bw, full, compile_, deadline, plain=None):
    rows = []
    tag = f"{shape} {' '.join(map(str, layout))}"
    w_stock, w_uni = weight_bytes(stock), weight_bytes(uni)
    r_stock, r_uni = read_weight_bytes(stock), read_weight_bytes(uni)
    for ctx in KV_CONTEXTS if has_window(stock.config) else KV_CONTEXTS[:1]:  # no window: any context alike
        rows.append({"what": "kv_bytes_per_token", "model": tag, "context": ctx,
                     "stock": kv_bytes_per_token(stock, ctx), "uniattn": kv_bytes_per_token(uni, ctx)})
    rows.append({"what": "weight_bytes", "model": tag, "stock": w_stock, "uniattn": w_uni})
    for n in ((1024, 4096, 16384) if full else (4096,)):
        ids = torch.randint(0, 1000, (1, n), device="cuda")
        peaks = {}

        def prefill(model):
            torch.cuda.reset_peak_memory_stats()
            with torch.no_grad():
                ms = cuda_median_ms(lambda: model(ids, use_cache=True, logits_to_keep=1), repeat=5, warmup=2)
            peaks[id(model), model.config._attn_implementation] = torch.cuda.max_memory_allocated() / 2**30
            return ms

        res = run_variants(stock, uni, prefill)
        res["stock_peak_GiB"] = peaks[id(stock), "sdpa"]
        res["uniattn_peak_GiB"] = peaks[id(uni), uni.config._attn_implementation]
        rows.append({"what": "prefill_ms", "model": tag, "batch": 1, "context": n, **res})
        print(rows[-1], flush=True)
    reference = [(1, 4096), (16, 4096), (8, 16384), (4, 32768)]
    plan = [("compiled", p) for p in HEADLINE] if compile_ else []  # the headline first, each compiled anew
    plan += [("static", p) for p in ([(1, 4096), (8, 4096), (16, 4096), (64, 4096), (1, 16384), (8, 16384), (4, 32768)]
                                     if full else [(16, 4096), (8, 16384)])]
    if full:
        plan += [("dynamic", p) for p in reference[:2]]
    skipped = []
    for i, (mode, (batch, ctx)) in enumerate(plan):
        if time.time() > deadline:
            print("deadline reached: skipping the remaining decode points", flush=True)
            skipped = [f"decode {m} batch {b} / {c}" for m, (b, c) in plan[i:]]
            break
        ideal_s = r_stock + batch * ctx * kv_bytes_per_token(stock, ctx)
        ideal_u = r_uni + batch * ctx * kv_bytes_per_token(uni, ctx)
        try:
            with torch.no_grad():
                if mode == "compiled":
                    res = compiled_decode(stock, uni, batch, ctx, plain or {})
                else:
                    res = run_variants(stock, uni, lambda m: decode_ms(m, batch, ctx, mode))
        except torch.cuda.OutOfMemoryError:
            free()
            rows.append({"what": "decode_ms", "model": tag, "mode": mode, "batch": batch, "context": ctx, "oom": True})
            continue
        rows.append(decode_row(tag, mode, batch, ctx, res, ideal_s, ideal_u, bw))
        print(rows[-1], flush=True)
    late = time.time() >= deadline  # one reading, so that the rest is either measured or recorded as not
    if full and late:
        skipped += ["generate()", "largest batch"]
    if skipped:
        rows.append(not_measured(tag, skipped))
    if full and not late:
        ids = torch.randint(0, 1000, (8, 1024), device="cuda")
        mask = torch.ones_like(ids)

        def gen(model):
            torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.no_grad():
                model.generate(ids, attention_mask=mask, max_new_tokens=128, min_new_tokens=128, do_sample=False,
                               pad_token_id=0)
            torch.cuda.synchronize()
            return 8 * 128 / (time.perf_counter() - t)

        rows.append({"what": "generate_tokens_per_s", "model": tag, "batch": 8, "prompt": 1024, "new": 128,
                     **run_variants(stock, uni, gen)})
        print(rows[-1], flush=True)
        res = {}
        for name, m in (("stock", stock), ("uniattn", uni)):
            res[name], settled = largest_batch(m, 16384, deadline)
            if not settled:  # the bisection ran out of --minutes: a batch that fits, not the largest
                res[f"{name}_lower_bound"] = True
        rows.append({"what": "largest_batch", "model": tag, "context": 16384, **res})
        print(rows[-1], flush=True)
    return rows


def train_step_ms(model, tokens: int) -> float:
    """Forward + backward of one sequence (gradient checkpointing on, as in the training presets for 8B)."""
    ids = torch.randint(0, 1000, (1, tokens), device="cuda")
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def step():
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids, use_cache=False).loss.backward()
    try:
        return cuda_median_ms(step, repeat=5, warmup=2)
    finally:
        model.zero_grad(set_to_none=True)
        model.gradient_checkpointing_disable()
        model.disable_input_require_grads()  # its embedding hook would break a later compiled decode
        model.eval()


def extra(out: Path, results: dict, bw: float) -> int:
    """A training step and the compiled decode points the main part leaves out (LLaMA-3.1-8B, 4 16 33)."""
    plain = stock_process("llama3.1-8b", EXTRA_COMPILED)
    stock, uni = build_pair("llama3.1-8b", (4, 16, 33))
    tag = "llama3.1-8b 4 16 33"
    w_s, w_u = read_weight_bytes(stock), read_weight_bytes(uni)
    for batch, ctx in EXTRA_COMPILED:
        with torch.no_grad():
            res = compiled_decode(stock, uni, batch, ctx, plain)
        ideal_s = w_s + batch * ctx * kv_bytes_per_token(stock, ctx)
        ideal_u = w_u + batch * ctx * kv_bytes_per_token(uni, ctx)
        results["rows"].append(decode_row(tag, "compiled", batch, ctx, res, ideal_s, ideal_u, bw))
        print(results["rows"][-1], flush=True)
        write(out, results)
    for n in (2048, 4096):  # after the compiled points: training leaves hooks on shared modules
        res = run_variants(stock, uni, lambda m: train_step_ms(m, n))
        results["rows"].append({"what": "train_step_ms", "model": tag, "batch": 1, "context": n, **res})
        print(results["rows"][-1], flush=True)
    write(out, results)
    return 0


def largest_batch(model, context, deadline) -> tuple[int, bool]:
    """Largest batch whose static cache plus one decode step fits, by bisection from the byte estimate,
    and whether the bisection settled before ``deadline`` (if not, the batch is only one that fits)."""
    pos = lambda b: torch.full((b, 1), context, device="cuda")

    def fits(b):
        cache = None
        try:
            cache = filled_static_cache(model, b, context, context + 8, randomise=False)
            with torch.no_grad():
                model(input_ids=torch.zeros(b, 1, dtype=torch.long, device="cuda"), position_ids=pos(b),
                      past_key_values=cache, use_cache=True, logits_to_keep=1)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            del cache
            free()

    free_bytes = torch.cuda.mem_get_info()[0]
    estimate = max(1, int(free_bytes / (context * kv_bytes_per_token(model, context))))
    lo, hi = max(1, estimate // 2), estimate + estimate // 4 + 1
    if not fits(lo):
        return 0, True
    while hi - lo > 1 and time.time() < deadline:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, hi - lo <= 1


def write(out: Path, results: dict) -> None:
    write_text(out.with_suffix(".json"), json.dumps(results, indent=1))
    from .bench_report import render

    write_text(out.with_suffix(".md"), render(results, out))


if __name__ == "__main__":
    sys.exit(main())
