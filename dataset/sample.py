"""Draw the N-example calibration / quick-run file from a prepared SFT data set.

    python dataset/sample.py dataset/pmc_llama_instructions.json dataset/pmc_llama_instructions_1000.json -n 1000

A seeded random sample without replacement, kept in the source order so the
file diffs cleanly. Reads a JSON list or JSONL, writes a JSON list atomically
(through ``uniattn.io``: a temporary file in the same folder, then a rename).
The repo already ships the seed's 1,000-example samples; this rebuilds them
from a full download.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
from pathlib import Path


def _uniattn_io():
    # The project's atomic writer. uniattn/io.py needs only the standard library; loading it by file, not as
    # `uniattn.io` (whose package imports transformers), keeps this script running on a bare python.
    path = Path(__file__).resolve().parent.parent / "uniattn" / "io.py"
    spec = importlib.util.spec_from_file_location("_uniattn_io", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


write_text = _uniattn_io().write_text


def read_records(path) -> list[dict]:
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def write_json(records: list[dict], path) -> Path:
    """Write ``records`` as a JSON list; readers never see a half-written file."""
    return write_text(path, json.dumps(records, ensure_ascii=False, indent=1) + "\n")


def sample_records(records: list[dict], n: int, seed: int = 0) -> list[dict]:
    if n < 1:
        raise ValueError(f"sample size {n} must be at least 1")
    if n > len(records):
        raise ValueError(f"cannot sample {n} records from {len(records)}; pass -n {len(records)} or less")
    keep = sorted(random.Random(seed).sample(range(len(records)), n))
    return [records[i] for i in keep]


def sample_path(output, n: int) -> Path:
    """``dataset/x.json`` -> ``dataset/x_1000.json``, the shipped files' naming."""
    output = Path(output)
    return output.with_name(f"{output.stem}_{n}{output.suffix}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="prepared records (JSON list or JSONL)")
    p.add_argument("output", nargs="?", help="where to write the sample (default: SOURCE_<n>.json)")
    p.add_argument("-n", "--num", type=int, default=1000, help="examples to draw (default 1000, as shipped)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        records = read_records(args.source)
        out = write_json(sample_records(records, args.num, args.seed), args.output or sample_path(args.source, args.num))
    except (OSError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.num} of {len(records)} records to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ---------------------------------------------------------------- shared by prepare_pmc.py / prepare_tulu3.py
def load_rows(hub_name: str, from_local: str | None):
    """The hub data set's ``train`` split through ``datasets``, or the same from a local file."""
    import datasets

    if from_local is None:
        return datasets.load_dataset(hub_name, split="train")
    path = Path(from_local)
    if not path.is_file():
        raise FileNotFoundError(f"--from-local {path} does not exist; pass a JSON, JSONL or parquet file")
    builder = "parquet" if path.suffix == ".parquet" else "json"
    return datasets.load_dataset(builder, data_files=str(path), split="train")


def prepare_main(argv, doc: str, hub_name: str, default_output: Path, convert, empty: str, kept: str) -> int:
    """The command line of a prepare script: download or read, convert, write, optionally sample."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=str(default_output), help="JSON file to write")
    p.add_argument("--from-local", dest="from_local", help="convert this local file instead of downloading")
    p.add_argument("--sample", type=int, default=0, help="also write an N-example sample next to --output")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample")
    args = p.parse_args(argv)
    try:
        records, dropped = convert(load_rows(hub_name, args.from_local))
        if not records:
            raise ValueError(empty)
        out = write_json(records, args.output)
        print(f"wrote {len(records)} {kept} to {out} ({dropped} dropped)")
        if args.sample:
            path = write_json(sample_records(records, args.sample, args.seed), sample_path(args.output, args.sample))
            print(f"wrote a {args.sample}-example sample to {path}")
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
