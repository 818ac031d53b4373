"""Task-centric metrics: per-question records in, metric rows out.

Every metric is a plain function of the records (the same ones written to answers/*.jsonl), so anyone can
recompute it with pandas. The paper's stage B (knowledge collapse) shows as `accuracy` falling while
`format_adherence` holds; `greedy_rate`, `max_freq`, `confidence` and `ece` tell how the model is failing
(confidently, or by drifting to one option). Definitions:

- `accuracy`: share correct; `accuracy_norm` (loglik scoring): share correct by the byte-normalised score.
- `greedy_rate`: of the correct answers, the share whose chosen option is greedy (as the paper).
- `max_freq`: share of questions answered with the most often predicted option index.
- `confidence`: mean of max score / sum of scores; `confident_wrong_rate`: share of all questions answered wrongly
  with confidence >= 0.5; `ece`: expected calibration error over 10 equal-width confidence bins; `brier`: the
  multi-class Brier score, mean over questions of sum_k (p_k - [k = gold])^2 with p the option probabilities
  (`option_probs`: scores / their sum for `reference`, softmax of the log-likelihoods for `loglik`); 0 is
  perfect, a uniform guess over 4 options scores 0.75, a confident wrong answer 2. `reliability` gives the bins
  behind `ece` (the report's reliability diagram).
- Option-order control (eval.permutation; formats that list the options; see permute.py): `accuracy_permuted`
  (share correct with the options rotated), `consistent_correct` (right in both orders), `option_consistency`
  (the same option picked in both orders), `position_consistency` (the same letter/position picked in both
  orders), `position_bias` (total variation distance between where the picks stand and where the gold answers
  stand, pooled over both orders: 0 when picks follow the gold's positions, 1 - share(gold at X) for a model that
  always picks X). Knowledge keeps option_consistency high; a drift to one position shows as position_bias and
  position_consistency high with option_consistency low.
- Free text: `judged_accuracy` (the judged option is the correct one; an unjudged answer is wrong),
  `embedding_accuracy`, `judge_mean` (1-3), `answer_words`, `answer_repetition` (share of repeated word 4-grams),
  `format_adherence` (non-empty, names an option or its letter within the first 5 words, not degenerate);
  `answer_wellformed` (adherent, or a short answer of the asked kind whatever it names: non-empty, not degenerate,
  at most 5 words, for letter formats led by a letter, and not the model's one reply to most questions: see
  `mark_shared_answers`). The two part where the model answers fluently with something that is not an option
  ("Copenhagen" for Andorra's capital): confidently wrong, format intact. That is knowledge collapse (B), so the
  stage rule reads instruction-following (C) off `answer_wellformed`. A reply that ignores the question ("Source:"
  to all 60 questions, as Gemma 3 270M wrote after 6 generations on its own text, or one text cut short at different
  words) is no answer of the asked kind.

A metric that is undefined for a group (no correct answers for `greedy_rate`, no free text) gives no row.
"""

from __future__ import annotations

import math
from collections import Counter

from kcollapse.evaluate.freetext import letter_answer, normalize
from kcollapse.evaluate.permute import gold_position
from kcollapse.evaluate.textstats import repetition, words

ECE_BINS = 10


def _mean(values: list) -> float | None:
    return sum(values) / len(values) if values else None


def accuracy(records: list[dict]) -> float | None:
    return _mean([bool(r["is_correct"]) for r in records])


def accuracy_norm(records: list[dict]) -> float | None:
    norm = [r for r in records if r.get("predicted_index_norm") is not None]
    return _mean([r["predicted_index_norm"] == r["correct_index"] for r in norm]) if norm else None


def greedy_rate(records: list[dict]) -> float | None:
    correct = [r for r in records if r["is_correct"]]
    return _mean([bool(r["is_greedy"][r["predicted_index"]]) for r in correct])


def max_freq(records: list[dict]) -> float | None:
    counts = Counter(r["predicted_index"] for r in records)
    return max(counts.values()) / len(records) if records else None


def confidence(records: list[dict]) -> float | None:
    return _mean([r["confidence"] for r in records])


def confident_wrong_rate(records: list[dict], threshold: float = 0.5) -> float | None:
    return _mean([(not r["is_correct"]) and r["confidence"] >= threshold for r in records])


def ece(records: list[dict], bins: int = ECE_BINS) -> float | None:
    if not records:
        return None
    groups: dict[int, list[dict]] = {}
    for r in records:
        groups.setdefault(min(int(r["confidence"] * bins), bins - 1), []).append(r)
    return sum(len(g) / len(records) * abs(accuracy(g) - confidence(g)) for g in groups.values())


def option_probs(record: dict) -> list[float] | None:
    """The option probabilities the prediction and confidence come from (records written before them: from scores;
    None for records with neither, e.g. imported logs)."""
    if record.get("option_probs") is not None:
        return record["option_probs"]
    scores = record.get("scores")
    if not scores:
        return None
    if "scores_norm" in record:  # loglik: log-likelihoods
        finite = [s for s in scores if s != float("-inf")]
        if not finite:
            return [1.0 / len(scores)] * len(scores)
        top = max(finite)
        exp = [math.exp(s - top) if s != float("-inf") else 0.0 for s in scores]
        return [e / sum(exp) for e in exp]
    total = sum(scores)
    return [s / total for s in scores] if total > 0 else [1.0 / len(scores)] * len(scores)


def brier(records: list[dict]) -> float | None:
    probs = [(option_probs(r), r["correct_index"]) for r in records]
    return _mean([sum((p - (k == gold)) ** 2 for k, p in enumerate(ps)) for ps, gold in probs if ps is not None])


def reliability(records: list[dict], bins: int = ECE_BINS) -> list[dict]:
    """Equal-width confidence bins that hold questions: {lo, hi, n, confidence (mean), accuracy}."""
    groups: dict[int, list[dict]] = {}
    for r in records:
        groups.setdefault(min(int(r["confidence"] * bins), bins - 1), []).append(r)
    return [{"lo": b / bins, "hi": (b + 1) / bins, "n": len(g), "confidence": confidence(g), "accuracy": accuracy(g)}
            for b, g in sorted(groups.items())]


def _permuted(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("perm_shift") is not None]


def accuracy_permuted(records: list[dict]) -> float | None:
    return _mean([bool(r["perm_is_correct"]) for r in _permuted(records)])


def consistent_correct(records: list[dict]) -> float | None:
    return _mean([bool(r["is_correct"]) and bool(r["perm_is_correct"]) for r in _permuted(records)])


def option_consistency(records: list[dict]) -> float | None:
    return _mean([r["predicted_index"] == r["perm_predicted_index"] for r in _permuted(records)])


def position_consistency(records: list[dict]) -> float | None:
    return _mean([r["predicted_index"] == r["perm_predicted_position"] for r in _permuted(records)])


def position_shares(records: list[dict]) -> dict[int, tuple[float, float]]:
    """position -> (share of picks there, share of gold answers there), pooled over both orders."""
    rows = _permuted(records)
    picks = Counter([r["predicted_index"] for r in rows] + [r["perm_predicted_position"] for r in rows])
    golds = Counter([r["correct_index"] for r in rows] + [gold_position(r) for r in rows])
    total = 2 * len(rows)
    return {p: (picks[p] / total, golds[p] / total) for p in sorted(set(picks) | set(golds))} if rows else {}


def position_bias(records: list[dict]) -> float | None:
    shares = position_shares(records)
    return 0.5 * sum(abs(pick - gold) for pick, gold in shares.values()) if shares else None


def _answered(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("answer_text") is not None]


def judged_accuracy(records: list[dict]) -> float | None:
    return _mean([r.get("judged_index") == r["correct_index"] for r in _answered(records)])


def embedding_accuracy(records: list[dict]) -> float | None:
    rated = [r for r in _answered(records) if "embedding_index" in r]
    return _mean([r["embedding_index"] == r["correct_index"] for r in rated])


def judge_mean(records: list[dict]) -> float | None:
    return _mean([r["judge_score"] for r in records if r.get("judge_score") is not None])


def answer_words(records: list[dict]) -> float | None:
    return _mean([len(words(r["answer_text"])) for r in _answered(records)])


def answer_repetition(records: list[dict]) -> float | None:
    return _mean([repetition(r["answer_text"]) for r in _answered(records)])


def format_adherence(records: list[dict]) -> float | None:
    return _mean([bool(r.get("format_adherent")) for r in _answered(records)])


def is_degenerate(text: str) -> bool:
    """Mostly repeated 4-grams, or mostly not letters, digits and spaces."""
    useful = sum(ch.isalnum() or ch.isspace() for ch in text)
    return repetition(text) > 0.5 or useful < 0.5 * len(text)


def adheres(answer: str | None, mention_position: int | None, max_words: int = 5) -> bool | None:
    if answer is None:
        return None
    return bool(answer.strip()) and mention_position is not None and mention_position < max_words and not is_degenerate(answer)


def wellformed(answer: str | None, adherent: bool | None, letters: bool, max_words: int = 5) -> bool | None:
    if answer is None:
        return None
    if adherent:
        return True
    text = answer.strip()
    if not text or is_degenerate(text) or len(text.split()) > max_words:
        return False
    return letter_answer(text) is not None if letters else True


SHARED_ANSWER_SHARE = 0.5  # a non-option reply given to at least this share of a format's questions ignores them


def _cuts(reply: str) -> set[str]:
    """A normalised reply and every cut of it after one of its words."""
    words = reply.split()
    return {" ".join(words[:k]) for k in range(1, len(words) + 1)}


def shared_answer(answers: list[str | None], adherent: list[bool | None]) -> str | None:
    """The normalised reply, naming no option, that the model gives to at least `SHARED_ANSWER_SHARE` of the
    questions it answered (and to two at least), whole or cut short, or None. Cut short, because a model that writes
    one text whatever the question stops it at different words ("Source of", "Source of the following", "Source of
    the following element?"); the longest such text is returned. "It is Rome" and "It is Oslo" are two replies.
    Answers that name an option never count: a model that is right or wrong about many questions with the same
    option is answering them."""
    answered = sum(a is not None for a in answers)
    replies = Counter(normalize(a) for a, ok in zip(answers, adherent) if a is not None and not ok)
    replies.pop("", None)
    covered = {longest: sum(replies.get(cut, 0) for cut in _cuts(longest)) for longest in replies}
    if not covered:
        return None
    count, longest = max((n, reply) for reply, n in covered.items())
    return longest if count >= 2 and count >= SHARED_ANSWER_SHARE * answered else None


def mark_shared_answers(records: list[dict]) -> None:
    """One format's records: the answers that are the shared reply (`shared_answer`), whole or cut short, are not
    well-formed."""
    shared = shared_answer([r["answer_text"] for r in records], [r["format_adherent"] for r in records])
    if shared is None:
        return
    cuts = _cuts(shared)
    for r in records:
        if r["answer_text"] is not None and not r["format_adherent"] and normalize(r["answer_text"]) in cuts:
            r["answer_wellformed"] = False


def answer_wellformed(records: list[dict]) -> float | None:
    return _mean([bool(r.get("answer_wellformed")) for r in _answered(records) if "answer_wellformed" in r])


TASK_METRICS = {
    "accuracy": accuracy, "accuracy_norm": accuracy_norm, "greedy_rate": greedy_rate, "max_freq": max_freq,
    "confidence": confidence, "confident_wrong_rate": confident_wrong_rate, "ece": ece, "brier": brier,
    "accuracy_permuted": accuracy_permuted, "consistent_correct": consistent_correct,
    "option_consistency": option_consistency, "position_consistency": position_consistency,
    "position_bias": position_bias,
    "judged_accuracy": judged_accuracy, "embedding_accuracy": embedding_accuracy, "judge_mean": judge_mean,
    "answer_words": answer_words, "answer_repetition": answer_repetition, "format_adherence": format_adherence,
    "answer_wellformed": answer_wellformed,
}


def groups(records: list[dict]) -> dict[str | None, list[dict]]:
    """None: all records; each subject; `split:<name>` for each benchmark split."""
    out: dict[str | None, list[dict]] = {None: records}
    for r in records:
        out.setdefault(r["subject"], []).append(r)
    for r in records:
        if r.get("split"):
            out.setdefault(f"split:{r['split']}", []).append(r)
    return out


def task_metric_rows(records: list[dict], fmt: str) -> list[dict]:
    rows = []
    for subject, group in groups(records).items():
        for name, fn in TASK_METRICS.items():
            value = fn(group)
            if value is not None:
                rows.append({"metric": name, "value": float(value), "format": fmt, "subject": subject})
    return rows
