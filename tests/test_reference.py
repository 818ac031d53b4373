"""import-reference on small logs in the paper's layout (tests/fixtures/reference_logs) and hand-made files."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from kcollapse.config import read_yaml, validate
from kcollapse.errors import UserError
from kcollapse.io import read_jsonl
from kcollapse.reference import answer_metrics, import_command, split_name
from kcollapse.report import compare_command, write_report
from kcollapse.stages import StageRules, classify_run

LOGS = Path(__file__).parent / "fixtures" / "reference_logs"
KNOWN = ["multiple_choice", "multiple_choice_few_shot", "short_answer", "no_instruction", "cloze"]
RECORD_FIELDS = {"id", "subject", "format", "question", "choices", "correct_index", "scores", "is_greedy",
                 "predicted_index", "is_correct", "confidence", "answer_text", "judged_index"}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    out = tmp_path_factory.mktemp("imp") / "run"
    warnings = import_command(LOGS, out)
    return out, warnings, pd.DataFrame(read_jsonl(out / "metrics.jsonl"))


def _value(df, arm, g, metric, fmt=None, subject=None):
    sel = (df.arm == arm) & (df.generation == g) & (df.metric == metric)
    sel &= df.format.isna() if fmt is None else df.format == fmt
    sel &= df.subject.isna() if subject is None else df.subject == subject
    assert sel.sum() == 1, (arm, g, metric, fmt, subject)
    return df.loc[sel, "value"].item()


def test_split_name_with_underscores():
    assert split_name("high_school_geography_multiple_choice_few_shot_gen3.json", KNOWN) == \
        ("high_school_geography", "multiple_choice_few_shot", 3)
    assert split_name("global_facts_multiple_choice_gen12.json", KNOWN) == ("global_facts", "multiple_choice", 12)
    assert split_name("world_religions_no_instruction_gen0.json", KNOWN) == ("world_religions", "no_instruction", 0)
    assert split_name("global_facts_essay_gen0.json", KNOWN) is None
    assert split_name("short_answer_gen0.json", KNOWN) is None  # a format with no subject
    assert split_name("notes.json", KNOWN) is None


def test_import_layout_and_warnings(imported):
    out, warnings, df = imported
    assert any("ratio_25: generation(s) 1 missing" in w for w in warnings)
    assert any("ratio_100 generation 2: missing global_facts/short_answer" in w for w in warnings)
    assert set(df.arm) == {"ratio_25", "ratio_100"}
    assert list(df.columns) == ["arm", "generation", "metric", "value", "format", "subject"]
    recs = read_jsonl(out / "arms/ratio_100/gen_1/answers/high_school_geography__multiple_choice_few_shot.jsonl")
    assert len(recs) == 6 and RECORD_FIELDS <= set(recs[0]) and recs[0]["id"] == "high_school_geography/0"
    assert recs[0]["judge_answer"] == 3 and recs[0]["is_greedy"] is True
    syn = read_jsonl(out / "arms/ratio_25/gen_0/synthetic.jsonl")
    assert [r["source"] for r in syn] == ["real"] * 6 + ["synthetic"] * 2  # int((1 - 0.25) * 8) real first
    assert {r["source"] for r in read_jsonl(out / "arms/ratio_100/gen_0/synthetic.jsonl")} == {"synthetic"}
    cfg = validate(read_yaml(out / "config.yaml"), "imported config")
    assert [a.name for a in cfg.arms] == ["ratio_25", "ratio_100"] and cfg.arms[1].synthetic_ratio == 1.0


def test_import_metric_definitions(imported):
    _, _, df = imported
    # ratio_100 gen 1, one subject x format: 4 of 6 right (probs .6 on A), 2 wrong (probs .7 on B), greedy picks
    args = ("ratio_100", 1)
    f, s = "multiple_choice", "global_facts"
    assert _value(df, *args, "accuracy", f, s) == pytest.approx(4 / 6)
    assert _value(df, *args, "greedy_rate", f, s) == pytest.approx(1.0)
    assert _value(df, *args, "max_freq", f, s) == pytest.approx(4 / 6)
    assert _value(df, *args, "confidence", f, s) == pytest.approx((4 * 0.6 + 2 * 0.7) / 6)
    assert _value(df, *args, "answer_words", f, s) == pytest.approx(2.0)
    assert _value(df, *args, "answer_repetition", f, s) == pytest.approx(0.0)
    assert _value(df, *args, "judge_mean", f, s) == pytest.approx((4 * 3 + 2 * 1) / 6)
    assert _value(df, *args, "accuracy", f) == pytest.approx(8 / 12)  # subject null = all questions
    for subject in (None, "synthetic"):
        assert _value(df, "ratio_100", 0, "entropy", None, subject) > 0
    assert _value(df, "ratio_25", 0, "distinct_1", None, "real") > 0
    assert ((df.arm == "ratio_100") & (df.subject == "real")).sum() == 0  # 100 % synthetic: no real part


def test_answer_metrics_exact():
    qs = [
        {"probabilities": [2, 1, 1, 0], "predicted_index": 0, "is_correct": True, "is_greedy": [True, False, False, False],
         "actual_answer": "a b c d a b c d"},
        {"probabilities": [1, 3, 0, 0], "predicted_index": 1, "is_correct": True, "is_greedy": [False, False, True, False],
         "actual_answer": "B"},
        {"probabilities": [1, 1, 1, 1], "predicted_index": 0, "is_correct": False, "is_greedy": [True, False, False, False],
         "actual_answer": "", "judge_answer": 2},
    ]
    m = answer_metrics(qs)
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["greedy_rate"] == pytest.approx(1 / 2)  # of the correct answers, one's pick is greedy
    assert m["max_freq"] == pytest.approx(2 / 3)
    assert m["confidence"] == pytest.approx((0.5 + 0.75 + 0.25) / 3)
    assert m["answer_words"] == pytest.approx(9 / 3)
    assert m["answer_repetition"] == pytest.approx((1 - 4 / 5) / 3)  # 5 four-grams, 4 distinct; others none
    assert m["judge_mean"] == 2
    assert "greedy_rate" not in answer_metrics([qs[2]])  # undefined without a correct answer


def test_stages_report_compare_work_on_import(imported, tmp_path):
    out, _, _ = imported
    result = classify_run(out, StageRules(n_boot=200))
    f = result["arms"]["ratio_100"]["formats"]
    assert f["multiple_choice"]["stages"][-1] == "C" and f["multiple_choice"]["onset_B"] is not None
    assert result["arms"]["ratio_25"]["formats"]["multiple_choice"]["onset_B"] is None
    for arm in result["arms"].values():  # B onset only where accuracy fell, C only where the answers broke
        for fmt in arm["formats"].values():
            at = {p["generation"]: p for p in fmt["generations"]}
            base = fmt["baseline"]["accuracy"]
            if fmt["onset_B"] is not None:
                p = at[fmt["onset_B"]]
                assert p["knowledge_loss"] and p["accuracy"] < base and p["accuracy_diff_ci"][1] < 0
            if fmt["onset_C"] is not None:
                reasons = " ".join(at[fmt["onset_C"]]["reasons"])
                assert any(k in reasons for k in ("well-formed", "repetition", "length", "fluency"))
    sa = f["short_answer"]  # generation 2: accuracy 0.5 vs 0.83 on a handful of questions is not significant
    assert sa["onset_B"] == 3 and not sa["generations"][2]["knowledge_loss"]
    assert write_report(out).is_file()
    compare_command([out], tmp_path / "cmp")
    assert (tmp_path / "cmp" / "comparison.csv").is_file()


def _copy_logs(tmp_path):
    logs = tmp_path / "logs"
    shutil.copytree(LOGS, logs)
    return logs


@pytest.mark.parametrize("name, content, match", [
    ("ratio_25_gen_0/mmlu/global_facts_multiple_choice_gen0.json", "{not json", "cannot read JSON"),
    ("ratio_25_gen_0/mmlu/global_facts_multiple_choice_gen0.json", '[{"choices": []}]', "item 0 lacks"),
    ("ratio_25_gen_0/mmlu/global_facts_multiple_choice_gen0.json", "{}", "non-empty JSON list"),
    ("ratio_25_gen_0/train.json", '{"texts": 1}', "JSON list of strings"),
])
def test_malformed_file_is_one_line_naming_it(tmp_path, name, content, match):
    logs = _copy_logs(tmp_path)
    (logs / name).write_text(content)
    with pytest.raises(UserError, match=match) as e:
        import_command(logs, tmp_path / "out")
    assert name in str(e.value) and "\n" not in str(e.value)


def test_cli_errors_and_unknown_files(tmp_path):
    from kcollapse.cli import app

    logs = _copy_logs(tmp_path)
    (logs / "ratio_25_gen_0" / "mmlu" / "global_facts_essay_gen0.json").write_text("[]")
    (logs / "ratio_25_gen_0" / "train.json").unlink()
    runner = CliRunner()
    res = runner.invoke(app, ["import-reference", str(logs), "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert "global_facts_essay_gen0.json" in res.output and "train.json: missing" in res.output
    res = runner.invoke(app, ["import-reference", str(logs), "--out", str(tmp_path / "run")])
    assert res.exit_code == 2 and "already exists" in res.output
    res = runner.invoke(app, ["import-reference", str(tmp_path), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "no ratio_<pct>_gen_<g> directories" in res.output
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["arm"].startswith("ratio_")


def test_a_reply_shared_by_most_questions_is_no_answer_in_imported_logs(imported, tmp_path):
    """The paper's logs carry no `answer_wellformed`: stages applies the evaluator's shared-reply rule to them
    (metrics.shared_answer over the format's questions, every subject file together)."""
    logs = _copy_logs(tmp_path)
    # what Gemma 3 270M wrote after 6 generations (lr 3e-5): "Source:" to every question; at generation 4, one text cut
    # short at different words (here each cut goes to a third of the questions: none alone to half)
    cuts = {2: ["Source:"], 3: ["Source of", "Source of the following", "Source of the following element?"]}
    for g in (2, 3):
        for path in (logs / f"ratio_25_gen_{g}" / "mmlu").glob("*_short_answer_*.json"):
            questions = json.loads(path.read_text())
            for k, q in enumerate(questions):
                q["actual_answer"] = cuts[g][k % len(cuts[g])]
            path.write_text(json.dumps(questions))
    import_command(logs, tmp_path / "run")
    recs = read_jsonl(tmp_path / "run/arms/ratio_25/gen_2/answers/global_facts__short_answer.jsonl")
    assert {r["answer_text"] for r in recs} == {"Source:"} and "answer_wellformed" not in recs[0]
    before = classify_run(imported[0], StageRules(n_boot=200))["arms"]["ratio_25"]["formats"]["short_answer"]
    after = classify_run(tmp_path / "run", StageRules(n_boot=200))["arms"]["ratio_25"]["formats"]["short_answer"]
    assert before["onset_C"] is None and before["generations"][0]["answer_wellformed"] == 1.0
    assert after["onset_C"] == 2 and after["stages"] == "ACC"
    assert [p["answer_wellformed"] for p in after["generations"]] == [1.0, 0.0, 0.0]
    assert after["generations"][1]["reasons"][0] == "well-formed answers 1.00 -> 0.00"
