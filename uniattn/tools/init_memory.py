"""Peak memory of init calc at several calibration sizes: does it grow with ``--num_samples``?

    python -m uniattn.tools.init_memory --model_dir M --data F --superblock 4 14 30 \
        --samples 256 1000 --offload device disk [--max_length 320] [--device cuda] [--long_records]

``--long_records`` joins consecutive records of ``--data`` (cycling through it) into records long
enough to fill ``--max_length`` tokens, so that every sample has the full length (the issue's
"1,000 x 1,024 tokens"); the table's token column shows what was used.

Each (samples, offload) pair runs ``python -m uniattn.init_calc`` in a fresh process and reads that
process's peak resident memory (``ru_maxrss``) and, on a GPU, init calc's own peak of allocated
device memory. Prints a table (markdown) with the ratio to the smallest calibration size.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from ..init_file import read_metadata

# A fresh interpreter per measurement: ru_maxrss is a process's lifetime peak.
WRAPPER = """
import json, resource, runpy, sys
sys.argv = ["uniattn.init_calc", *sys.argv[1:]]
code = 0
try:
    runpy.run_module("uniattn.init_calc", run_name="__main__")
except SystemExit as e:
    code = e.code or 0
print("PEAK_RSS_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
sys.exit(code)
"""


def measure(args, samples: int, offload: str, out: Path) -> dict:
    cmd = [sys.executable, "-c", WRAPPER, "--model_dir", args.model_dir, "--data", args.data,
           "--superblock", *map(str, args.superblock), "--num_samples", str(samples), "--max_length",
           str(args.max_length), "--batch_size", str(args.batch_size), "--offload", offload, "--ridge", "1e-4",
           "--device", args.device, "--dtype", args.dtype, "--include_eval_items", "--output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"init calc failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    rss = int(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("PEAK_RSS_KIB")))
    meta = read_metadata(out)
    return {"samples": samples, "offload": offload, "peak_rss_mib": rss / 1024, "tokens": meta.get("tokens"),
            "peak_device_mib": (meta.get("peak_device_bytes") or 0) / 2**20, "seconds": meta.get("seconds")}


def long_records(data: Path, count: int, max_length: int, out: Path) -> Path:
    """``count`` records, each consecutive records of ``data`` joined to at least 6 characters per token
    of ``max_length`` (more than any tokenizer here needs), written to ``out``."""
    from ..data import load_records
    from ..io import write_json

    records = load_records(data)
    joined, i = [], 0
    for _ in range(count):
        parts = []
        while sum(len(x) for x in parts) < 6 * max_length:
            r = records[i % len(records)]
            parts.append("\n\n".join(x for x in (r.get("instruction", ""), r.get("input", ""), r["output"]) if x))
            i += 1
        joined.append({"instruction": "Continue.", "input": "", "output": "\n\n".join(parts)})
    return write_json(out, joined)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--superblock", nargs=3, type=int, required=True, metavar=("G", "B", "E"))
    p.add_argument("--samples", nargs="+", type=int, default=[256, 1000])
    p.add_argument("--offload", nargs="+", default=["device", "disk"], choices=("device", "cpu", "disk"))
    p.add_argument("--max_length", type=int, default=320)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--long_records", action="store_true", help="join records so each fills --max_length tokens")
    args = p.parse_args(argv)
    if not (Path(args.model_dir) / "config.json").is_file():
        print(f"error: --model_dir {args.model_dir} has no config.json", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.long_records:
            args.data = str(long_records(Path(args.data), max(args.samples), args.max_length, Path(tmp) / "long.json"))
        for offload in args.offload:
            for n in sorted(args.samples):
                rows.append(measure(args, n, offload, Path(tmp) / f"{offload}_{n}.safetensors"))
                print(f"measured {rows[-1]}", file=sys.stderr, flush=True)
    print("| offload | samples | tokens | peak RSS (MiB) | vs smallest | peak device (MiB) | vs smallest | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        first = next(x for x in rows if x["offload"] == r["offload"])
        device_ratio = f"{r['peak_device_mib'] / first['peak_device_mib']:.2f}x" if first["peak_device_mib"] else "-"
        print(f"| {r['offload']} | {r['samples']} | {r['tokens']} | {r['peak_rss_mib']:.0f} | "
              f"{r['peak_rss_mib'] / first['peak_rss_mib']:.2f}x | {r['peak_device_mib']:.0f} | {device_ratio} "
              f"| {r['seconds']} |")
    if args.json:
        from ..io import write_json

        write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
