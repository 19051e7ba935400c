"""Build the offline instruction pool: enough distinct prompts for a real training budget, plus val and test sets.

    python -m uniattn.pool --bigbench bigbench-1.0.0.tar.gz --out outputs/pool   (scripts/build_pool.sh does it all)

Sources: the BIG-bench JSON tasks of the ``bigbench==1.0.0`` sdist (read from the tar.gz) except the evaluation
tasks, at most ``--per_task`` prompts each; the Tulu-3 and PMC-LLaMA samples of ``dataset/``. OUT gets train.jsonl
(seeded shuffle: the first N records are a mix), val_{domain,general}.jsonl (to choose learning rates),
heldout_domain.jsonl (PMC's held-out side in ``uniattn.eval.split``, the medical eval source), heldout_general.jsonl
and MANIFEST.json, with Alpaca-style records ``{instruction, input, output, source, domain}``. Every choice is a
salted SHA-256 of the question (``split_key``): each question appears once in all files, and no shipped lm-eval
item reaches train, val or heldout_general. Bad input exits 2 and writes nothing (OUT is renamed into place).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import re
import shlex
import sys
import tarfile
import unicodedata
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from uniattn.eval import TASKS_DIR
from uniattn.eval.prepare import BIGBENCH_TASKS
from uniattn.eval.split import EVAL_FRACTION, SPLIT_SALT, hash_fraction, is_eval_record, split_key
from uniattn.io import atomic_dir, write_json, write_text

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
# Changing the salt or the seed changes every split and the train order: bump the version with them.
POOL_SALT = "uniattn-pool-v1"
SHUFFLE_SEED = 1_000_003
_MEMBER = re.compile(r"^[^/]+/bigbench/benchmark_tasks/(?P<task>[^/]+)/(?:[^/]+/)?task\.json$")
_CONTAIN_WORDS = 5  # eval questions are found inside longer prompts through their first few words
_LINE_BREAKS = {c: f"\\u{c:04x}" for c in (0x85, 0x2028, 0x2029)}
DROP_REASONS = ("empty", "too_long", "ambiguous", "eval_task", "over_task_cap", "duplicate",
                "eval_overlap_exact", "eval_overlap_contained")


class PoolError(ValueError):
    """Input that cannot be built into a pool; the message names the value and the fix."""


def _norm(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())  # split_key's normalisation


def _score(key: str, purpose: str) -> float:
    # One salt per purpose: the per-task cap and the split must not pick the same low-hash records.
    return hash_fraction(f"{purpose}\0{key}", POOL_SALT)  # hashes POOL_SALT \0 purpose \0 key


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _show(path: Path) -> str:
    """A path as it should appear in a committed manifest: repo-relative or under ~."""
    path = Path(path).resolve()
    for base, label in ((ROOT, ""), (Path.home(), "~/")):
        if path.is_relative_to(base):
            return label + str(path.relative_to(base))
    return str(path)


def _usable(rec: dict, args, dropped: Counter) -> bool:
    if not rec["_q"] or not rec["output"] or not rec["instruction"]:
        dropped["empty"] += 1
    elif len(rec["output"]) > args.max_response_chars or len(rec["instruction"] + rec["input"]) > args.max_prompt_chars:
        dropped["too_long"] += 1
    else:
        return True
    return False


def bigbench_records(top: str, task: dict, args, dropped: Counter):
    """Usable examples of one task.json as pool records; multiple choice answers with the best option's text."""
    instruction = str(task.get("task_prefix") or "").strip() or str(task.get("description") or "").strip()
    for ex in task.get("examples", []):
        question, scores = str(ex.get("input") or "").strip(), ex.get("target_scores")
        head, text = instruction, question
        if isinstance(scores, dict) and scores:
            values, options = list(scores.values()), [str(c).strip() for c in scores]
            if (len(set(options)) < max(2, len(options)) or not all(options)
                    or not all(isinstance(v, (int, float)) for v in values) or values.count(max(values)) != 1):
                dropped["ambiguous"] += 1
                continue
            output = str(max(scores, key=scores.get)).strip()
            # Some tasks list the right answer first; a per-question shuffle keeps position meaningless.
            random.Random(question).shuffle(options)
            text = question + "\n\nOptions:\n" + "\n".join(f"- {o}" for o in options)
            head = instruction + "\nAnswer with the text of the correct option."
        else:
            target = ex.get("target")
            target = target[0] if isinstance(target, list) and target else target
            output = target.strip() if isinstance(target, str) else ""
        rec = {"instruction": head.strip(), "input": text, "output": output, "source": f"bigbench/{top}",
               "domain": "general", "_q": _norm(question)}
        if _usable(rec, args, dropped):
            rec["_key"] = split_key(rec)
            rec["_cap"] = _score(rec["_key"], "cap")
            yield rec


def _keep_lowest(records: list[dict], cap: int, dropped: Counter) -> list[dict]:
    """The ``cap`` distinct prompts with the lowest cap score; equal keys have equal scores, so dups sit together."""
    records.sort(key=lambda r: (r["_cap"], r["_key"]))
    kept = []
    for rec in records:
        if kept and kept[-1]["_key"] == rec["_key"]:
            dropped["duplicate"] += 1
        elif len(kept) < cap:
            kept.append(rec)
        else:
            dropped["over_task_cap"] += 1
    return kept


def scan_bigbench(sdist: Path, args, dropped: Counter) -> tuple[list[dict], int]:
    """Every JSON task in the sdist except the evaluation tasks, at most ``per_task`` prompts per top-level task."""
    by_task: dict[str, list[dict]] = {}
    files = 0
    try:
        with open(sdist, "rb") as raw, tqdm.wrapattr(
            raw, "read", total=sdist.stat().st_size, desc="bigbench sdist", unit="B", unit_scale=True, disable=None
        ) as stream, tarfile.open(fileobj=stream, mode="r|gz") as archive:
            for member in archive:
                match = _MEMBER.match(member.name)
                if not match or not member.isfile():
                    continue
                files += 1
                top, task = match["task"], json.load(archive.extractfile(member))
                if top in args.exclude_tasks:
                    dropped["eval_task"] += len(task.get("examples", []))
                    continue
                for rec in bigbench_records(top, task, args, dropped):
                    by_task.setdefault(top, []).append(rec)
                    if len(by_task[top]) > 4 * args.per_task:  # tasks with 500k examples would not fit otherwise
                        by_task[top] = _keep_lowest(by_task[top], args.per_task, dropped)
    except (OSError, EOFError, tarfile.TarError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PoolError(
            f"--bigbench {sdist} is not a readable bigbench sdist .tar.gz ({err}); "
            "delete it and rerun scripts/build_pool.sh to download bigbench-1.0.0.tar.gz again"
        ) from err
    if not files:
        raise PoolError(f"--bigbench {sdist} holds no bigbench/benchmark_tasks/*/task.json; pass the bigbench==1.0.0 sdist")
    records = [r for top in sorted(by_task) for r in _keep_lowest(by_task[top], args.per_task, dropped)]
    return records, files


def load_sample(path: Path, flag: str, source: str, domain: str) -> list[dict]:
    """The Tulu-3 / PMC-LLaMA samples of ``dataset/`` (JSON list) as pool records."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError("not a JSON list of objects")
    except (OSError, ValueError) as err:
        raise PoolError(f"{flag} {path} cannot be read as a JSON list of records ({err}); pass the file from dataset/")
    out = []
    for r in rows:
        instruction, text = str(r.get("instruction") or "").strip(), str(r.get("input") or "").strip()
        if not instruction:  # Tulu-3 rows carry the request in `input`
            instruction, text = text, ""
        out.append({"instruction": instruction, "input": text, "output": str(r.get("output") or "").strip(),
                    "source": source, "domain": domain, "_q": _norm(text or instruction)})
    return out


def eval_questions(data_dir: Path) -> tuple[set[str], dict[str, str]]:
    """Normalised questions of every shipped lm-eval document, and the SHA-256 of each file."""
    files = sorted(data_dir.glob("*.jsonl"))
    if not files:
        raise PoolError(f"--eval_data {data_dir} holds no *.jsonl evaluation items; point it at uniattn/eval/tasks/data")
    questions: set[str] = set()
    for path in files:
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            doc = json.loads(line)
            if doc.get("pmc_input"):
                questions.add(split_key({"instruction": doc.get("pmc_instruction", ""), "input": doc["pmc_input"]}))
                continue
            # BIG-bench renders prefix + "\n\n"? + "Q: " + input + choice lines + answer cue ("A:", "Relation:", ...).
            lines = [ln for ln in doc["query"].split("\n") if not ln.strip().startswith("choice:")]
            body = "\n".join(lines[:-1]) if len(lines) > 1 else doc["query"]
            for text in (body, body.split("\n\n", 1)[-1]):
                text = text.strip()
                questions.add(_norm(text[2:] if text.startswith("Q:") else text))
    questions.discard("")
    return questions, {p.name: _sha256(p) for p in files}


def eval_overlap(records: list[dict], questions: set[str], min_chars: int, dropped: Counter) -> list[dict]:
    """Drop records whose question is an eval question, or whose prompt contains one of ``min_chars`` or more."""
    index: dict[tuple, list[str]] = {}
    for q in questions:
        words = q.split()
        if len(q) >= min_chars and len(words) >= _CONTAIN_WORDS:
            index.setdefault(tuple(words[:_CONTAIN_WORDS]), []).append(q)
    kept = []
    for rec in records:
        if rec["_q"] in questions or rec["_key"] in questions:
            dropped["eval_overlap_exact"] += 1
            continue
        text = _norm(rec["instruction"] + "\n" + rec["input"])
        words = text.split()
        grams = (tuple(words[i:i + _CONTAIN_WORDS]) for i in range(len(words) - _CONTAIN_WORDS + 1))
        if any(q in text for g in grams if g in index for q in index[g]):
            dropped["eval_overlap_contained"] += 1
            continue
        kept.append(rec)
    return kept


def make_splits(records: list[dict], questions: set[str], args, dropped: Counter) -> dict[str, list[dict]]:
    """One record per question, eval items out, then the splits cut by salted hash; train in a seeded shuffle."""
    kept, seen = [], set()
    for rec in records:  # PMC first: its held-out side is fixed by uniattn.eval.split and must win a tie
        if rec["source"].startswith("bigbench/") or _usable(rec, args, dropped):  # bigbench: checked before the cap
            rec["_key"] = split_key(rec)
            dropped["duplicate"] += rec["_key"] in seen
            if rec["_key"] not in seen:
                seen.add(rec["_key"])
                kept.append(rec)
    # The PMC held-out side is where the medical eval items come from: as a whole, it is the domain test set.
    held = {id(r) for r in kept if r["source"] == "pmc" and is_eval_record(r)}
    rest = eval_overlap([r for r in kept if id(r) not in held], questions, args.min_overlap_chars, dropped)

    def by_hash(rows):
        return sorted(rows, key=lambda r: (_score(r["_key"], "split"), r["_key"]))

    domain = by_hash([r for r in rest if r["domain"] == "medical"])
    general = by_hash([r for r in rest if r["domain"] == "general"])
    h, v, d = args.heldout_general, args.val_general, args.val_domain
    train = sorted(domain[d:] + general[h + v:], key=lambda r: r["_key"])
    random.Random(SHUFFLE_SEED).shuffle(train)
    if len(train) < args.min_train:
        raise PoolError(f"only {len(train)} training records, below --min_train {args.min_train}; raise --per_task, "
                        "lower --heldout_general/--val_general/--val_domain, or lower --min_train")
    return {"train": train, "val_domain": domain[:d], "val_general": general[h:h + v],
            "heldout_domain": by_hash([r for r in kept if id(r) in held]), "heldout_general": general[:h]}


def write_pool(out: Path, splits: dict[str, list[dict]], manifest: dict) -> dict:
    """Write every file into a temporary folder next to ``out``, then rename it to ``out`` (replacing an old one)."""
    with atomic_dir(out) as tmp:
        manifest["files"] = {}
        for name, rows in splits.items():
            lines = (json.dumps({k: v for k, v in r.items() if k[0] != "_"}, ensure_ascii=False, sort_keys=True)
                     for r in rows)
            # Escaped, since str.splitlines (uniattn.data.load_records) breaks lines at U+2028/2029/0085.
            path = write_text(tmp / f"{name}.jsonl", "".join(line.translate(_LINE_BREAKS) + "\n" for line in lines))
            manifest["files"][path.name] = {"records": len(rows), "bytes": path.stat().st_size, "sha256": _sha256(path)}
        write_json(tmp / "MANIFEST.json", manifest)
    return manifest


def build(args, argv: list[str]) -> dict:
    """Check every input, build the pool into ``args.out``, return its manifest."""
    out = args.out.resolve()
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not args.force):
        raise PoolError(f"--out {args.out} already exists and is not an empty folder; choose another folder, "
                        "or pass --force to replace a previous pool")
    for flag, path, fix in (("--bigbench", args.bigbench, "run scripts/build_pool.sh, which downloads it"),
                            ("--tulu", args.tulu, "pass the sample file shipped in dataset/"),
                            ("--pmc", args.pmc, "pass the sample file shipped in dataset/")):
        if not path.is_file():
            raise PoolError(f"{flag} {path} does not exist; {fix}")
    dropped = Counter(dict.fromkeys(DROP_REASONS, 0))  # zeros too: "none dropped" is a result worth recording
    pmc = load_sample(args.pmc, "--pmc", "pmc", "medical")
    tulu = load_sample(args.tulu, "--tulu", "tulu3", "general")
    questions, eval_files = eval_questions(args.eval_data)
    bigbench, bb_files = scan_bigbench(args.bigbench, args, dropped)  # minutes: every cheap check comes before it
    splits = make_splits(pmc + tulu + bigbench, questions, args, dropped)
    train = splits["train"]
    manifest = {
        "builder": {
            "module": "uniattn.pool", "pool_salt": POOL_SALT, "shuffle_seed": SHUFFLE_SEED,
            "command": " ".join(["python -m uniattn.pool"] + [_show(a) if "/" in a else shlex.quote(a) for a in argv]),
            "params": {k: (_show(v) if isinstance(v, Path) else v) for k, v in sorted(vars(args).items())},
            "domain_split": {"module": "uniattn.eval.split", "salt": SPLIT_SALT, "eval_fraction": EVAL_FRACTION},
        },
        "sources": {
            "bigbench": {"path": _show(args.bigbench), "sha256": _sha256(args.bigbench), "task_json_files": bb_files,
                         "excluded_tasks": sorted(args.exclude_tasks)},
            "tulu3": {"path": _show(args.tulu), "sha256": _sha256(args.tulu), "records": len(tulu)},
            "pmc": {"path": _show(args.pmc), "sha256": _sha256(args.pmc), "records": len(pmc)},
            "eval_items": {"path": _show(args.eval_data), "questions": len(questions), "sha256": eval_files},
        },
        "counts": {
            "splits": {name: len(rows) for name, rows in splits.items()},
            "per_domain": {n: dict(sorted(Counter(r["domain"] for r in rows).items())) for n, rows in splits.items()},
            "per_source": {n: dict(sorted(Counter(r["source"].split("/")[0] for r in rows).items()))
                           for n, rows in splits.items()},
            "bigbench_tasks_in_train": len({r["source"] for r in train if r["source"].startswith("bigbench/")}),
            "top_sources_in_train": dict(Counter(r["source"] for r in train).most_common(25)),
            "dropped": dict(sorted(dropped.items())),
        },
    }
    write_pool(out, splits, manifest)
    if args.copy_manifest:
        write_json(args.copy_manifest, manifest).chmod(0o644)
    return manifest


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bigbench", type=Path, required=True, help="the bigbench-1.0.0.tar.gz sdist")
    p.add_argument("--out", type=Path, required=True, help="pool folder to create")
    p.add_argument("--tulu", type=Path, default=ROOT / "dataset" / "tulu3_sft_filtered_1000.json")
    p.add_argument("--pmc", type=Path, default=ROOT / "dataset" / "pmc_llama_instructions_1000.json")
    p.add_argument("--eval_data", type=Path, default=TASKS_DIR / "data", help="shipped lm-eval items kept out of the pool")
    p.add_argument("--exclude_tasks", type=lambda s: sorted({t for t in s.split(",") if t}),
                   default=sorted(BIGBENCH_TASKS), help="BIG-bench tasks used for evaluation (comma-separated)")
    for flag, default, about in (
        ("per_task", 300, "prompts per top-level BIG-bench task"), ("heldout_general", 500, "general test records"),
        ("val_general", 200, "general validation records"), ("val_domain", 150, "PMC validation records"),
        ("min_train", 10000, "fail if train has fewer records"), ("max_response_chars", 4000, "longer responses dropped"),
        ("max_prompt_chars", 6000, "longer prompts dropped"), ("min_overlap_chars", 30, "shortest eval question searched "
                                                                "inside prompts (shorter ones: exact match only)")):
        p.add_argument(f"--{flag}", type=int, default=default, help=f"{about} (default %(default)s)")
    p.add_argument("--copy_manifest", type=Path, help="also write MANIFEST.json here (dataset/pool_MANIFEST.json)")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty --out")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for flag in ("per_task", "heldout_general", "val_general", "val_domain", "min_train", "max_response_chars"):
        if getattr(args, flag) < (flag == "per_task"):
            p.error(f"--{flag} {getattr(args, flag)} is too small: counts are at least 0, --per_task at least 1")
    try:
        manifest = build(args, argv)
    except PoolError as err:
        logger.error("%s", err)
        return 2
    c = manifest["counts"]
    logger.info("pool in %s: %s", args.out, ", ".join(f"{k} {v}" for k, v in c["splits"].items()))
    logger.info("dropped: %s", ", ".join(f"{k} {v}" for k, v in c["dropped"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
