"""The evaluation suite: what a generation's model still knows (task-centric) and how its text drifts (model-centric).

`load_benchmark` gives the questions; `evaluate` asks each in every instruction format, scores the options by
likelihood (scoring.py), lets the model answer in free text (freetext.py), writes one record per question to
`answers_dir/<subject>__<format>.jsonl` (with `eval.permutation`, formats that list the options are scored a
second time with the options rotated: permute.py) and returns metric rows `{metric, value, format, subject}` (metrics.py for
task metrics; textstats.py for perplexity, entropy, fluency and the like). The run loop calls it once per
generation; `kcollapse eval` once for one model.
"""

from __future__ import annotations

from pathlib import Path

from kcollapse.config import EvalConfig
from kcollapse.evaluate import benchmark as bench
from kcollapse.evaluate import freetext, metrics, permute, scoring, textstats
from kcollapse.evaluate.formats import get_format, option_targets, render
from kcollapse.io import write_jsonl
from kcollapse.models import chat_prompt, load_model

__all__ = ["load_benchmark", "evaluate"]


def load_benchmark(cfg: EvalConfig, organism_benchmark: Path | None = None) -> list[dict]:
    """The benchmark's items, filtered by cfg.subjects / cfg.split, the first cfg.limit per subject (file order).

    Items of split "dev" are included as few-shot examples only; "train" items are questions and examples."""
    items = bench.read_benchmark(cfg.benchmark, cfg.subjects, organism_benchmark)
    return bench.select(items, cfg.subjects, cfg.split, cfg.limit, cfg.benchmark)


def build_prompts(fmt, questions: list[dict], pool: list[dict], cfg: EvalConfig, tokenizer, use_chat_template: bool) -> list[str]:
    prompts = []
    for item in questions:
        shots = bench.few_shot_examples(item, pool, cfg.few_shot_k, fallback=questions) if fmt.example else []
        prompts.append(chat_prompt(tokenizer, render(fmt, item, shots), use_template=use_chat_template))
    return prompts


def make_records(fmt, questions: list[dict], prompts: list[str], scored: list[dict], answers: list[str] | None) -> list[dict]:
    records = []
    for k, (item, prompt, s) in enumerate(zip(questions, prompts, scored)):
        answer = answers[k] if answers is not None else None
        judged, position = freetext.judge_mention(answer, item["choices"], letters=fmt.answer == "letter")
        record = {
            "id": item["id"], "subject": item["subject"], "format": fmt.name, "question": item["question"],
            "choices": item["choices"], "correct_index": item["answer"], "scores": s["scores"],
            "is_greedy": s["is_greedy"], "predicted_index": s["predicted_index"],
            "is_correct": s["predicted_index"] == item["answer"], "confidence": s["confidence"],
            "option_probs": s["option_probs"],
            "answer_text": answer, "judged_index": judged, "format_adherent": metrics.adheres(answer, position),
        }
        record["answer_wellformed"] = metrics.wellformed(answer, record["format_adherent"], fmt.answer == "letter")
        if "scores_norm" in s:
            record.update(scores_norm=s["scores_norm"], predicted_index_norm=s["predicted_index_norm"])
        if item.get("split"):
            record["split"] = item["split"]
        record["prompt"] = prompt
        records.append(record)
    metrics.mark_shared_answers(records)
    return records


def ask_permuted(model, tokenizer, cfg: EvalConfig, fmt, asked: list[dict], pool: list[dict], records: list[dict],
                 use_chat_template: bool, progress=None) -> None:
    """Score every question again with its options rotated (permute.py); the answers go into the records."""
    shifts = [permute.shift_for(q["id"], len(q["choices"])) for q in asked]
    rotated = [permute.permuted(q, k) for q, k in zip(asked, shifts)]
    prompts = build_prompts(fmt, rotated, pool, cfg, tokenizer, use_chat_template)
    scored = scoring.score_options(model, tokenizer, prompts, [option_targets(fmt, q) for q in rotated],
                                   scoring=cfg.scoring, answer=fmt.answer, batch_size=cfg.batch_size, progress=progress)
    permute.add_permuted(records, shifts, scored)


def _rows(values: dict, subject: str | None) -> list[dict]:
    return [{"metric": m, "value": float(v), "format": None, "subject": subject} for m, v in values.items() if v is not None]


def evaluate(model, tokenizer, cfg: EvalConfig, items: list[dict], *, heldout_texts: list[str] = (),
             own_texts: list[str] | None = None, synthetic_texts: list[str] | None = None, reference_model=None,
             reference_tokenizer=None, reference_vocab: set[str] | None = None, answers_dir: Path | None = None,
             use_chat_template: bool = True, progress=None) -> list[dict]:
    """Metric rows {metric, value, format, subject} for one model; per-question records under answers_dir."""
    pool = bench.few_shot_pool(items)
    if cfg.few_shot_file:
        pool = bench.load_few_shot_file(cfg.few_shot_file) + pool
    questions = [i for i in items if bench.is_question(i, cfg.split)]
    formats = [get_format(name, cfg.formats_file) for name in cfg.formats]
    judge = None
    if cfg.judge_model and cfg.free_text:
        judge = load_model(cfg.judge_model, device=str(next(model.parameters()).device))
    task = progress.add_task("evaluate", total=len(formats)) if progress is not None else None
    rows, all_answers = [], []
    for fmt in formats:
        asked = [q for q in questions if fmt.applies_to(q)]
        if not asked:  # e.g. cloze on a benchmark without statements
            if task is not None:
                progress.advance(task)
            continue
        prompts = build_prompts(fmt, asked, pool, cfg, tokenizer, use_chat_template)
        targets = [option_targets(fmt, q) for q in asked]
        scored = scoring.score_options(model, tokenizer, prompts, targets, scoring=cfg.scoring, answer=fmt.answer,
                                       batch_size=cfg.batch_size, progress=progress)
        answers = None
        if cfg.free_text:
            whole = freetext.generate_whole_answers(model, tokenizer, prompts, cfg.free_text_tokens, cfg.batch_size,
                                                    progress)
            answers = [freetext.first_line(a) for a in whole]  # judged: the first non-empty line
            all_answers += answers
        records = make_records(fmt, asked, prompts, scored, answers)
        if answers is not None:
            for r, raw in zip(records, whole):
                r["answer_raw"] = raw
        if cfg.permutation and permute.shows_options(fmt):
            ask_permuted(model, tokenizer, cfg, fmt, asked, pool, records, use_chat_template, progress)
        if answers is not None and cfg.embedding_judge:
            nearest = freetext.embedding_judge(answers, [q["choices"] for q in asked])
            for r, k in zip(records, nearest or []):
                r["embedding_index"] = k
        if judge is not None:
            for r, g in zip(records, freetext.judge_grades(*judge, asked, answers, cfg.batch_size)):
                r["judge_score"] = g
        rows += metrics.task_metric_rows(records, fmt.name)
        if answers_dir is not None:
            for subject in dict.fromkeys(r["subject"] for r in records):
                write_jsonl(Path(answers_dir) / f"{subject}__{fmt.name}.jsonl", [r for r in records if r["subject"] == subject])
        if task is not None:
            progress.advance(task)
    rows += text_metric_rows(model, tokenizer, cfg, heldout_texts=heldout_texts, own_texts=own_texts,
                             synthetic_texts=synthetic_texts, answers=all_answers if cfg.free_text else None,
                             reference_model=reference_model, reference_tokenizer=reference_tokenizer,
                             reference_vocab=reference_vocab)
    if task is not None:
        progress.remove_task(task)
    return rows


def text_metric_rows(model, tokenizer, cfg: EvalConfig, *, heldout_texts=(), own_texts=None, synthetic_texts=None,
                     answers=None, reference_model=None, reference_tokenizer=None, reference_vocab=None) -> list[dict]:
    """Model-centric rows (format null): perplexities, word statistics, fluency and gibberish scores."""
    bs = cfg.batch_size
    rows = []
    if heldout_texts:
        rows += _rows({"perplexity_heldout": textstats.perplexity(model, tokenizer, list(heldout_texts), stride=cfg.perplexity_stride, batch_size=bs)}, None)
    if own_texts:
        rows += _rows({"perplexity_own": textstats.perplexity(model, tokenizer, own_texts, stride=cfg.perplexity_stride, batch_size=bs)}, None)
        rows += _rows(textstats.text_stats(own_texts), None)
    if synthetic_texts:
        rows += _rows(textstats.text_stats(synthetic_texts), "synthetic")
    classifier = textstats.load_gibberish_classifier(cfg.gibberish_model) if cfg.gibberish_model else None
    for subject, texts in (("synthetic", synthetic_texts), ("answers", answers)):
        texts = [t for t in texts or [] if t and t.strip()]
        if not texts:
            continue
        values = {}
        if reference_vocab is not None:
            values["fluency"] = textstats.vocab_share(texts, reference_vocab)
        if reference_model is not None:
            values["fluency_ppl"] = textstats.perplexity(reference_model, reference_tokenizer or tokenizer, texts,
                                                         stride=cfg.perplexity_stride, batch_size=bs)
        if classifier is not None:
            scores = textstats.gibberish_scores(classifier, texts, bs)
            values["gibberish_score"] = sum(scores) / len(scores)
        rows += _rows(values, subject)
    return rows
