"""Benchmark loaders (JSONL, MMLU CSV, hf:, organism), their one-line errors, filtering and few-shot selection."""

from __future__ import annotations

import json

import pytest

from kcollapse.config import EvalConfig
from kcollapse.evaluate.benchmark import MMLU_SUBJECTS
from kcollapse.errors import UserError
from kcollapse.evaluate import benchmark as bench
from kcollapse.evaluate import load_benchmark


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def q(i, subject="geo", **kw):
    return {"question": f"Question {i}?", "choices": ["a", "b", "c", "d"], "answer": i % 4, "subject": subject, **kw}


def test_jsonl_items_and_defaults(tmp_path):
    path = write_jsonl(tmp_path / "quiz.jsonl", [
        {"question": "Capital of France?", "choices": ["Paris", "Rome"], "answer": 0},
        {"id": "x7", "question": "Largest ocean?", "choices": ["Atlantic", "Pacific"], "answer": "B",
         "subject": "geo", "split": "heldout", "statement": "The largest ocean is the"},
    ])
    items = load_benchmark(EvalConfig(benchmark=str(path), limit=None))
    assert items[0] == {"id": "quiz-1", "subject": "quiz", "question": "Capital of France?", "choices": ["Paris", "Rome"], "answer": 0}
    assert items[1]["answer"] == 1 and items[1]["split"] == "heldout" and items[1]["statement"].startswith("The largest")
    assert items[1]["id"] == "x7"


@pytest.mark.parametrize("row, message", [
    ({"choices": ["a", "b"], "answer": 0}, "row 2: missing field 'question'"),
    ({"question": "Q?", "answer": 0}, "row 2: missing field 'choices'"),
    ({"question": "Q?", "choices": ["a", "b"]}, "row 2: missing field 'answer'"),
    ({"question": "Q?", "choices": ["a", "b"], "answer": 2}, "row 2: field 'answer': index 2 out of range for 2 choices"),
    ({"question": "Q?", "choices": ["a"], "answer": 0}, "row 2: field 'choices': expected a list of at least 2 choices, found 1"),
    ({"question": "  ", "choices": ["a", "b"], "answer": 0}, "row 2: field 'question': empty question"),
    ({"question": "Q?", "choices": ["a", "b"], "answer": "Z"}, "row 2: field 'answer': expected an option index or letter"),
])
def test_jsonl_errors_name_file_row_and_field(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [q(0), row])
    with pytest.raises(UserError) as err:
        load_benchmark(EvalConfig(benchmark=str(path)))
    assert str(err.value).startswith(f"{path}: {message}")
    assert "\n" not in str(err.value)


def test_non_utf8_and_bad_json(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(json.dumps(q(0)).encode() + b"\n" + '{"question": "caf\xe9"}'.encode("latin-1") + b"\n")
    with pytest.raises(UserError, match=r"latin.jsonl: row 2: not UTF-8"):
        load_benchmark(EvalConfig(benchmark=str(path)))
    bad = tmp_path / "broken.jsonl"
    bad.write_text(json.dumps(q(0)) + "\n{oops\n")
    with pytest.raises(UserError, match=r"broken.jsonl: row 2: not valid JSON"):
        load_benchmark(EvalConfig(benchmark=str(bad)))


def test_mmlu_csv_file_and_directory(tmp_path):
    d = tmp_path / "data"
    (d / "test").mkdir(parents=True)
    (d / "dev").mkdir()
    (d / "test" / "global_facts_test.csv").write_text('"What is 2+2, roughly?",3,4,5,6,B\nSecond?,w,x,y,z,D\n')
    (d / "dev" / "global_facts_dev.csv").write_text("Dev question?,p,q,r,s,A\n")
    (d / "test" / "astronomy_test.csv").write_text("Star?,sun,moon,rock,gas,a\n")
    items = bench.read_benchmark(str(d))
    by_id = {i["id"]: i for i in items}
    assert by_id["global_facts-test-1"] == {"id": "global_facts-test-1", "subject": "global_facts",
                                            "question": "What is 2+2, roughly?", "choices": ["3", "4", "5", "6"], "answer": 1}
    assert by_id["global_facts-dev-1"]["split"] == "dev"
    assert by_id["astronomy-test-1"]["answer"] == 0
    selected = load_benchmark(EvalConfig(benchmark=str(d), subjects=["global_facts"], limit=1))
    assert [i["id"] for i in selected] == ["global_facts-dev-1", "global_facts-test-1"]  # pool kept, limit on questions


def test_mmlu_csv_errors(tmp_path):
    path = tmp_path / "astronomy_test.csv"
    path.write_text("Q?,a,b,c,d,A\nQ2?,a,b,E\n")
    with pytest.raises(UserError, match=r"astronomy_test.csv: row 2: field 'answer': expected a letter A-B"):
        bench.read_benchmark(str(path))
    path.write_text("Q?,a,A\n")
    with pytest.raises(UserError, match=r"row 1: expected question, at least 2 choices and an answer letter, found 3 columns"):
        bench.read_benchmark(str(path))


def test_filtering_limit_split_and_unknown_subject(tmp_path):
    rows = [q(i, "geo", split="heldout" if i % 2 else "seen") for i in range(6)] + [q(9, "chem")]
    path = write_jsonl(tmp_path / "b.jsonl", rows)
    items = load_benchmark(EvalConfig(benchmark=str(path), limit=2))
    assert [i["question"] for i in items] == ["Question 0?", "Question 1?", "Question 9?"]
    items = load_benchmark(EvalConfig(benchmark=str(path), split="heldout", limit=None))
    assert [i["question"] for i in items] == ["Question 1?", "Question 3?", "Question 5?"]
    with pytest.raises(UserError, match="unknown subject 'bio', expected one of geo, chem"):
        load_benchmark(EvalConfig(benchmark=str(path), subjects=["bio"]))
    with pytest.raises(UserError, match="no questions of split 'dev'"):
        load_benchmark(EvalConfig(benchmark=str(path), split="dev"))
    with pytest.raises(UserError, match="does not exist"):
        load_benchmark(EvalConfig(benchmark=str(tmp_path / "missing.jsonl")))
    with pytest.raises(UserError, match="unknown benchmark file type"):
        load_benchmark(EvalConfig(benchmark=str(write_jsonl(tmp_path / "b.txt", rows))))


def test_organism_benchmark(tmp_path):
    path = write_jsonl(tmp_path / "benchmark.jsonl", [q(0, "geography", split="heldout")])
    items = load_benchmark(EvalConfig(benchmark="organism"), organism_benchmark=path)
    assert items[0]["subject"] == "geography"
    with pytest.raises(UserError, match="benchmark 'organism'"):
        load_benchmark(EvalConfig(benchmark="organism"))


def test_hf_loader_mmlu_layout(monkeypatch):
    import datasets

    calls = []

    def fake_load(name, config, split):
        calls.append((name, config, split))
        n = 5 if split == "dev" else 3
        return [{"question": f"{config} {split} {i}?", "subject": config, "choices": ["w", "x", "y", "z"], "answer": i % 4} for i in range(n)]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    items = load_benchmark(EvalConfig(benchmark="hf:cais/mmlu", limit=2))
    assert [c[1] for c in calls[::2]] == MMLU_SUBJECTS and calls[0] == ("cais/mmlu", "global_facts", "test")
    test_items = [i for i in items if bench.is_question(i)]
    assert len(test_items) == 2 * len(MMLU_SUBJECTS) and test_items[0]["question"] == "global_facts test 0?"
    assert sum(i.get("split") == "dev" for i in items) == 5 * len(MMLU_SUBJECTS)


def test_hf_loader_offline_is_one_line(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'cais/mmlu' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError) as err:
        load_benchmark(EvalConfig(benchmark="hf:cais/mmlu", subjects=["global_facts"]))
    assert "hf:cais/mmlu: cannot load subject 'global_facts'" in str(err.value) and "\n" not in str(err.value)


def test_train_split_items_are_questions_and_examples(tmp_path):
    """The organism's layout: split train (facts it trained on) and heldout; both asked, train also as examples."""
    rows = [q(i, "geo", split="train" if i % 2 else "heldout") for i in range(8)] + [q(8, "geo", split="dev")]
    path = write_jsonl(tmp_path / "organism.jsonl", rows)
    items = load_benchmark(EvalConfig(benchmark=str(path), limit=4))
    assert [i["question"] for i in items if bench.is_question(i)] == [f"Question {i}?" for i in range(4)]
    assert [i["question"] for i in bench.few_shot_pool(items)] == ["Question 1?", "Question 3?", "Question 8?"]
    heldout_only = load_benchmark(EvalConfig(benchmark=str(path), split="heldout", limit=None))
    assert [i["question"] for i in heldout_only if bench.is_question(i, "heldout")] == ["Question 0?", "Question 2?", "Question 4?", "Question 6?"]
    assert len(bench.few_shot_pool(heldout_only)) == 5  # all train items and the dev item stay as examples


def test_few_shot_examples_deterministic_and_never_the_question():
    pool = [dict(q(i, "geo"), id=f"d{i}", split="dev") for i in range(4)] + [dict(q(9, "chem"), id="c9", split="dev")]
    item = dict(q(1, "geo"), id="t1")  # same text as pool item d1
    shots = bench.few_shot_examples(item, pool, 3)
    assert [s["id"] for s in shots] == ["d0", "d2", "d3"]
    assert [s["id"] for s in bench.few_shot_examples(item, pool, 5)] == ["d0", "d2", "d3", "c9"]
    peers = [dict(q(i, "geo"), id=f"t{i}") for i in range(4)]
    assert [s["id"] for s in bench.few_shot_examples(peers[2], [], 2, fallback=peers)] == ["t3", "t0"]
    assert bench.few_shot_examples(item, pool, 0) == []
