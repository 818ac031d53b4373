"""Stages and the model-centric warning on what the real evaluator writes: models degraded on purpose.

Six generations of hand-set bigram checkpoints (fixtures/bigram_models.py) per arm go through `evaluate`, the
same call the run loop makes, and the rows and answers files are laid out as the loop lays them out. Built in, arm
"a": model 2 starts writing repetitive text (its own held-out perplexity rises too), model 3 forgets 3/4 of the
facts with its answers still one well-formed word (B), model 5 answers 'blah blah ...' (C). So B onset 3, C onset
5, model-centric warning at model 2, lead time 3 - 2 = 1. Other arms move one signal each; arm "same" answers
one word to every question (no C signal but the well-formed share: a reply that ignores the question), arm
"terse" starts from a generation 0 that rambles and then answers in a word (shorter and better formed: not C).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from bigram_models import benchmark, healthy_text, save_model, vocabulary  # noqa: E402

from kcollapse.config import EvalConfig  # noqa: E402
from kcollapse.evaluate import evaluate, load_benchmark  # noqa: E402
from kcollapse.evaluate.textstats import vocabulary as text_vocabulary  # noqa: E402
from kcollapse.lm import generate  # noqa: E402
from kcollapse.io import write_jsonl  # noqa: E402
from kcollapse.models import load_model  # noqa: E402
from kcollapse.stages import StageRules, classify_run  # noqa: E402

N_Q = 24
KEPT = set(range(0, N_Q, 4))  # what a model that forgot keeps (retention above chance ~0)
ALL = set(range(N_Q))
HEALTHY = dict(known=ALL)
ARMS = {  # arm -> the model of each generation 1..5 (generation 0 is HEALTHY, shared as in the loop)
    # the main story: text degrades from model 2, facts go at 3 (answers stay one word: B), answers break at 5 (C)
    "a": [HEALTHY, dict(known=ALL, text_ok=False), dict(known=KEPT, text_ok=False), dict(known=KEPT, text_ok=False),
          dict(known=KEPT, text_ok=False, answers="blah")],
    # one signal at a time
    "ppl": [dict(known=ALL, sure=1.0)] * 5,  # same greedy text and answers, held-out perplexity up from model 1
    "long": [HEALTHY, HEALTHY] + [dict(known=ALL, answers="long")] * 3,  # answers grow to 12 words
    "oov": [HEALTHY, HEALTHY] + [dict(known=ALL, answers="oov")] * 3,  # one-word answers the vocabulary lacks
    "same": [HEALTHY, HEALTHY] + [dict(known=ALL, answers="same")] * 3,  # one known word, whatever is asked
    "terse": [HEALTHY] * 5,  # after a generation 0 that rambled (GEN0): it learns to answer in a word
}
GEN0 = {"terse": dict(known=ALL, answers="ramble")}  # other arms share generation 0, as in the loop


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("degraded")
    words = vocabulary(N_Q)
    cfg = EvalConfig(benchmark=str(benchmark(root / "bench.jsonl", N_Q)), formats=["short_answer"],
                     free_text_tokens=12, batch_size=8)
    items = load_benchmark(cfg)
    train_texts = [healthy_text(k) for k in range(10)] + [f"g{i} d{i}a d{i}b d{i}c" for i in range(N_Q)]
    heldout = [healthy_text(k, 40) for k in range(3)]
    run, rows, n = root / "run", [], 0

    def model(spec):
        nonlocal n
        n += 1
        return load_model(save_model(root / f"m{n}", words, n_questions=N_Q, **spec), device="cpu")

    def evaluate_into(arm, g, m, mix):
        # as loop.Context: generation g's mix is written by model g-1 (alpha 1: all synthetic); gen 0 has none
        out = evaluate(m, tok, cfg, items, heldout_texts=heldout, own_texts=mix, synthetic_texts=mix,
                       reference_model=model0, reference_tokenizer=tok, reference_vocab=text_vocabulary(train_texts),
                       answers_dir=run / "arms" / arm / f"gen_{g}" / "answers")
        return [{"arm": arm, "generation": g, **r} for r in out]

    model0, tok = model(HEALTHY)
    for arm, specs in ARMS.items():
        prev = model(GEN0[arm])[0] if arm in GEN0 else model0
        rows += evaluate_into(arm, 0, prev, None)
        for g, spec in enumerate(specs, start=1):
            current, _ = model(spec)
            rows += evaluate_into(arm, g, current, generate(prev, tok, [f"w{k}" for k in range(6)], 20))
            prev = current
    write_jsonl(run / "metrics.jsonl", rows)
    return run, rows


def test_fixture_is_what_the_evaluator_writes(real_run):
    run, rows = real_run
    records = [json.loads(line) for line in (run / "arms/a/gen_0/answers/facts__short_answer.jsonl").open()]
    assert [r["answer_text"] for r in records] == [r["choices"][r["correct_index"]] for r in records]  # its own
    subjects = {(r["metric"], r["subject"]) for r in rows if r["format"] is None}
    assert ("fluency", "answers") in subjects and ("fluency", None) not in subjects  # item 1 of issue 15
    assert {("perplexity_heldout", None), ("entropy", "synthetic"), ("distinct_2", "synthetic")} <= subjects
    assert not any(r["metric"] == "perplexity" for r in rows)
    assert min(r["generation"] for r in rows if r["metric"] == "entropy") == 1  # model 0's text: generation 1
    assert set(StageRules().model_signals) <= {r["metric"] for r in rows}  # every default signal is written


def test_stages_are_called_where_they_were_built(real_run):
    run, _ = real_run
    result = classify_run(run, StageRules(n_boot=300))
    f = result["arms"]["a"]["formats"]["short_answer"]
    assert f["stages"] == "AAABBC"
    assert (f["onset_B"], f["onset_C"]) == (3, 5)
    assert [p["knowledge_loss"] for p in f["generations"]] == [False] * 3 + [True] * 3
    assert f["generations"][3]["retention"] == pytest.approx(0.0, abs=0.05)
    c_reasons = " ".join(f["generations"][5]["reasons"])
    assert "fluency" in c_reasons and "answer length" in c_reasons and "answer repetition" in c_reasons
    assert f["generations"][3]["answer_wellformed"] == 1.0  # wrong but one word: confidently wrong, not C


def test_model_warning_and_lead_time_are_what_was_built_in(real_run):
    run, _ = real_run
    result = classify_run(run, StageRules(n_boot=300))
    model = result["arms"]["a"]["model_centric"]
    assert model["warning_generation"] == 2
    assert model["warnings"] == {"perplexity_heldout": 2, "entropy": 2, "distinct_1": 2, "distinct_2": 2,
                                 "repetition_rate": 2}
    assert model["sources"]["entropy"]["written_by"].startswith("model g-1")
    assert model["sources"]["perplexity_heldout"]["written_by"] == "model g"
    assert sorted(model["metrics"]["entropy"]) == [0, 1, 2, 3, 4]  # model 5's text is never evaluated
    assert model["not_written"] == []
    f = result["arms"]["a"]["formats"]["short_answer"]
    assert f["task_drop_generation"] == 3 and f["lead_time"] == 1


def test_each_signal_alone(real_run):
    """One degradation per arm: the rule names it and nothing else."""
    run, _ = real_run
    arms = classify_run(run, StageRules(n_boot=300))["arms"]
    ppl = arms["ppl"]
    assert ppl["model_centric"]["warnings"] == {"perplexity_heldout": 1}  # model 1 can warn: it is measured itself
    assert ppl["formats"]["short_answer"]["stages"] == "AAAAAA" and ppl["formats"]["short_answer"]["lead_time"] is None
    long = arms["long"]["formats"]["short_answer"]
    assert long["stages"] == "AAACCC" and (long["onset_B"], long["onset_C"]) == (None, 3)
    reasons = " ".join(long["generations"][3]["reasons"])
    assert "answer length 1.0 -> 12.0 words" in reasons and "fluency" not in reasons and "repetition" not in reasons
    oov = arms["oov"]["formats"]["short_answer"]
    assert oov["stages"] == "AAACCC" and oov["onset_B"] is None
    assert oov["generations"][3]["reasons"] == ["fluency 1.00 -> 0.00"]  # one short word: well-formed, same length
    same = arms["same"]["formats"]["short_answer"]  # "g0" to all 24: in the vocabulary, one word, no option
    assert same["stages"] == "AAACCC" and same["onset_B"] is None
    assert same["generations"][3]["reasons"] == ["well-formed answers 1.00 -> 0.04"]  # right for question 0 only
    terse = arms["terse"]["formats"]["short_answer"]  # 12 words naming no option -> the option in a word
    assert [round(p["answer_words"]) for p in terse["generations"]] == [12, 1, 1, 1, 1, 1]
    assert terse["generations"][1]["answer_wellformed"] == 1.0 > terse["generations"][0]["answer_wellformed"]
    assert terse["stages"] == "AAAAAA" and terse["onset_C"] is None  # a shorter answer in the asked form is no C
    for arm in ("long", "oov", "same", "terse"):
        assert arms[arm]["model_centric"]["warnings"] == {}  # text and perplexity untouched
    # format dependence: a C onset set by the fluency row alone has no sampling interval to compare
    oov_c = arms["oov"]["format_dependence"]["formats"]["short_answer"]["onset_C"]
    assert oov_c["generation"] == 3 and oov_c["resampled"] is False and "fluency" in oov_c["text"]
    long_c = arms["long"]["format_dependence"]["formats"]["short_answer"]["onset_C"]
    assert long_c["generation"] == 3 and long_c["resampled"] is True
