"""Benchmarks: multiple-choice questions from any of four sources, as one list of plain items.

An item is `{id, subject, question, choices, answer: int, split?, statement?}`. Sources: `hf:<name>` through
`datasets` (MMLU layout: question, choices, answer; one config per subject; split "test", "dev" for few-shot
examples), a local JSONL file (`question`, `choices`, `answer`, optional `subject`, `split`, `id`, `statement`),
the original MMLU CSVs (no header: question, A, B, C, D, answer letter; subject from `<subject>_test.csv`; a
directory of them, `_dev.csv` files giving the few-shot pool) and the organism's benchmark (a JSONL file it writes).
Few-shot examples come from the items of split "dev" or "train"; "dev" items are only examples, never asked
(unless `split: dev` asks for them); "train" items (e.g. the organism's trained facts) are both.
A bad row is one line naming the file, the row and the field, because a silently skipped row is a wrong number.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from kcollapse.errors import UserError
from kcollapse.evaluate.formats import LETTERS

MMLU_SUBJECTS = [
    "global_facts", "world_religions", "high_school_geography",  # factual
    "formal_logic", "elementary_mathematics", "high_school_mathematics",  # reasoning
]

FEW_SHOT_SPLITS = ("dev", "train")  # where few-shot examples come from
EXAMPLES_ONLY_SPLIT = "dev"  # examples, not questions


def _read_utf8(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read benchmark file ({e.__class__.__name__})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        row = data[: e.start].count(b"\n") + 1
        raise UserError(f"{path}: row {row}: not UTF-8 text (byte {e.start})") from None


def _answer_index(value, n_choices: int, where: str) -> int:
    if isinstance(value, str) and value.strip().upper() in LETTERS[:n_choices] and len(value.strip()) == 1:
        return LETTERS.index(value.strip().upper())
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{where}: field 'answer': expected an option index or letter, found {value!r:.40}")
    if not 0 <= value < n_choices:
        raise UserError(f"{where}: field 'answer': index {value} out of range for {n_choices} choices")
    return value


def make_item(row: dict, where: str, *, default_subject: str, default_id: str) -> dict:
    """Validate one raw row into an item; `where` ("file: row N") prefixes every error."""
    for field in ("question", "choices", "answer"):
        if field not in row or row[field] is None:
            raise UserError(f"{where}: missing field '{field}'")
    question, choices = row["question"], row["choices"]
    if not isinstance(question, str) or not question.strip():
        raise UserError(f"{where}: field 'question': empty question")
    if not isinstance(choices, (list, tuple)) or len(choices) < 2:
        found = len(choices) if isinstance(choices, (list, tuple)) else type(choices).__name__
        raise UserError(f"{where}: field 'choices': expected a list of at least 2 choices, found {found}")
    if len(choices) > len(LETTERS):
        raise UserError(f"{where}: field 'choices': at most {len(LETTERS)} choices, found {len(choices)}")
    item = {
        "id": str(row.get("id") if row.get("id") is not None else default_id),
        "subject": str(row.get("subject") or default_subject),
        "question": question,
        "choices": [str(c) for c in choices],
        "answer": _answer_index(row["answer"], len(choices), where),
    }
    for optional in ("split", "statement"):
        if row.get(optional) not in (None, ""):
            item[optional] = str(row[optional])
    return item


def read_jsonl_benchmark(path: Path) -> list[dict]:
    items = []
    for lineno, line in enumerate(_read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: row {lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}: row {lineno}: expected a JSON object, found {type(row).__name__}")
        items.append(make_item(row, f"{path}: row {lineno}", default_subject=path.stem, default_id=f"{path.stem}-{lineno}"))
    if not items:
        raise UserError(f"{path}: no questions in benchmark file")
    return items


def _csv_subject_split(path: Path) -> tuple[str, str | None]:
    stem = path.stem
    for suffix, split in (("_test", None), ("_dev", "dev"), ("_val", "val")):
        if stem.endswith(suffix):
            return stem[: -len(suffix)], split
    return stem, None


def read_mmlu_csv(path: Path) -> list[dict]:
    """The original MMLU layout: no header; question, the choices, the answer letter."""
    subject, split = _csv_subject_split(path)
    items = []
    for rowno, cols in enumerate(csv.reader(io.StringIO(_read_utf8(path))), 1):
        if not any(c.strip() for c in cols):
            continue
        where = f"{path}: row {rowno}"
        if len(cols) < 4:
            raise UserError(f"{where}: expected question, at least 2 choices and an answer letter, found {len(cols)} columns")
        row = {"question": cols[0], "choices": cols[1:-1], "answer": cols[-1].strip(), "split": split}
        if not (len(row["answer"]) == 1 and row["answer"].upper() in LETTERS[: len(cols) - 2]):
            if rowno == 1 and len(row["answer"]) > 1 and row["answer"].isalpha():  # a pandas-style export's column names
                raise UserError(f"{where} looks like a header ({', '.join(cols)!s:.60}); MMLU CSVs have none: "
                                "delete it, or convert the file to .jsonl")
            raise UserError(f"{where}: field 'answer': expected a letter A-{LETTERS[len(cols) - 3]}, found {cols[-1]!r:.40}")
        items.append(make_item(row, where, default_subject=subject, default_id=f"{subject}-{split or 'test'}-{rowno}"))
    if not items:
        raise UserError(f"{path}: no questions in benchmark file")
    return items


def read_local(path: Path) -> list[dict]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".csv") and not p.name.startswith("."))
        files = [p for p in files if p.suffix == ".jsonl" or _csv_subject_split(p)[1] != "val"]
        if not files:
            raise UserError(f"{path}: no .jsonl or .csv benchmark files in this directory")
        return [item for f in files for item in read_local(f)]
    if path.suffix == ".jsonl":
        return read_jsonl_benchmark(path)
    if path.suffix == ".csv":
        return read_mmlu_csv(path)
    raise UserError(f"{path}: unknown benchmark file type '{path.suffix}', expected .jsonl or .csv (MMLU layout)")


def read_hf(name: str, subjects: list[str] | None) -> list[dict]:
    """MMLU-layout datasets through `datasets`: split "test" per subject config, "dev" as the few-shot pool."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"hf:{name}: the 'datasets' package is not installed") from None
    is_mmlu = "mmlu" in name.lower()
    configs = subjects or (MMLU_SUBJECTS if is_mmlu else [None])
    items = []
    for config in configs:
        for split in ("test", "dev"):
            try:
                rows = datasets.load_dataset(name, config, split=split)
            except Exception as e:  # offline, unknown dataset/config, missing split: all one line for the user
                if split == "dev":
                    break
                what = f"subject '{config}' of " if config else ""
                first = (str(e).splitlines() or [""])[0][:160]
                raise UserError(f"hf:{name}: cannot load {what}the dataset (offline or unavailable? {e.__class__.__name__}: {first})") from None
            for i, row in enumerate(rows):
                row = dict(row)
                row["split"] = split if split == "dev" else row.get("split")
                subject = config or row.get("subject") or name.split("/")[-1]
                row.setdefault("id", f"{subject}-{split}-{i}")
                row["subject"] = row.get("subject") or subject
                items.append(make_item(row, f"hf:{name} ({config or 'default'}/{split}): row {i + 1}",
                                       default_subject=subject, default_id=f"{subject}-{split}-{i}"))
    return items


def read_benchmark(spec: str, subjects: list[str] | None = None, organism_benchmark: Path | None = None) -> list[dict]:
    """Every item of a benchmark spec, unfiltered (the few-shot pool included)."""
    if spec == "organism":
        if organism_benchmark is None:
            raise UserError("benchmark 'organism': no organism benchmark file given (build the organism first, or pass a .jsonl file)")
        return read_jsonl_benchmark(Path(organism_benchmark))
    if spec.startswith("hf:"):
        return read_hf(spec[3:], subjects)
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"benchmark: {spec} does not exist (expected organism, a .jsonl/.csv file or dir, or hf:<dataset>)")
    return read_local(path)


def is_question(item: dict, split: str | None = None) -> bool:
    """Is the item asked (given the eval split filter), rather than only a few-shot example?"""
    if split is not None:
        return item.get("split") == split
    return item.get("split") != EXAMPLES_ONLY_SPLIT


def few_shot_pool(items: list[dict]) -> list[dict]:
    return [i for i in items if i.get("split") in FEW_SHOT_SPLITS]


def select(items: list[dict], subjects: list[str] | None, split: str | None, limit: int | None, source: str) -> list[dict]:
    """Questions of the asked subjects and split, the first `limit` per subject in file order, plus the few-shot pool."""
    available = list(dict.fromkeys(i["subject"] for i in items))
    if subjects is None and set(MMLU_SUBJECTS) <= set(available) and len(available) > len(MMLU_SUBJECTS):
        subjects = MMLU_SUBJECTS  # a full MMLU copy: the paper's six subjects
    unknown = [s for s in subjects or [] if s not in available]
    if unknown:
        raise UserError(f"{source}: unknown subject '{unknown[0]}', expected one of {', '.join(available)}")
    if split is not None and not any(i.get("split") == split for i in items):
        splits = sorted({i["split"] for i in items if i.get("split")})
        raise UserError(f"{source}: no questions of split '{split}' (splits: {', '.join(splits) or 'none'})")
    kept, counts = [], {}
    for item in items:
        if subjects is not None and item["subject"] not in subjects:
            continue
        if is_question(item, split):
            n = counts.get(item["subject"], 0)
            if limit is None or n < limit:
                kept.append(item)
                counts[item["subject"]] = n + 1
        elif item.get("split") in FEW_SHOT_SPLITS:
            kept.append(item)  # an example only
    if not counts:
        raise UserError(f"{source}: no questions left to evaluate after filtering by subject/split")
    return kept


def load_few_shot_file(path: str | Path) -> list[dict]:
    items = read_jsonl_benchmark(Path(path))
    for item in items:
        item["split"] = "dev"
    return items


def few_shot_examples(item: dict, pool: list[dict], k: int, fallback: list[dict] = ()) -> list[dict]:
    """The first k pool items of the item's subject (then any subject), never the item itself; deterministic.

    Without a pool (a benchmark with no dev split), the k questions that follow the item in its subject are used.
    """
    if k <= 0:
        return []

    def other(x):
        return x["id"] != item["id"] and x["question"] != item["question"]

    same = [x for x in pool if x["subject"] == item["subject"] and other(x)]
    rest = [x for x in pool if x["subject"] != item["subject"] and other(x)]
    chosen = (same + rest)[:k]
    if len(chosen) < k and fallback:
        peers = [x for x in fallback if x["subject"] == item["subject"]]
        start = next((i for i, x in enumerate(peers) if x["id"] == item["id"]), -1) + 1
        ring = [x for x in peers[start:] + peers[:start] if other(x)]
        chosen += ring[: k - len(chosen)]
    return chosen
