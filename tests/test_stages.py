"""The stage classifier on hand-made runs whose stages are known (noisy and non-monotone included)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from kc_fixture_runs import NOISY, NOISY_MODEL, make_run, write_jsonl  # noqa: E402

from kcollapse.errors import UserError  # noqa: E402
from kcollapse.io import read_jsonl  # noqa: E402
from kcollapse.stages import StageRules, classify_run, load_rules, onset, stages_command  # noqa: E402

FAST = StageRules(n_boot=300)


def _fmt(result, fmt, arm="alpha_1.0"):
    return result["arms"][arm]["formats"][fmt]


def test_noisy_run_with_answers(tmp_path):
    run = make_run(tmp_path / "run", NOISY, model=NOISY_MODEL)
    result = classify_run(run, FAST)
    mc, sa = _fmt(result, "multiple_choice"), _fmt(result, "short_answer")
    assert mc["stages"] == "AAABABBB"  # the blip at 3 is B, generation 4 recovers, B for good from 5
    assert (mc["onset_B"], mc["onset_C"]) == (5, None)  # one noisy generation starts nothing
    assert sa["stages"] == "AAAAACCC"
    assert mc["knowledge_measurable"] is True and sa["knowledge_measurable"] is True
    assert (sa["onset_B"], sa["onset_C"]) == (5, 5)
    p3 = mc["generations"][3]
    assert p3["method"] == "bootstrap" and p3["retention_ci"][1] < 0.8 and p3["accuracy_diff_ci"][1] < 0
    assert mc["generations"][1]["retention_ci"][0] < 1 < mc["generations"][1]["retention_ci"][1]
    assert "well-formed answers" in sa["generations"][5]["reasons"][0]
    model = result["arms"]["alpha_1.0"]["model_centric"]
    assert model["warnings"] == {"entropy": 2, "perplexity_heldout": 5}  # model generations
    assert model["metrics"]["entropy"][0] == 5.0  # model 0's text (generation 1's mix) is the baseline
    assert mc["lead_time"] == 3 and sa["lead_time"] == 3 and "model generations" in mc["lead_time_definition"]
    assert result["last_generation"] == 7


def test_wrong_but_well_formed_answers_are_B_not_C(tmp_path):
    """"Copenhagen" for Andorra's capital names no option, yet it is a fluent answer of the asked kind: confidently
    wrong (B). Requiring an option instead (format_signal: format_adherence) makes the same answers C."""
    run = make_run(tmp_path / "run", {"a": {"short_answer": {"acc": [0.9, 0.9, 0.4, 0.4, 0.4], "words": [1] * 5}}})
    for path in run.glob("arms/a/gen_*/answers/*.jsonl"):
        records = read_jsonl(path)
        for r in records:
            if int(path.parent.parent.name[4:]) >= 2 and not r["is_correct"]:
                r.update(answer_text="Copenhagen", judged_index=None, format_adherent=False, answer_wellformed=True)
        write_jsonl(path, records)
    sa = _fmt(classify_run(run, FAST), "short_answer", "a")
    assert sa["stages"] == "AABBB" and sa["onset_C"] is None
    assert sa["generations"][3]["format_adherence"] < 0.5 < 0.95 < sa["generations"][3]["answer_wellformed"]
    strict = _fmt(classify_run(run, FAST.model_copy(update={"format_signal": "format_adherence"})), "short_answer", "a")
    assert strict["stages"] == "AACCC" and "format adherence" in strict["generations"][2]["reasons"][0]


def test_metrics_only_fallback(tmp_path):
    run = make_run(tmp_path / "run", NOISY, answers=False)
    result = classify_run(run, FAST)
    mc, sa = _fmt(result, "multiple_choice"), _fmt(result, "short_answer")
    assert mc["stages"] == "AAABABBB" and sa["stages"] == "AAAAACCC"
    assert mc["generations"][3]["method"] == "metrics" and mc["generations"][3]["retention_ci"] is None
    assert mc["lead_time"] is None  # no model-centric metrics in this run


def _answers(run, g, correct, fmt="multiple_choice", text="B. paris"):
    """Answer records with the fields the evaluator writes, its judge and format rules applied to `text`."""
    from kcollapse.evaluate import freetext, metrics

    choices, letters = ["w", "x", "y", "z"], fmt != "short_answer"
    judged, position = freetext.judge_mention(text, choices, letters=letters)
    adherent = metrics.adheres(text, position)
    write_jsonl(run / "arms" / "a" / f"gen_{g}" / "answers" / f"geo__{fmt}.jsonl", [
        {"id": f"q{i}", "subject": "geo", "format": fmt, "question": "?", "choices": choices,
         "correct_index": 0, "scores": [0, 0, 0, 0], "is_greedy": True, "predicted_index": 0 if c else 1,
         "is_correct": bool(c), "confidence": 0.7, "answer_text": text, "judged_index": judged,
         "format_adherent": adherent, "answer_wellformed": metrics.wellformed(text, adherent, letters)}
        for i, c in enumerate(correct)])


def _metrics(run, rows, arm="a"):
    """rows: (generation, metric, value, format[, subject]) as the evaluator names them."""
    write_jsonl(run / "metrics.jsonl", [{"arm": arm, "generation": r[0], "metric": r[1], "value": r[2], "format": r[3],
                                          "subject": r[4] if len(r) > 4 else None} for r in rows])


def test_drop_that_is_not_significant_stays_A(tmp_path):
    run = tmp_path / "run"
    gen0 = [1] * 9 + [0] * 3
    gen1 = [0, 0, 0] + [1] * 6 + [1, 0, 0]  # three lost, one gained: retention 0.67 < 0.8, but noise
    _answers(run, 0, gen0)
    _answers(run, 1, gen1)
    _metrics(run, [(0, "accuracy", 0.75, "multiple_choice"), (1, "accuracy", 7 / 12, "multiple_choice")])
    p1 = _fmt(classify_run(run, FAST), "multiple_choice", "a")["generations"][1]
    assert p1["retention"] < 0.8 and p1["accuracy_diff_ci"][1] >= 0 and p1["stage"] == "A"
    # metrics alone cannot tell noise from a drop: the same numbers without answers say B
    for path in run.glob("arms/a/gen_*/answers/*.jsonl"):
        path.unlink()
    assert _fmt(classify_run(run, FAST), "multiple_choice", "a")["stages"] == "AB"


def test_baseline_at_chance_never_collapses(tmp_path):
    run = tmp_path / "run"
    _metrics(run, [(0, "accuracy", 0.27, "no_instruction"), (1, "accuracy", 0.2, "no_instruction"),
                   (2, "accuracy", 0.1, "no_instruction")])
    f = _fmt(classify_run(run, FAST), "no_instruction", "a")
    assert f["stages"] == "AAA" and f["generations"][1]["retention"] is None
    assert f["onset_B"] is None and f["knowledge_measurable"] is False


def test_fluency_and_length_break_are_C(tmp_path):
    run = tmp_path / "run"
    rows = [(g, "accuracy", 0.8, "short_answer") for g in range(4)]
    rows += [(g, "answer_words", w, "short_answer") for g, w in enumerate([5, 5, 5, 30])]
    rows += [(g, "fluency", v, None, "answers") for g, v in enumerate([0.98, 0.97, 0.6, 0.55])]
    rows += [(g, "fluency", 0.99, None, "synthetic") for g in range(1, 4)]  # the training text's: not the answers
    _metrics(run, rows)
    f = _fmt(classify_run(run, FAST), "short_answer", "a")
    assert f["stages"] == "AACC" and f["onset_C"] == 2
    assert any("fluency" in r for r in f["generations"][2]["reasons"])
    assert any("answer length" in r for r in f["generations"][3]["reasons"])


def test_format_break_with_accuracy_held_is_C_without_B(tmp_path):
    """Issue 15 item 4: answers grew long and lost their format while the facts stayed (0.80 vs 0.79): C, and B's
    onset is only where B's own condition (accuracy retention) holds: never here."""
    arms = {"a": {"short_answer": {"acc": [0.8, 0.79, 0.8, 0.81, 0.8], "adh": [0.97, 0.97, 0.3, 0.2, 0.2],
                                   "words": [3, 3, 12, 12, 12]}}}
    f = _fmt(classify_run(make_run(tmp_path / "run", arms), FAST), "short_answer", "a")
    assert f["stages"] == "AACCC" and f["onset_C"] == 2 and f["onset_B"] is None
    assert not any(p["knowledge_loss"] for p in f["generations"])
    arms["a"]["short_answer"]["acc"] = [0.8, 0.79, 0.8, 0.4, 0.35]  # the facts go later: B onset there
    f = _fmt(classify_run(make_run(tmp_path / "run2", arms), FAST), "short_answer", "a")
    assert f["stages"] == "AACCC" and (f["onset_B"], f["onset_C"]) == (3, 2)


def test_format_adherence_is_the_metric_rows_definition(tmp_path):
    """The bootstrap path reads the record's format_adherent (named within the first words, not degenerate), the
    definition the `format_adherence` row has; an answer naming its option in the 9th word is not adherent."""
    run = tmp_path / "run"
    late = "well I would have to say that it is w"
    for g, text in ((0, "w"), (1, late)):
        _answers(run, g, [1] * 12, fmt="short_answer", text=text)
    _metrics(run, [(0, "accuracy", 1.0, "short_answer"), (1, "accuracy", 1.0, "short_answer")])
    p1 = _fmt(classify_run(run, FAST), "short_answer", "a")["generations"][1]
    assert p1["format_adherence"] == 0.0  # judged (names option 0) but not adherent
    for path in run.glob("arms/a/gen_*/answers/*.jsonl"):  # records written before the field: the same rule
        write_jsonl(path, [{k: v for k, v in r.items() if k != "format_adherent"} for r in read_jsonl(path)])
    assert _fmt(classify_run(run, FAST), "short_answer", "a")["generations"][1]["format_adherence"] == 0.0


def test_missing_baseline_is_reported_not_fatal(tmp_path):
    run = tmp_path / "run"
    _metrics(run, [(1, "accuracy", 0.8, "multiple_choice"), (2, "accuracy", 0.3, "multiple_choice")])
    f = _fmt(classify_run(run, FAST), "multiple_choice", "a")
    assert f["error"] == "no generation-0 baseline" and f["stages"] == "??"


def test_heldout_subject_rule(tmp_path):
    run = make_run(tmp_path / "run", NOISY)
    result = classify_run(run, StageRules(n_boot=200, subject="split:heldout"))
    mc = _fmt(result, "multiple_choice")
    assert mc["generations"][0]["n"] == 50  # every 4th of 200 questions is held out
    assert mc["stages"][-1] == "B"


def test_fixture_rows_are_what_the_evaluator_writes(tmp_path):
    """The hand-made runs above may only use metric names and subjects the real evaluator writes
    (test_stages_real.py checks the evaluator's side on real models)."""
    from kcollapse.evaluate.metrics import TASK_METRICS

    run = make_run(tmp_path / "run", NOISY, model={"alpha_1.0": {**NOISY_MODEL["alpha_1.0"], "fluency": [1.0] * 8}})
    rows = read_jsonl(run / "metrics.jsonl")
    text = {"entropy", "entropy_std", "distinct_1", "distinct_2", "repetition_rate", "vocab_size"}
    for r in rows:
        if r["format"] is not None:
            assert r["metric"] in TASK_METRICS
        elif r["metric"] in text:
            assert r["subject"] in (None, "synthetic") and r["generation"] >= 1
        else:
            assert (r["metric"], r["subject"]) in {("perplexity_heldout", None), ("fluency", "answers")}
    record = read_jsonl(next(run.glob("arms/*/gen_0/answers/*.jsonl")))[0]
    assert {"format_adherent", "answer_wellformed", "judged_index", "choices", "is_correct"} <= set(record)


def test_onset_persistence():
    gens = [0, 1, 2, 3, 4, 5]
    assert onset(gens, [False, True, False, True, True, False], 2) == 3
    assert onset(gens, [False, False, False, False, False, True], 2) == 5  # end of run: what is left suffices
    assert onset(gens, [False] * 6, 2) is None
    assert onset(gens, [False, True, False, False, False, False], 1) == 1


def test_rules_from_config_section_and_file(tmp_path):
    run = make_run(tmp_path / "run", NOISY, extra_config="stages:\n  retention_b: 0.2\n  persist: 1\n")
    rules = load_rules(run)
    assert rules.retention_b == 0.2 and rules.persist == 1 and rules.ci == 0.95
    (tmp_path / "r.yaml").write_text("retention_b: 0.5\nn_boot: 200\n")
    assert load_rules(run, tmp_path / "r.yaml").retention_b == 0.5
    result = classify_run(run, load_rules(run))
    assert _fmt(result, "multiple_choice")["stages"] == "AAAAAAAB"  # only the last generation retains < 0.2
    (tmp_path / "bad.yaml").write_text("retention_bb: 1\n")
    with pytest.raises(UserError, match="retention_bb"):
        load_rules(run, tmp_path / "bad.yaml")


def test_stages_command_writes_json_and_table(tmp_path, capsys):
    run = make_run(tmp_path / "run", NOISY, model=NOISY_MODEL, n_questions=60)
    stages_command(run)
    data = json.loads((run / "stages.json").read_text())
    assert set(data["arms"]["alpha_1.0"]["formats"]) == {"multiple_choice", "short_answer"}
    assert data["rules"]["retention_b"] == 0.8
    out = capsys.readouterr().out
    assert "alpha_1.0" in out and "gen 5" in out


@pytest.mark.parametrize("content, match", [
    ('{"arm": "a", "generation": 0}\n', "lack field"),
    ("not json\n", "line 1 is not valid JSON"),
    ("", "no metric rows"),
])
def test_malformed_metrics_name_the_file(tmp_path, content, match):
    (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(UserError, match=match) as e:
        classify_run(tmp_path, FAST)
    assert "metrics.jsonl" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="not found"):
        classify_run(tmp_path / "nope", FAST)


def test_table_prints_names_as_text(tmp_path, capsys):
    _metrics(tmp_path, [(0, "accuracy", 0.8, "[/]"), (1, "accuracy", 0.8, "[/]")], arm="[bold]x\x1b[31m")
    stages_command(tmp_path)  # a name that is rich markup or a terminal escape neither crashes nor styles
    out = capsys.readouterr().out
    assert "[/]" in out and "[bold]x" in out and "\x1b" not in out
