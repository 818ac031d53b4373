"""Import the reference implementation's logs (`kcollapse import-reference DIR --out RUN_DIR`).

The paper's own code (Keisha et al. 2025) leaves, per synthetic ratio and generation, a directory
`ratio_<pct>_gen_<g>/` with `train.json` (the generation's training texts, the first (1 - pct/100) share real, the
rest written by the model) and `mmlu/<subject>_<format>_gen<g>.json` (one object per question: choices,
probabilities, is_greedy per option, predicted_index, is_correct, actual_answer, optionally judge_answer 1-3 and
entailment_score). This module turns such a directory into an ordinary kcollapse run directory, arm
`ratio_<pct>`, so that `stages`, `report` and `compare` work on the published runs unchanged and side by side
with ours. Metrics are recomputed from the logs with the definitions below, not copied from the paper's summaries.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import yaml

from kcollapse.config import PAPER_FORMATS
from kcollapse.errors import UserError
from kcollapse.evaluate.formats import load_formats
from kcollapse.evaluate.freetext import judge_mention
from kcollapse.evaluate.textstats import repetition, text_stats
from kcollapse.io import atomic_write_text, write_jsonl

GEN_DIR = re.compile(r"ratio_(\d+(?:\.\d+)?)_gen_(\d+)")
QUESTION_KEYS = ["choices", "correct_answer_index", "probabilities", "predicted_index", "is_correct"]


# ---------------------------------------------------------------------------------------- answers

def _confidence(probs) -> float | None:
    vals = [float(p) for p in probs if p is not None and math.isfinite(float(p))]
    total = sum(vals)
    return max(vals) / total if vals and total > 0 else None


def _greedy_of_pick(q: dict) -> bool | None:
    g = q.get("is_greedy")
    if isinstance(g, list):
        i = q["predicted_index"]
        return bool(g[i]) if isinstance(i, int) and 0 <= i < len(g) else None
    return None if g is None else bool(g)


def answer_metrics(questions: list[dict]) -> dict[str, float]:
    """The task-centric metrics of a list of reference question objects (definitions in the issue/README)."""
    n = len(questions)
    correct = [q for q in questions if q["is_correct"]]
    out = {"accuracy": len(correct) / n,
           "max_freq": Counter(q["predicted_index"] for q in questions).most_common(1)[0][1] / n}
    if correct:  # undefined without a correct answer: no row rather than a made-up 0
        out["greedy_rate"] = sum(bool(_greedy_of_pick(q)) for q in correct) / len(correct)
    conf = [c for c in (_confidence(q["probabilities"]) for q in questions) if c is not None]
    if conf:
        out["confidence"] = float(np.mean(conf))
    texts = [q.get("actual_answer") for q in questions if isinstance(q.get("actual_answer"), str)]
    if texts:
        out["answer_words"] = float(np.mean([len(t.split()) for t in texts]))
        out["answer_repetition"] = float(np.mean([repetition(t) for t in texts]))
    judge = [float(q["judge_answer"]) for q in questions if isinstance(q.get("judge_answer"), (int, float))]
    if judge:
        out["judge_mean"] = float(np.mean(judge))
    return out


def _judged(answer, choices, fmt: str) -> int | None:
    """The option the free-text answer names, judged as kcollapse judges its own runs (None: names none)."""
    spec = load_formats().get(fmt)
    letters = spec.answer == "letter" if spec else fmt != "short_answer"
    return judge_mention(answer if isinstance(answer, str) else None, [str(c) for c in choices], letters=letters)[0]


def to_record(q: dict, i: int, subject: str, fmt: str) -> dict:
    """A reference question object as a kcollapse answers record (CONTRACTS.md)."""
    rec = {"id": f"{subject}/{i}", "subject": subject, "format": fmt, "question": q.get("question"),
           "choices": q["choices"], "correct_index": q["correct_answer_index"], "scores": q["probabilities"],
           "is_greedy": _greedy_of_pick(q), "predicted_index": q["predicted_index"], "is_correct": bool(q["is_correct"]),
           "confidence": _confidence(q["probabilities"]), "answer_text": q.get("actual_answer"),
           "judged_index": _judged(q.get("actual_answer"), q["choices"], fmt)}
    for key in ("judge_answer", "entailment_score", "loglikelihoods"):
        if key in q:
            rec[key] = q[key]
    return rec


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: cannot read JSON ({e.__class__.__name__}: {str(e)[:80]})") from None


def load_questions(path: Path) -> list[dict]:
    data = _load_json(path)
    if not isinstance(data, list) or not data:
        raise UserError(f"{path}: expected a non-empty JSON list of question objects")
    for k, q in enumerate(data):
        if not isinstance(q, dict):
            raise UserError(f"{path}: item {k} is not an object")
        missing = [key for key in QUESTION_KEYS if key not in q]
        if missing:
            raise UserError(f"{path}: item {k} lacks {', '.join(missing)}")
        if not isinstance(q["predicted_index"], int) or not isinstance(q["probabilities"], list):
            raise UserError(f"{path}: item {k}: predicted_index must be an integer and probabilities a list")
    return data


def split_name(name: str, known: list[str]) -> tuple[str, str, int] | None:
    """`<subject>_<format>_gen<g>.json` -> (subject, format, g), formats matched longest first; None if unknown."""
    m = re.fullmatch(r"(.+)_gen(\d+)\.json", name)
    if not m:
        return None
    for fmt in sorted(known, key=len, reverse=True):
        if m.group(1).endswith("_" + fmt) and len(m.group(1)) > len(fmt) + 1:
            return m.group(1)[: -len(fmt) - 1], fmt, int(m.group(2))
    return None


def _known_formats() -> list[str]:
    try:
        names = list(load_formats())
    except Exception:  # the formats file is not this command's business: the paper's four always work
        names = []
    return list(dict.fromkeys(names + PAPER_FORMATS))


def _warn(msg: str, warnings: list[str]) -> None:
    warnings.append(msg)
    print(f"warning: {msg}", file=sys.stderr)


def import_command(dir_: Path, out: Path) -> list[str]:
    """Convert DIR (reference logs) into the run directory OUT; returns the warnings it printed."""
    dir_, out = Path(dir_), Path(out)
    if not dir_.is_dir():
        raise UserError(f"{dir_}: not a directory")
    gen_dirs = sorted(((float(m.group(1)), int(m.group(2)), p) for p in dir_.iterdir()
                       if p.is_dir() and (m := GEN_DIR.fullmatch(p.name))), key=lambda t: t[:2])
    if not gen_dirs:
        raise UserError(f"{dir_}: no ratio_<pct>_gen_<g> directories (the reference implementation's log layout)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: already exists and is not empty; choose another --out or delete it")
    known = _known_formats()
    warnings: list[str] = []
    rows: list[dict] = []
    seen: dict[str, dict[int, set]] = {}
    pcts: dict[str, float] = {}

    def row(arm, g, metric, value, fmt=None, subject=None):
        rows.append({"arm": arm, "generation": g, "metric": metric, "value": value, "format": fmt, "subject": subject})

    for pct, g, path in gen_dirs:
        arm = f"ratio_{path.name.split('_')[1]}"
        pcts[arm] = pct
        gdir = out / "arms" / arm / f"gen_{g}"
        seen.setdefault(arm, {})[g] = set()
        train = path / "train.json"
        if train.is_file():
            texts = _load_json(train)
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise UserError(f"{train}: expected a JSON list of strings")
            n_real = int((1 - pct / 100) * len(texts))  # as the reference code splits them
            write_jsonl(gdir / "synthetic.jsonl", [{"text": t, "source": "real" if k < n_real else "synthetic"}
                                                   for k, t in enumerate(texts)])
            for subject, part in [(None, texts), ("real", texts[:n_real]), ("synthetic", texts[n_real:])]:
                if part:
                    for metric, v in text_stats(part).items():
                        if v is not None:
                            row(arm, g, metric, v, None, subject)
        else:
            _warn(f"{train}: missing; no text metrics or synthetic samples for {arm} generation {g}", warnings)
        by_format: dict[str, list[dict]] = {}
        for qpath in sorted((path / "mmlu").glob("*.json")):
            parsed = split_name(qpath.name, known)
            if parsed is None:
                _warn(f"{qpath}: name is not <subject>_<format>_gen<g>.json with a known format; skipped", warnings)
                continue
            subject, fmt, g_file = parsed
            if g_file != g:
                _warn(f"{qpath}: says generation {g_file} inside {path.name}; counted as generation {g}", warnings)
            questions = load_questions(qpath)
            write_jsonl(gdir / "answers" / f"{subject}__{fmt}.jsonl",
                        [to_record(q, i, subject, fmt) for i, q in enumerate(questions)])
            for metric, v in answer_metrics(questions).items():
                row(arm, g, metric, v, fmt, subject)
            by_format.setdefault(fmt, []).extend(questions)
            seen[arm][g].add((subject, fmt))
        for fmt, questions in by_format.items():
            for metric, v in answer_metrics(questions).items():
                row(arm, g, metric, v, fmt, None)
        if not by_format:
            _warn(f"{path / 'mmlu'}: no benchmark answers for {arm} generation {g}", warnings)

    combos = set().union(*(s for gens in seen.values() for s in gens.values()))
    for arm, gens in seen.items():
        missing = sorted(set(range(max(gens) + 1)) - set(gens))
        if missing:
            _warn(f"{arm}: generation(s) {', '.join(map(str, missing))} missing"
                  + ("; no generation-0 baseline, stages cannot be classified" if 0 in missing else ""), warnings)
        for g, have in sorted(gens.items()):
            lack = sorted(combos - have)
            if have and lack:
                _warn(f"{arm} generation {g}: missing {', '.join(f'{s}/{f}' for s, f in lack)}", warnings)

    formats = sorted({f for _, f in combos}, key=lambda f: (f not in PAPER_FORMATS, f))
    subjects = sorted({s for s, _ in combos})
    config = {
        "model": "reference-import",
        "corpus": {"path": str(dir_.resolve())},
        "generations": max(g for _, g, _ in gen_dirs) + 1,
        "arms": [{"name": arm, "synthetic_ratio": min(1.0, pct / 100)} for arm, pct in pcts.items()],
        "eval": {"benchmark": "hf:cais/mmlu", "formats": formats or PAPER_FORMATS, "subjects": subjects or None},
    }
    atomic_write_text(out / "config.yaml", f"# imported by `kcollapse import-reference` from {dir_.resolve()}\n"
                                            + yaml.safe_dump(config, sort_keys=False))
    write_jsonl(out / "metrics.jsonl", rows)  # written last: its presence marks a complete import
    print(f"imported {len(gen_dirs)} generation directories into {out} ({len(rows)} metric rows, "
          f"{len(warnings)} warning(s)); next: kcollapse stages {out}")
    return warnings

