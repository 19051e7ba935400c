"""Download Tulu-3's SFT mixture (allenai/tulu-3-sft-mixture) and keep its single-turn conversations.

    python dataset/prepare_tulu3.py                     # -> dataset/tulu3_sft_filtered.json
    python dataset/prepare_tulu3.py --sample 1000       # also write the 1,000-example calibration file
    python dataset/prepare_tulu3.py --from-local FILE   # same filter on a local copy (JSON, JSONL, parquet)

The seed's filter: a conversation is kept when it is exactly one user message
followed by one assistant message, both non-empty (no system prompt, no further
turns). Each becomes ``{id, instruction: "", input: user, output: assistant,
source}``; ``uniattn.data`` turns an input without instruction into the
Alpaca prompt's instruction, as for the shipped ``tulu3_sft_filtered_1000.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sample.py, when run as a script
from sample import prepare_main  # noqa: E402

HUB_NAME = "allenai/tulu-3-sft-mixture"
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "tulu3_sft_filtered.json"


def single_turn(messages) -> tuple[str, str] | None:
    """(user, assistant) when ``messages`` is one non-empty user turn and one non-empty answer."""
    if not isinstance(messages, list) or len(messages) != 2:
        return None
    (user, answer) = messages
    if user.get("role") != "user" or answer.get("role") != "assistant":
        return None
    prompt, reply = (user.get("content") or "").strip(), (answer.get("content") or "").strip()
    return (prompt, reply) if prompt and reply else None


def convert(rows) -> tuple[list[dict], int]:
    """Records of the single-turn conversations; returns (records, dropped)."""
    if "messages" not in rows.column_names:
        raise ValueError(f"the data has no `messages` column (columns: {rows.column_names}); is it {HUB_NAME}?")
    records, dropped = [], 0
    for row in rows:
        turn = single_turn(row["messages"])
        if turn is None:
            dropped += 1
            continue
        records.append({"id": row.get("id"), "instruction": "", "input": turn[0], "output": turn[1],
                        "source": row.get("source")})
    return records, dropped


def main(argv=None) -> int:
    return prepare_main(argv, __doc__, HUB_NAME, DEFAULT_OUTPUT, convert,
                        empty="no single-turn conversation with a non-empty user message and answer", kept="single-turn records")


if __name__ == "__main__":
    sys.exit(main())
