"""Download PMC-LLaMA's instruction data (axiong/pmc_llama_instructions) as SFT records.

    python dataset/prepare_pmc.py                       # -> dataset/pmc_llama_instructions.json
    python dataset/prepare_pmc.py --sample 1000         # also write the 1,000-example calibration file
    python dataset/prepare_pmc.py --from-local FILE     # same conversion from a local copy (JSON, JSONL, parquet)

Loads the ``train`` split through ``datasets`` and writes a JSON list of
``{instruction, input, output, source, sample_id}`` records, the fields
``uniattn.data`` reads. Records without an output, or without both instruction
and input, are dropped and counted. Output files are written atomically.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sample.py, when run as a script
from sample import prepare_main  # noqa: E402

HUB_NAME = "axiong/pmc_llama_instructions"
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "pmc_llama_instructions.json"
FIELDS = ("instruction", "input", "output", "source", "sample_id")


def convert(rows) -> tuple[list[dict], int]:
    """SFT records from the hub rows; returns (records, dropped)."""
    missing = {"instruction", "input", "output"} - set(rows.column_names)
    if missing:
        raise ValueError(f"the data has no {sorted(missing)} column(s) (columns: {rows.column_names}); "
                         f"is it {HUB_NAME}?")
    records, dropped = [], 0
    for row in rows:
        rec = {k: row.get(k) for k in FIELDS}
        for k in ("instruction", "input", "output"):
            rec[k] = (rec[k] or "").strip()
        if not rec["output"] or not (rec["instruction"] or rec["input"]):
            dropped += 1
            continue
        records.append(rec)
    return records, dropped


def main(argv=None) -> int:
    return prepare_main(argv, __doc__, HUB_NAME, DEFAULT_OUTPUT, convert,
                        empty="no usable record (every one lacks an output or an instruction/input)", kept="records")


if __name__ == "__main__":
    sys.exit(main())
