"""Format dependence (issue 16) on what the real evaluator writes: hand-set models that lose facts in one format
and not in another, or in both at once.

Bigram checkpoints (fixtures/bigram_models.py) answer short_answer from the row of "Answer:" and cloze from the
row of each statement's own last word, so each format's knowledge is set by hand. Generation 0 knows 22 of 24
facts in both. Arm "split": short answer forgets 3/4 of them at generation 3 while cloze never does (a real
format x generation interaction, and a censored cloze onset). Arm "together": both formats forget at generation 3
(different questions, about the same share). Arm "drift": from generation 1 short answer forgets 3 facts (retention
0.875, short of B) and cloze learns its 2 missing ones: the formats move apart and nothing collapses. multiple_choice is asked too: a bigram model cannot map letters to
options, so it sits at chance and must be left out as not measurable.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from bigram_models import benchmark, save_model, vocabulary  # noqa: E402

from kcollapse.config import EvalConfig  # noqa: E402
from kcollapse.evaluate import evaluate, load_benchmark  # noqa: E402
from kcollapse.io import read_jsonl, write_jsonl  # noqa: E402
from kcollapse.models import load_model  # noqa: E402
from kcollapse.stages import StageRules, classify_run, stages_command  # noqa: E402

N_Q = 24
GEN0 = set(range(N_Q)) - {1, 2}
KEPT = set(range(0, N_Q, 4))  # 6 of 24: accuracy at chance
KEPT_OTHER = {3, 5, 7, 11, 15, 19, 23}  # 7 of 24, other questions: formats that lose alike, not identically
HEALTHY = dict(known=GEN0, cloze_known=GEN0)
ARMS = {  # generation 1..5 (generation 0 is HEALTHY, shared)
    "split": [HEALTHY, HEALTHY] + [dict(known=KEPT, cloze_known=GEN0)] * 3,
    "together": [HEALTHY, HEALTHY] + [dict(known=KEPT, cloze_known=KEPT_OTHER)] * 3,
    "drift": [dict(known=GEN0 - {0, 4, 8}, cloze_known=set(range(N_Q)))] * 5,  # apart, neither near B
}
RULES = StageRules(n_boot=300)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    words = vocabulary(N_Q, cloze=True)
    cfg = EvalConfig(benchmark=str(benchmark(root / "bench.jsonl", N_Q, statements=True)),
                     formats=["short_answer", "cloze", "multiple_choice"], free_text_tokens=4, batch_size=32)
    items = load_benchmark(cfg)
    out, rows, models = root / "run", [], {}

    def model(spec):
        key = json.dumps({k: sorted(v) for k, v in spec.items()}, sort_keys=True)
        if key not in models:
            models[key] = load_model(save_model(root / f"m{len(models)}", words, n_questions=N_Q, **spec), device="cpu")
        return models[key]

    def evaluate_into(arm, g, spec):  # as the loop lays it out: generation 0 shared, answers per arm x generation
        m, tok = model(spec)
        return [{"arm": arm, "generation": g, **r}
                for r in evaluate(m, tok, cfg, items, answers_dir=out / "arms" / arm / f"gen_{g}" / "answers")]

    for arm, specs in ARMS.items():
        rows += evaluate_into(arm, 0, HEALTHY)
        for g, spec in enumerate(specs, start=1):
            rows += evaluate_into(arm, g, spec)
    write_jsonl(out / "metrics.jsonl", rows)
    return out


@pytest.fixture(scope="module")
def result(run):
    return classify_run(run, RULES)


def test_the_fixture_is_what_was_built(run):
    acc = {(r["arm"], r["generation"], r["format"]): r["value"] for r in read_jsonl(run / "metrics.jsonl")
           if r["metric"] == "accuracy" and r["subject"] is None}
    assert acc[("split", 0, "short_answer")] == acc[("split", 0, "cloze")] == pytest.approx(22 / 24)
    assert acc[("split", 5, "short_answer")] == pytest.approx(6 / 24) and acc[("split", 5, "cloze")] == pytest.approx(22 / 24)
    assert acc[("together", 5, "cloze")] == pytest.approx(7 / 24)
    assert acc[("split", 0, "multiple_choice")] == pytest.approx(0.25)


def test_one_format_collapses_the_other_not(result):
    d = result["arms"]["split"]["format_dependence"]
    assert d["tested_formats"] == ["short_answer", "cloze"]
    assert "multiple_choice" in d["excluded"] and "at chance" in d["excluded"]["multiple_choice"]
    assert d["formats"]["multiple_choice"]["onset_B"] is None
    inter = d["interaction"]
    assert inter["n_questions"] == N_Q and inter["generations"] == [0, 1, 2, 3, 4, 5]
    assert 1 <= inter["accuracy"]["df"] <= 5 and inter["accuracy"]["p_value"] < 0.05  # at most (2 - 1) x (6 - 1)
    assert inter["logistic"]["df"] == 1 and inter["logistic"]["p_value"] < 0.05
    assert inter["logistic"]["log_odds_per_generation"]["short_answer"] < 0
    assert (inter["anova"]["df1"], inter["anova"]["df2"]) == (5, 2 * 6 * N_Q - 12) and inter["anova"]["p_value"] < 0.05
    b = {f: d["formats"][f]["onset_B"] for f in ("short_answer", "cloze")}
    assert (b["short_answer"]["generation"], b["short_answer"]["ci"]) == (3, [3.0, 3.0])
    assert any(x["stage"] == "B" and set(x["formats"]) == {"short_answer", "cloze"} for x in d["non_overlapping"])
    assert d["format_dependent"] is True and d["verdict"].startswith("format dependence found")


def test_a_format_that_never_collapses_is_an_open_bound(result):
    cloze = result["arms"]["split"]["format_dependence"]["formats"]["cloze"]["onset_B"]
    assert cloze["generation"] is None and not cloze["reached"]
    assert cloze["ci"] == [5.0, None] and cloze["ci_kind"] == "lower bound"
    assert cloze["text"] == ">= 5 (not reached) [5, ∞)"


def test_formats_that_degrade_together_show_no_interaction(result):
    d = result["arms"]["together"]["format_dependence"]
    assert all(d["interaction"][t]["p_value"] > 0.05 for t in ("accuracy", "logistic", "anova"))
    on = {f: d["formats"][f]["onset_B"] for f in ("short_answer", "cloze")}
    assert on["short_answer"]["generation"] == on["cloze"]["generation"] == 3
    assert d["non_overlapping"] == [] and d["format_dependent"] is False
    assert d["verdict"].startswith("this run found no format dependence")


def test_formats_that_move_apart_without_collapsing_are_told_from_a_collapse(result):
    d = result["arms"]["drift"]["format_dependence"]
    assert d["interaction"]["accuracy"]["p_value"] < 0.05 and d["non_overlapping"] == []
    assert not any(d["formats"][f][s]["reached"] for f in ("short_answer", "cloze") for s in ("onset_B", "onset_C"))
    assert d["format_dependent"] is True and d["verdict"].startswith("format dependence found")
    assert d["verdict"].endswith("; no format reached B or C (the formats' accuracies moved apart; nothing collapsed)")
    assert "nothing collapsed" not in result["arms"]["split"]["format_dependence"]["verdict"]


def _answers(run: Path, arm: str, formats) -> pd.DataFrame:
    """The balanced long frame read straight from the answers files (independently of kcollapse's loaders)."""
    rows = [{"question": r["id"], "format": f, "generation": g, "correct": float(r["is_correct"])}
            for f in formats for g in range(6)
            for r in read_jsonl(run / "arms" / arm / f"gen_{g}" / "answers" / f"facts__{f}.jsonl")]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("arm", ["split", "together"])
def test_statistics_match_an_independent_computation(run, result, arm):
    """ANOVA F from cell means (balanced design) with scipy's F tail; the logistic Wald statistic from a numpy
    Newton fit and the question-clustered sandwich (statsmodels' small-sample factor G/(G-1) (N-1)/(N-K))."""
    df = _answers(run, arm, ["short_answer", "cloze"])
    inter = result["arms"][arm]["format_dependence"]["interaction"]
    y = df["correct"].to_numpy()
    cell = df.groupby(["format", "generation"])["correct"].transform("mean").to_numpy()
    fm = df.groupby("format")["correct"].transform("mean").to_numpy()
    gm = df.groupby("generation")["correct"].transform("mean").to_numpy()
    ss_int, ss_res = ((cell - fm - gm + y.mean()) ** 2).sum(), ((y - cell) ** 2).sum()
    df1, df2 = (2 - 1) * (6 - 1), len(y) - 2 * 6
    f_value = (ss_int / df1) / (ss_res / df2)
    assert inter["anova"]["F"] == pytest.approx(f_value, rel=1e-6)
    assert inter["anova"]["p_value"] == pytest.approx(sps.f.sf(f_value, df1, df2), rel=1e-6)

    cloze = (df["format"] == "cloze").to_numpy(float)  # reference level: cloze (sorted first)
    gen = df["generation"].to_numpy(float)
    x = np.column_stack([np.ones_like(y), 1 - cloze, gen, (1 - cloze) * gen])
    beta = np.zeros(4)
    for _ in range(50):
        mu = 1 / (1 + np.exp(-x @ beta))
        beta += np.linalg.solve(x.T @ (x * (mu * (1 - mu))[:, None]), x.T @ (y - mu))
    mu = 1 / (1 + np.exp(-x @ beta))
    bread = np.linalg.inv(x.T @ (x * (mu * (1 - mu))[:, None]))
    scores = pd.DataFrame(x * (y - mu)[:, None]).groupby(df["question"].to_numpy()).sum().to_numpy()
    n, k, g = len(y), x.shape[1], len(scores)
    cov = bread @ (scores.T @ scores) @ bread * g / (g - 1) * (n - 1) / (n - k)
    wald = beta[3] ** 2 / cov[3, 3]
    assert inter["logistic"]["statistic"] == pytest.approx(wald, rel=1e-4)
    assert inter["logistic"]["p_value"] == pytest.approx(sps.chi2.sf(wald, 1), rel=1e-4)

    # on accuracy: least squares on format x generation cells (both factors), the same clustered sandwich
    gens = sorted(df["generation"].unique())
    dummies = [(gen == g).astype(float) for g in gens[1:]]
    x = np.column_stack([np.ones_like(y), 1 - cloze, *dummies, *[(1 - cloze) * d for d in dummies]])
    beta = np.linalg.lstsq(x, y, rcond=None)[0]
    bread = np.linalg.inv(x.T @ x)
    scores = pd.DataFrame(x * (y - x @ beta)[:, None]).groupby(df["question"].to_numpy()).sum().to_numpy()
    n, k, g = len(y), x.shape[1], len(scores)
    cov = bread @ (scores.T @ scores) @ bread * g / (g - 1) * (n - 1) / (n - k)
    t = slice(2 + len(dummies), k)  # the interaction terms
    # cells every question answers alike have no variance: the test runs on the directions that have some
    u, sv, _ = np.linalg.svd(cov[t, t])
    rank = int((sv > 1e-8 * sv[0]).sum())
    wald = float(((u[:, :rank].T @ beta[t]) ** 2 / sv[:rank]).sum())
    assert inter["accuracy"]["df"] == rank and (rank < len(dummies)) == ("no variance" in inter["accuracy"].get("note", ""))
    assert inter["accuracy"]["statistic"] == pytest.approx(wald, rel=1e-4)
    assert inter["accuracy"]["p_value"] == pytest.approx(sps.chi2.sf(wald, rank), rel=1e-4)


def test_same_run_same_numbers(run, result):
    again = classify_run(run, RULES)
    assert json.dumps(again["arms"], sort_keys=True) == json.dumps(result["arms"], sort_keys=True)


def test_stages_prints_onsets_tests_and_verdict(run, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps at the terminal width; one line per statement here
    stages_command(run)
    out = capsys.readouterr().out
    assert "format dependence found" in out and "this run found no format dependence" in out
    assert "chi2(1)" in out and "F(5, 276)" in out and ">= 5 (not reached) [5, ∞)" in out
    saved = json.loads((run / "stages.json").read_text())
    assert saved["arms"]["split"]["format_dependence"]["format_dependent"] is True


def test_stages_written_to_a_file_keeps_rows_and_statements_whole(run, capsys, monkeypatch):
    """Output to a file or a pipe (capsys: not a terminal), no COLUMNS: rich's 80 columns folded names mid-word
    ("short_an" over "swer") and broke each statement over lines; now one line per row and per statement."""
    monkeypatch.delenv("COLUMNS", raising=False)
    stages_command(run)
    lines = capsys.readouterr().out.splitlines()
    result = json.loads((run / "stages.json").read_text())
    for arm, a in result["arms"].items():
        for fmt in a["formats"]:
            assert any(f" {arm} " in line and f" {fmt} " in line for line in lines), (arm, fmt)
        assert f"  verdict: {a['format_dependence']['verdict']}" in lines
    assert sum("chi2(" in line and "Wald test of the interaction" in line for line in lines) >= 2


def test_report_shows_the_figure_and_the_verdict(run):
    from kcollapse.report import write_report

    html = write_report(run).read_text()
    assert 'id="format-dependence"' in html and "format dependence found" in html
    assert 'alt="accuracy per format of arm split, together, drift"' in html and "F(5, 276)" in html
    assert "nothing collapsed" in html  # the drift arm's verdict, as stages wrote it
    assert (run / "figures" / "format_dependence.png").stat().st_size > 5000


def test_a_format_at_chance_is_n_a_in_both_stage_tables_and_marked_in_the_timeline(run, capsys, monkeypatch):
    """multiple_choice sits at chance from generation 0: it has no knowledge to lose, so its B onset is n/a in
    `stages` and in the report (whose table once said "not reached by 5", as if its facts had held), and its row
    in the report's table and timeline is drawn pale and marked; the measurable formats keep their onsets."""
    import re

    from kcollapse import figures
    from kcollapse.report import write_report

    monkeypatch.setenv("COLUMNS", "250")
    stages_command(run)
    lines = capsys.readouterr().out.splitlines()
    for arm in ARMS:
        for fmt in ("multiple_choice", "short_answer", "cloze"):
            row = next(line for line in lines if f" {arm} " in line and f" {fmt} " in line)
            assert ("n/a: at chance at gen 0" in row) == (fmt == "multiple_choice"), row
    drawn, save = [], figures._save
    monkeypatch.setattr(figures, "_save", lambda fig, path: drawn.append((path.name, fig)) or save(fig, path))
    html = write_report(run).read_text()
    rows = {(arm, fmt): (pale, b) for arm, fmt, pale, b in re.findall(
        r"<td>(\w+)</td><td>(\w+)</td>\s*<td><span class=\"stages( at-chance)?\">.*?</span></td>\s*<td>([^<]*)</td>",
        html, re.S)}
    assert len(rows) == 3 * len(ARMS)
    for (arm, fmt), (pale, b_onset) in rows.items():
        assert (b_onset == "n/a: at chance at gen 0") == bool(pale) == (fmt == "multiple_choice"), (arm, fmt, b_onset)
    assert rows[("split", "short_answer")][1] == "gen 3"
    labels = [t.get_text() for t in dict(drawn)["timeline.png"].axes[0].get_yticklabels()]
    assert len(labels) == 3 * len(ARMS)
    for label in labels:
        assert label.endswith("(at chance at gen 0)") == (" multiple_choice" in label), label


def test_the_answers_shown_come_from_a_format_the_model_knew(run, result):
    """An arm that never reaches B shows its first format above chance, not multiple_choice's guesses (the default
    recipe lists multiple_choice first; at chance there, its "right at generation 0" answers were luck)."""
    from kcollapse.report import answers_section

    drift = result["arms"]["drift"]
    assert all(f["onset_B"] is None for f in drift["formats"].values())
    letters_first = dict(drift, formats={k: drift["formats"][k] for k in ("multiple_choice", "cloze", "short_answer")})
    assert "Format <b>cloze</b>" in str(answers_section(run, "drift", letters_first))
    assert "Format <b>short_answer</b>" in str(answers_section(run, "split", result["arms"]["split"]))  # its B onset


def test_imported_reference_logs_with_one_format_say_so(tmp_path):
    from kcollapse.reference import import_command

    logs = tmp_path / "logs"
    shutil.copytree(Path(__file__).parent / "fixtures" / "reference_logs", logs)
    for path in logs.glob("*/mmlu/*.json"):
        if "_short_answer_" not in path.name:
            path.unlink()
    import_command(logs, tmp_path / "run")
    for arm, a in classify_run(tmp_path / "run", RULES)["arms"].items():
        d = a["format_dependence"]
        assert d["interaction"] is None and d["format_dependent"] is None
        assert d["message"] == "one measurable format (short_answer): no format x generation interaction to test"
        assert list(d["formats"]) == ["short_answer"] and d["formats"]["short_answer"]["onset_B"]["ci"] is not None


def test_imported_reference_logs_with_three_formats_are_tested(tmp_path):
    """The fixture logs ask three formats that lose the same questions at the same time: a real test, no
    dependence; the interaction is exactly 0, so the logistic Wald test says why it is not computed."""
    from kcollapse.reference import import_command

    import_command(Path(__file__).parent / "fixtures" / "reference_logs", tmp_path / "run")
    d = classify_run(tmp_path / "run", RULES)["arms"]["ratio_100"]["format_dependence"]
    assert d["tested_formats"] == ["multiple_choice", "multiple_choice_few_shot", "short_answer"]
    inter = d["interaction"]
    assert inter["questions_left_out"] == 6  # generation 2 lacks global_facts/short_answer: its questions leave
    assert inter["logistic"]["p_value"] is None and "answered alike" in inter["logistic"]["note"]
    assert inter["accuracy"]["p_value"] is None and "answered alike" in inter["accuracy"]["note"]
    assert (inter["anova"]["df1"], inter["anova"]["df2"]) == (6, 6 * 3 * 4 - 12) and inter["anova"]["p_value"] > 0.99
    assert d["format_dependent"] is False and d["verdict"].startswith("this run found no format dependence")
