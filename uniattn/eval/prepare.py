"""Rebuild the evaluation tasks in ``uniattn/eval/tasks/`` from the real sources.

Nothing is downloaded at evaluation time: this script turns local copies of
the sources into small JSONL files under ``tasks/data/`` (one lm-eval document
per line, committed to the repository), a ``MANIFEST.json`` that records where
each file came from (source file and its SHA-256, item counts, chance and
majority levels), and the per-task and group YAMLs that point at them. Only
``tasks/_template_yaml`` (prompt fields, metrics) is written by hand.

Medical tasks, from PMC-LLaMA instruction records (Alpaca-style JSON list or
JSONL of ``{instruction, input, output}``), held-out side of ``split.py`` only:
  uniattn_pubmedqa   ``###Question/###Context`` items answered yes/no/maybe (3 choices)
  uniattn_medmcqa    ``###Question/###Options A-D`` items (MedMCQA and MedQA rows), 4 choices

General tasks, from the ``bigbench==1.0.0`` sdist, read straight out of the
tar.gz (the package is never installed): ``social_iqa``, ``strategyqa``,
``winowhy``, ``epistemic_reasoning``, each a sample of its ``target_scores``
examples, rendered the way BIG-bench renders a zero-shot JSON task.

Every document has ``query`` (the prompt, ending without a space), ``choices``
(each with its leading space, since the task YAMLs use an empty
``target_delimiter``) and ``gold`` (the index of the one correct choice).
Items whose correct answer is missing or not unique, or whose choices repeat,
are dropped. Each task keeps at most ``--max-items`` documents, chosen and
ordered by a hash of the document, so ``--limit N`` in lm-eval takes a
deterministic, unbiased-looking sample and reruns give identical files.

    python -m uniattn.eval.prepare --pmc pmc_llama_instructions.json \\
        --bigbench bigbench-1.0.0.tar.gz [--out uniattn/eval/tasks] [--max-items 300]

Either source may be omitted to rebuild only the other half. ``docs/eval.md``
says how to obtain both.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import logging
import random
import re
import sys
import tarfile
from pathlib import Path
from typing import Iterable

from uniattn.eval import TASKS_DIR
from uniattn.eval.split import EVAL_FRACTION, eval_score, is_eval_record
from uniattn.io import write_text

logger = logging.getLogger(__name__)

DEFAULT_MAX_ITEMS = 300
BIGBENCH_TASKS = ("social_iqa", "strategyqa", "winowhy", "epistemic_reasoning")
PMC_TASKS = ("pubmedqa", "medmcqa")

# BIG-bench's own defaults for JSON tasks (bigbench/api/json_task.py), used when
# a task.json does not override them.
_BB_INPUT_PREFIX = "\nQ: "
_BB_OUTPUT_PREFIX = "\nA: "
_BB_CHOICE_PREFIX = "\n  choice: "

_PUBMEDQA = re.compile(r"^\s*###\s*Question:(?P<question>.*?)\n\s*###\s*Context:(?P<context>.*)$", re.S)
_MCQ = re.compile(
    r"^\s*###\s*Question:(?P<question>.*?)\n\s*###\s*Options:\s*\n"
    r"A\.(?P<A>[^\n]*)\nB\.(?P<B>[^\n]*)\nC\.(?P<C>[^\n]*)\nD\.(?P<D>[^\n]*)\s*$",
    re.S,
)
_ANSWER = re.compile(r"###\s*Answer:\s*(?P<answer>[^\n]*)\s*$")
_OPTION_ANSWER = re.compile(r"^OPTION ([ABCD]) IS CORRECT\.?$", re.I)


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()


def _clean(text: str) -> str:
    return " ".join(text.split())


def _final_answer(output: str) -> str | None:
    match = _ANSWER.search(output.strip())
    return match.group("answer").strip() if match else None


# --------------------------------------------------------------------------- PMC-LLaMA


def load_pmc(path: Path) -> list[dict]:
    """Read PMC-LLaMA records from a JSON list or a JSONL file."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        records = json.loads(text)
    else:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    for i, record in enumerate(records):
        if not isinstance(record, dict) or "output" not in record or "input" not in record:
            raise ValueError(
                f"{path}: record {i} is not an Alpaca-style dict with instruction/input/output: {str(record)[:200]!r}; "
                "pass the PMC-LLaMA instruction data (axiong/pmc_llama_instructions) as a JSON list or JSONL"
            )
    return records


def pubmedqa_doc(record: dict) -> dict | None:
    """A yes/no/maybe document from a PubMedQA-shaped record, or None if it is not one."""
    match = _PUBMEDQA.match(record.get("input") or "")
    answer = (_final_answer(record.get("output") or "") or "").lower().rstrip(".")
    if not match or answer not in ("yes", "no", "maybe"):
        return None
    question, context = _clean(match.group("question")), _clean(match.group("context"))
    if not question or not context:
        return None
    # The prompt of lm-eval's own pubmedqa task, so scores are comparable in kind.
    return {
        "query": f"Abstract: {context}\nQuestion: {question}\nAnswer:",
        "choices": [" yes", " no", " maybe"],
        "gold": ["yes", "no", "maybe"].index(answer),
    }


def medmcqa_doc(record: dict) -> dict | None:
    """A four-option A-D document from a MedMCQA/MedQA-shaped record, or None if it is not one."""
    match = _MCQ.match(record.get("input") or "")
    answer = _OPTION_ANSWER.match(_final_answer(record.get("output") or "") or "")
    if not match or not answer:
        return None
    question = _clean(match.group("question"))
    options = [_clean(match.group(letter)) for letter in "ABCD"]
    # Two identical option texts would make two letters correct.
    if not question or any(not o for o in options) or len({o.lower() for o in options}) < 4:
        return None
    listed = "\n".join(f"{letter}. {option}" for letter, option in zip("ABCD", options))
    # The prompt of lm-eval's own medmcqa task (letters scored, options listed).
    return {
        "query": f"Question: {question}\nChoices:\n{listed}\nAnswer:",
        "choices": [" A", " B", " C", " D"],
        "gold": "ABCD".index(answer.group(1).upper()),
    }


def build_pmc_tasks(records: Iterable[dict], max_items: int) -> dict[str, list[dict]]:
    """Held-out PMC records turned into the two medical tasks."""
    builders = {"pubmedqa": pubmedqa_doc, "medmcqa": medmcqa_doc}
    tasks: dict[str, list[tuple[float, dict]]] = {name: [] for name in builders}
    seen: set[str] = set()
    for record in records:
        if not is_eval_record(record):
            continue
        for name, build in builders.items():
            doc = build(record)
            if doc is None:
                continue
            key = _digest(name, doc["query"])
            if key in seen:
                continue
            seen.add(key)
            tasks[name].append(
                (
                    eval_score(record),
                    {
                        "id": f"{name}-{key[:12]}",
                        "source": record.get("source", ""),
                        **doc,
                        # Kept so tests can re-check the split on exactly what was trained on.
                        "pmc_instruction": record.get("instruction", ""),
                        "pmc_input": record.get("input", ""),
                    },
                )
            )
    return {name: [doc for _, doc in sorted(items, key=lambda x: x[0])][:max_items] for name, items in tasks.items()}


# --------------------------------------------------------------------------- BIG-bench


def read_bigbench_tasks(sdist: Path, names: Iterable[str]) -> dict[str, dict]:
    """The ``task.json`` of each named task, read from the bigbench sdist without unpacking it."""
    names = list(names)
    wanted = {f"bigbench/benchmark_tasks/{name}/task.json": name for name in names}
    found: dict[str, dict] = {}
    try:
        archive = tarfile.open(sdist, "r:gz")
    except (OSError, tarfile.TarError) as err:
        raise ValueError(
            f"{sdist} is not a readable .tar.gz ({err}); pass the bigbench-1.0.0.tar.gz sdist (see docs/eval.md)"
        ) from err
    with archive:
        for member in archive:
            # Members are "bigbench-1.0.0/bigbench/benchmark_tasks/<task>/task.json".
            tail = member.name.split("/", 1)[-1]
            if tail in wanted and member.isfile():
                found[wanted[tail]] = json.load(archive.extractfile(member))
    missing = [name for name in names if name not in found]
    if missing:
        raise ValueError(
            f"{sdist} has no bigbench/benchmark_tasks/<task>/task.json for {missing}; "
            f"check the task names (they are directory names under bigbench/benchmark_tasks/)"
        )
    return found


def bigbench_docs(name: str, task: dict) -> list[dict]:
    """Zero-shot multiple-choice documents from one BIG-bench JSON task, rendered as BIG-bench does."""
    task_prefix = str(task.get("task_prefix", ""))
    input_prefix = task.get("example_input_prefix", _BB_INPUT_PREFIX)
    output_prefix = task.get("example_output_prefix", _BB_OUTPUT_PREFIX)
    choice_prefix = task.get("choice_prefix", _BB_CHOICE_PREFIX)
    append_choices = task.get("append_choices_to_input", True)
    docs, seen = [], set()
    for example in task.get("examples", []):
        scores = example.get("target_scores")
        if not isinstance(scores, dict) or len(scores) < 2:
            continue
        correct = [choice for choice, score in scores.items() if score == 1]
        wrong = [choice for choice, score in scores.items() if score == 0]
        choices = [_clean(c) for c in scores]
        if len(correct) != 1 or len(correct) + len(wrong) != len(scores) or len(set(choices)) != len(choices):
            continue
        if any(not c for c in choices):
            continue
        order = sorted(scores)
        if append_choices:
            # Listed choices are shuffled per item (seeded by the item), as BIG-bench
            # does, so the answer's position in the prompt carries no signal.
            random.Random(_digest(name, example["input"])).shuffle(order)
        text = example["input"].strip()
        if append_choices:
            text = text + choice_prefix + choice_prefix.join(order)
        # BIG-bench's output prefix ends in a space ("\nA: "); the space moves to the
        # choices so the scored continuation is " Yes", as the tokenizer saw it in training.
        query = (task_prefix + input_prefix + text + output_prefix).lstrip("\n").rstrip(" ")
        if query in seen:
            continue
        seen.add(query)
        docs.append(
            {
                "id": f"{name}-{_digest(name, query)[:12]}",
                "source": f"bigbench/{name}",
                "query": query,
                "choices": [" " + _clean(c) for c in order],
                "gold": order.index(correct[0]),
                "canary": task.get("canary", ""),
            }
        )
    return docs


def build_bigbench_tasks(sdist: Path, names: Iterable[str], max_items: int) -> dict[str, list[dict]]:
    tasks = read_bigbench_tasks(sdist, names)
    out = {}
    for name, task in tasks.items():
        docs = sorted(bigbench_docs(name, task), key=lambda d: d["id"])
        if not docs:
            raise ValueError(f"BIG-bench task {name} has no usable target_scores examples; choose another task")
        out[name] = docs[:max_items]
    return out


# --------------------------------------------------------------------------- output


def task_stats(docs: list[dict]) -> dict:
    """Item count, chance level (uniform guess) and, where every item offers the same
    choices, the majority level (always answering the most common gold answer)."""
    stats = {"items": len(docs), "chance": round(sum(1 / len(d["choices"]) for d in docs) / len(docs), 4)}
    if len({tuple(d["choices"]) for d in docs}) == 1:
        answer, count = collections.Counter(d["choices"][d["gold"]].strip() for d in docs).most_common(1)[0]
        stats.update(majority=round(count / len(docs), 4), majority_answer=answer)
    else:
        stats.update(majority=None, majority_answer=None)
    return stats


def validate_docs(name: str, docs: list[dict]) -> None:
    """Every document must have one correct, distinct choice; refuse to write anything else."""
    for doc in docs:
        choices = doc["choices"]
        if not isinstance(doc["gold"], int) or not 0 <= doc["gold"] < len(choices) or len(set(choices)) != len(choices):
            raise AssertionError(f"{name}: document {doc['id']} does not have exactly one correct choice: {doc!r}")
        if doc["query"].endswith(" ") or not all(c.startswith(" ") for c in choices):
            raise AssertionError(f"{name}: document {doc['id']} breaks the query/choice spacing rule")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _yaml_list(items: Iterable[str]) -> str:
    return "".join(f"  - {item}\n" for item in items)


def write_task_yamls(tasks_dir: Path, manifest: dict) -> None:
    """One YAML per task (the shared ``_template_yaml`` plus its data file) and the three group YAMLs."""
    groups: dict[str, list[str]] = {"medical": [], "general": []}
    for name, entry in manifest["tasks"].items():
        groups[entry["group"]].append(entry["task"])
        write_text(
            tasks_dir / f"{entry['task']}.yaml",
            f"# Generated by `python -m uniattn.eval.prepare`; {entry['items']} items from {entry['source']['path']}.\n"
            "include: _template_yaml\n"
            f"task: {entry['task']}\n"
            "dataset_kwargs:\n"
            "  data_files:\n"
            f"    test: data/{entry['file']}\n",
        )
    aggregate = (
        "aggregate_metric_list:\n"
        + "".join(
            f"  - metric: {metric}\n    aggregation: mean\n    weight_by_size: false\n"
            for metric in ("acc", "acc_norm")
        )
        + "metadata:\n  version: 1.0\n"
    )
    header = "# Generated by `python -m uniattn.eval.prepare`: the unweighted mean over its tasks.\n"
    for group, members in groups.items():
        if members:
            write_text(
                tasks_dir / f"uniattn_{group}.yaml",
                header + f"group: uniattn_{group}\ntask:\n" + _yaml_list(sorted(members)) + aggregate,
            )
    present = [f"uniattn_{group}" for group, members in groups.items() if members]
    write_text(tasks_dir / "uniattn.yaml", header + "group: uniattn\ntask:\n" + _yaml_list(present) + aggregate)


def write_tasks(tasks_dir: Path, tasks: dict[str, list[dict]], group: str, source: dict) -> dict:
    """Write ``data/<task>.jsonl`` for each task, merge them into ``data/MANIFEST.json``, regenerate the YAMLs."""
    data_dir = tasks_dir / "data"
    manifest_path = data_dir / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"tasks": {}}
    manifest["split"] = {"module": "uniattn.eval.split", "eval_fraction": EVAL_FRACTION}
    for name, docs in tasks.items():
        if not docs:
            raise ValueError(f"no {name} items were found in {source['path']}; check that it is the right source file")
        validate_docs(name, docs)
        write_text(data_dir / f"{name}.jsonl", "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
        manifest["tasks"][name] = {
            "task": f"uniattn_{name}",
            "group": group,
            "file": f"{name}.jsonl",
            **task_stats(docs),
            "source": source,
        }
        logger.info("%s: %d items -> %s", name, len(docs), data_dir / f"{name}.jsonl")
    manifest["tasks"] = dict(sorted(manifest["tasks"].items()))
    write_text(manifest_path, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    write_task_yamls(tasks_dir, manifest)
    return manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pmc", type=Path, help="PMC-LLaMA instruction data, JSON list or JSONL")
    parser.add_argument("--bigbench", type=Path, help="the bigbench-1.0.0.tar.gz sdist")
    parser.add_argument("--bigbench-tasks", default=",".join(BIGBENCH_TASKS), help="comma-separated BIG-bench task names")
    parser.add_argument(
        "--out", type=Path, default=TASKS_DIR, help=f"task directory; data goes to OUT/data (default {TASKS_DIR})"
    )
    parser.add_argument("--max-items", type=int, default=DEFAULT_MAX_ITEMS, help="cap per task (default %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.pmc is None and args.bigbench is None:
        parser.error("give --pmc, --bigbench or both: there is nothing to rebuild otherwise")
    if args.max_items < 1:
        parser.error(f"--max-items {args.max_items} must be at least 1")
    for flag, path in (("--pmc", args.pmc), ("--bigbench", args.bigbench)):
        if path is not None and not path.is_file():
            parser.error(f"{flag} {path} does not exist; docs/eval.md says where to get it")

    tasks: dict[str, list[dict]] = {}
    if args.pmc is not None:
        pmc_tasks = build_pmc_tasks(load_pmc(args.pmc), args.max_items)
        write_tasks(args.out, pmc_tasks, "medical", {"path": args.pmc.name, "sha256": _sha256_file(args.pmc)})
        tasks.update(pmc_tasks)
    if args.bigbench is not None:
        names = [n.strip() for n in args.bigbench_tasks.split(",") if n.strip()]
        bb_tasks = build_bigbench_tasks(args.bigbench, names, args.max_items)
        write_tasks(args.out, bb_tasks, "general", {"path": args.bigbench.name, "sha256": _sha256_file(args.bigbench)})
        tasks.update(bb_tasks)
    for name, docs in tasks.items():
        stats = task_stats(docs)
        majority = "n/a" if stats["majority"] is None else f"{stats['majority']:.3f} ({stats['majority_answer']})"
        print(f"{name:22s} {stats['items']:4d} items  chance {stats['chance']:.3f}  majority {majority}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
