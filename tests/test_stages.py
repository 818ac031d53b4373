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
    assert model["warnings"] == {"entropy": 2, "perplexity": 5}
    assert mc["lead_time"] == 3 and sa["lead_time"] == 3
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
    write_jsonl(run / "arms" / "a" / f"gen_{g}" / "answers" / f"geo__{fmt}.jsonl", [
        {"id": f"q{i}", "subject": "geo", "format": fmt, "question": "?", "choices": ["w", "x", "y", "z"],
         "correct_index": 0, "scores": [0, 0, 0, 0], "is_greedy": True, "predicted_index": 0 if c else 1,
         "is_correct": bool(c), "confidence": 0.7, "answer_text": text, "judged_index": 0 if c else 1}
        for i, c in enumerate(correct)])


def _metrics(run, rows, arm="a"):
    write_jsonl(run / "metrics.jsonl", [{"arm": arm, "generation": g, "metric": m, "value": v, "format": f,
                                          "subject": None} for g, m, v, f in rows])


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
    rows += [(g, "fluency", v, None) for g, v in enumerate([2.8, 2.7, 1.5, 1.4])]
    _metrics(run, rows)
    f = _fmt(classify_run(run, FAST), "short_answer", "a")
    assert f["stages"] == "AACC" and f["onset_C"] == 2
    assert any("fluency" in r for r in f["generations"][2]["reasons"])
    assert any("answer length" in r for r in f["generations"][3]["reasons"])


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
