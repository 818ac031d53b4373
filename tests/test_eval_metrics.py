"""Metric functions on hand-made records and texts with known values; the free-text mention judge."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from kcollapse.evaluate import metrics, textstats
from kcollapse.evaluate.freetext import first_line, judge_mention, normalize


def rec(subject, correct, predicted, conf, greedy=True, answer=None, adherent=None, split=None, **kw):
    r = {"id": f"{subject}{predicted}{conf}", "subject": subject, "format": "multiple_choice", "correct_index": correct,
         "predicted_index": predicted, "is_correct": correct == predicted, "confidence": conf,
         "is_greedy": [greedy] * 4, "answer_text": answer, "judged_index": kw.pop("judged", None),
         "format_adherent": adherent, **kw}
    if split:
        r["split"] = split
    return r


RECORDS = [
    rec("geo", 0, 0, 0.9, greedy=True, answer="A. Paris", judged=0, adherent=True, split="seen"),
    rec("geo", 1, 1, 0.6, greedy=False, answer="B", judged=1, adherent=True, split="heldout"),
    rec("geo", 2, 0, 0.7, answer="Paris Paris Paris Paris Paris", judged=0, adherent=False, split="heldout"),
    rec("chem", 3, 0, 0.3, answer="", judged=None, adherent=False, split="seen"),
]


def test_task_metrics_known_values():
    assert metrics.accuracy(RECORDS) == 0.5
    assert metrics.greedy_rate(RECORDS) == 0.5  # of 2 correct answers, one greedy
    assert metrics.max_freq(RECORDS) == 0.75  # option 0 predicted 3 times of 4
    assert metrics.confidence(RECORDS) == pytest.approx((0.9 + 0.6 + 0.7 + 0.3) / 4)
    assert metrics.confident_wrong_rate(RECORDS) == 0.25  # only the wrong 0.7 one
    # bins: 0.9 -> [0.9,1) acc 1; 0.6 -> acc 1; 0.7 -> acc 0; 0.3 -> acc 0
    assert metrics.ece(RECORDS) == pytest.approx((0.1 + 0.4 + 0.7 + 0.3) / 4)
    assert metrics.judged_accuracy(RECORDS) == 0.5
    assert metrics.answer_words(RECORDS) == pytest.approx((2 + 1 + 5 + 0) / 4)
    assert metrics.answer_repetition(RECORDS) == pytest.approx((0 + 0 + 0.5 + 0) / 4)
    assert metrics.format_adherence(RECORDS) == 0.5
    assert metrics.accuracy_norm(RECORDS) is None and metrics.judge_mean(RECORDS) is None


def test_ece_perfect_calibration_and_single_bin():
    calibrated = [rec("s", 0, 0, 0.75)] * 3 + [rec("s", 0, 1, 0.75)]
    assert metrics.ece(calibrated) == pytest.approx(0.0)
    assert metrics.ece([rec("s", 0, 0, 1.0)]) == pytest.approx(0.0)  # confidence 1.0 lands in the last bin


def test_metric_rows_groups_and_pandas_recompute():
    rows = metrics.task_metric_rows(RECORDS, "multiple_choice")
    acc = {r["subject"]: r["value"] for r in rows if r["metric"] == "accuracy"}
    assert acc == {None: 0.5, "geo": 2 / 3, "chem": 0.0, "split:seen": 0.5, "split:heldout": 0.5}
    assert all(r["format"] == "multiple_choice" for r in rows)
    assert not any(r["metric"] == "greedy_rate" and r["subject"] == "chem" for r in rows)  # undefined: no row
    df = pd.DataFrame(RECORDS)
    assert df.groupby("subject")["is_correct"].mean().to_dict() == {"chem": 0.0, "geo": pytest.approx(2 / 3)}


def test_adherence_rules():
    assert metrics.adheres("B. Paris", 0)
    assert not metrics.adheres("", None)
    assert not metrics.adheres("well I think that it might be Paris", 7)  # named too late
    assert not metrics.adheres("Paris Paris Paris Paris Paris Paris", 0)  # degenerate repetition
    assert not metrics.adheres("Paris ###!!!***???", 0)  # mostly symbols
    assert metrics.adheres(None, None) is None


def test_wellformed_answers_need_shape_not_an_option():
    assert metrics.wellformed("Copenhagen", False, letters=False)  # wrong and off-list, but a short answer
    assert metrics.wellformed("Paris is the capital of the country", True, letters=False)  # names an option
    assert not metrics.wellformed("Paris is the capital of the country", False, letters=False)  # too long
    assert not metrics.wellformed("", False, letters=False) and metrics.wellformed(None, None, letters=False) is None
    assert not metrics.wellformed("?? !! ## %%", False, letters=False)  # degenerate
    assert metrics.wellformed("E. Europe", False, letters=True)  # a letter, not one of A-D here: still the shape
    assert not metrics.wellformed("Europe", False, letters=True)
    records = [{"answer_text": "Copenhagen", "answer_wellformed": True, "format_adherent": False},
               {"answer_text": "", "answer_wellformed": False, "format_adherent": False}]
    assert metrics.answer_wellformed(records) == 0.5 and metrics.format_adherence(records) == 0.0


def test_a_reply_to_most_questions_that_names_no_option_is_not_well_formed():
    # what Gemma 3 270M's alpha 1.0 wrote after 6 generations: "Source:" to every short-answer question
    assert metrics.shared_answer(["Source:", "source", "Source :", "Paris"], [False, False, False, True]) == "source"
    assert metrics.shared_answer(["Copenhagen", "Rome", "Oslo"], [False] * 3) is None  # wrong, but each its own
    assert metrics.shared_answer(["Europe"] * 3 + ["Asia"], [True] * 4) is None  # naming an option is answering
    assert metrics.shared_answer(["Europe", "Lima", "Oslo", "Kyiv"], [False] * 4) is None  # 1 of 4: no reply shared
    assert metrics.shared_answer(["Source:", "Lima", "Source:", "Kyiv"], [False] * 4) == "source"  # half
    assert metrics.shared_answer(["Source:", None], [False, None]) is None  # one answered question shares nothing
    assert metrics.shared_answer(["...", "...", "!!"], [False] * 3) is None  # nothing left after normalising
    records = [{"answer_text": t, "format_adherent": a, "answer_wellformed": True}
               for t, a in [("Source:", False), ("source", False), ("Europe", True), ("Lima", False)]]
    metrics.mark_shared_answers(records)
    assert [r["answer_wellformed"] for r in records] == [False, False, True, True]


def test_one_text_cut_short_at_different_words_is_one_shared_reply():
    # Gemma 3 270M's alpha 1.0 short answers at generation 4 of the lr 3e-5 run (README, "A real model"), as counted
    written = [("Source of the following", 22), ("Q:", 16), ("Source of the following element", 13), ("Source of", 5),
               ("Source of the following element?", 4)]
    answers = [text for text, n in written for _ in range(n)]
    assert metrics.shared_answer(answers, [False] * 60) == "source of following element"  # 44 of 60, none alone
    records = [{"answer_text": a, "format_adherent": False, "answer_wellformed": True} for a in answers]
    metrics.mark_shared_answers(records)
    assert sum(r["answer_wellformed"] for r in records) == 16  # "Q:" is another reply, given to 16 of 60
    # a frame followed by each question's own answer is an answer: confidently wrong, not a shared reply
    assert metrics.shared_answer(["It is Rome", "It is Oslo", "It is Lima", "It is Kyiv", "It"], [False] * 5) is None
    assert metrics.shared_answer(["Source of", "Source:", "Lima", "Oslo"], [False] * 4) == "source of"  # half
    assert metrics.shared_answer(["Source", "Sourced", "Lima", "Oslo"], [False] * 4) is None  # cut at words only


def test_text_stats_known_values():
    assert textstats.entropy("a a b b") == pytest.approx(1.0)
    assert textstats.entropy("x") == 0.0 and textstats.entropy("") is None
    assert textstats.distinct_n(["a b a", "c"], 1) == 0.75
    assert textstats.distinct_n(["a b a", "c"], 2) == 1.0
    assert textstats.repetition("a b c d a b c d") == pytest.approx(0.2)
    stats = textstats.text_stats(["a a b b", "The cat. the CAT"])
    assert stats["entropy"] == pytest.approx((1.0 + 2.0) / 2) and stats["entropy_std"] == pytest.approx(0.5)
    assert stats["vocab_size"] == 4.0  # a, b, the, cat
    assert textstats.vocab_share(["The cat sat.", "zzz"], {"the", "cat"}) == 0.5


def test_perplexity_matches_direct_computation(tiny_gpt2):
    from conftest import corpus_lines
    from kcollapse.models import load_model

    model, tokenizer = load_model(tiny_gpt2, device="cpu")
    texts = corpus_lines()[:3]
    nll, n = 0.0, 0
    for t in texts:
        ids = torch.tensor([tokenizer(t)["input_ids"]])
        with torch.no_grad():
            nll += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
        n += ids.shape[1] - 1
    assert textstats.perplexity(model, tokenizer, texts, batch_size=2) == pytest.approx(math.exp(nll / n), rel=1e-5)

    long_text = " ".join(corpus_lines())  # beyond 256 positions: HF-docs sliding window, stride 100
    ids = torch.tensor([tokenizer(long_text)["input_ids"]])
    nll, n, prev_end = 0.0, 0, 0
    for begin in range(0, ids.shape[1], 100):
        end = min(begin + 256, ids.shape[1])
        trg = end - prev_end
        labels = ids[:, begin:end].clone()
        labels[:, :-trg] = -100
        with torch.no_grad():
            loss = model(input_ids=ids[:, begin:end], labels=labels).loss.item()
        scored = int((labels[:, 1:] != -100).sum())
        nll, n, prev_end = nll + loss * scored, n + scored, end
        if end == ids.shape[1]:
            break
    assert textstats.perplexity(model, tokenizer, [long_text], stride=100) == pytest.approx(math.exp(nll / n), rel=1e-4)


def test_judge_mention():
    choices = ["Paris", "London", "New York", "New York City"]
    assert judge_mention("B", choices, letters=True) == (1, 0)
    assert judge_mention("Answer: (D)", choices, letters=True) == (3, 0)
    assert judge_mention("B", choices, letters=False) == (None, None)
    assert judge_mention("I'd say the city of London.", choices) == (1, 5)
    assert judge_mention("new york city, obviously", choices) == (3, 0)  # longest at the same place
    assert judge_mention("London, not Paris", choices) == (1, 0)  # the first named
    assert judge_mention("Berlin", choices) == (None, None) and judge_mention("", choices) == (None, None)
    assert normalize("The Café, São Paulo!") == "cafe sao paulo"
    assert first_line("\n  Paris\nand more") == "Paris"


@pytest.mark.parametrize("answer, judged", [
    ("A city in France, near the coast", None),  # the article, not option A (issue 15 item 6)
    ("A river", None), ("I think it is Rome", 1), ("A", 0), ("A.", 0), ("(A)", 0), ("A) Paris", 0), ("A, Paris", 0),
    ("A Paris", 0),  # the option's own text after the letter: option A
    ("A Rome", 1),  # the article before another option's name: no letter read, the text names Rome
    ("Answer: A", 0), ("B because it is big", 1), ("C. Berlin", 2), ("d", None),
])
def test_letter_answers_are_not_articles(answer, judged):
    assert judge_mention(answer, ["Paris", "Rome", "Berlin", "Madrid"], letters=True)[0] == judged


def test_an_article_opening_is_not_a_well_formed_letter_answer():
    assert not metrics.wellformed("A city in France", False, letters=True)
    assert metrics.wellformed("A", False, letters=True) and metrics.wellformed("B Rome", False, letters=True)
    rec = {"answer_text": "A city in France", "choices": ["Paris", "Rome"], "correct_index": 0}
    judged, position = judge_mention(rec["answer_text"], rec["choices"], letters=True)
    assert judged is None and not metrics.adheres(rec["answer_text"], position)  # judged accuracy not inflated
