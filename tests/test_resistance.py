"""Retention, resistance factor (with censoring), AUC ratio, regimes and paired bootstrap CIs on hand-made curves."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from kcollapse import resistance as R
from kcollapse import stats
from kcollapse.tables import resistance_lines
from kcollapse.io import read_jsonl, write_jsonl

ARMS = [{"name": "general", "synthetic_ratio": 1.0}, {"name": "geo", "synthetic_ratio": 1.0, "domain": "geography"}]


def curves_to_metrics(curves: dict, base: float = 0.75, subject="geography", formats=("cloze",)) -> pd.DataFrame:
    """arm -> retention above chance: accuracy rows 0.25 + (base - 0.25) * retention on `subject` and the aggregate."""
    rows = []
    for arm, ret in curves.items():
        for g, r in enumerate(ret):
            for fmt in formats:
                rows += [{"arm": arm, "generation": g, "metric": "accuracy", "value": 0.25 + (base - 0.25) * r,
                          "format": fmt, "subject": s} for s in (subject, None)]
            if g:
                rows.append({"arm": arm, "generation": g, "metric": "train_tokens", "value": 1000.0, "format": None,
                             "subject": None})
    return pd.DataFrame(rows)


def test_retention_is_above_chance():
    assert stats.retention(0.55, 0.75) == pytest.approx(0.6)  # (0.55 - 0.25) / (0.75 - 0.25)
    assert stats.retention(0.25, 0.75) == 0.0  # at chance: nothing retained, whatever the raw accuracy
    assert np.isnan(stats.retention(0.2, 0.28))  # generation 0 within min_margin of chance: undefined
    assert stats.retention(0.6, 0.8, chance=0.5) == pytest.approx(1 / 3)  # 2 choices
    # raw acc/acc0 would call this 0.8 (not fallen); above chance it is 0.47
    assert stats.retention(0.24, 0.30, chance=0.2) == pytest.approx(0.4)


def test_fall_time_and_censoring():
    t, fell = stats.fall_time(np.array([[1, 0.9, 0.85, 0.7, 0.5], [1, 0.9, 0.85, 0.81, 0.9]]), range(5), 0.8)
    assert t.tolist() == [3, 4] and fell.tolist() == [True, False]  # the second never falls: censored at N = 4
    t, fell = stats.fall_time([1, 0.5, 0.9], [0, 2, 4], 0.8)
    assert (int(t), bool(fell)) == (2, True)
    lower, upper = stats.onset_ratio_bounds([6, 4, 2, 4], [True, False, True, False], [2, 2, 4, 4],
                                            [True, True, False, False], last=4)
    assert lower.tolist() == [3.0, 2.0, 0.0, 0.0] and upper.tolist() == [3.0, np.inf, 0.5, np.inf]
    assert R.factor_text(6, False, 2, False) == (3.0, "3.00")
    assert R.factor_text(10, True, 2, False) == (5.0, ">= 10/2 = 5.00")
    assert R.factor_text(3, False, 10, True) == (0.3, "<= 3/10 = 0.30")
    assert R.factor_text(10, True, 10, True)[0] is None


def test_bounds_interval_is_one_sided_when_resamples_are_censored():
    point = np.full(101, 2.0)
    assert stats.bounds_interval(point, point) == ([2.0, 2.0], "two-sided")
    upper = np.where(np.arange(101) % 2, np.inf, 2.0)  # half the resamples: the domain arm never fell
    assert stats.bounds_interval(point, upper) == ([2.0, None], "lower bound")


def test_decline_rate_and_ratio():
    assert stats.decline_rate([1, 0.9, 0.8, 0.7], range(4)) == pytest.approx(0.1)
    assert stats.decline_rate([1, 1.1, 1.2], range(3)) == pytest.approx(-0.1)
    assert np.isnan(stats.decline_rate([1, np.nan], range(2)))
    assert stats.rate_ratio([0.3, 0.2, 0.0, -0.1], [0.1, 0.0, 0.0, 0.1]).tolist()[:2] == [pytest.approx(3.0), np.inf]
    assert np.isnan(stats.rate_ratio(0.0, 0.0)) and np.isnan(stats.rate_ratio(-0.1, 0.1))  # general arm holds
    assert stats.area([1, 0.5, 0.5], range(3)) == pytest.approx(0.625)  # (0.75 + 0.5) / 2


@pytest.mark.parametrize("value, name", [(1.0, "homeostatic"), (0.81, "homeostatic"), (0.8, "bounded"),
                                         (0.6, "bounded"), (0.59, "degradative"), (0.0, "degradative"), (None, None)])
def test_regimes(value, name):
    assert stats.regime(value) == name


def test_pairs_match_ratio_and_mode_and_skip_unnamed_domains():
    arms = ARMS + [{"name": "half", "synthetic_ratio": 0.5}, {"name": "geo_half", "synthetic_ratio": 0.5, "domain": "geography"},
                   {"name": "acc", "synthetic_ratio": 1.0, "mode": "accumulate", "domain": "chemistry"},
                   {"name": "kw", "synthetic_ratio": 1.0, "domain_keywords": ["river"]}]
    assert R.pairs(arms) == [("geo", "general", "geography"), ("geo_half", "half", "geography")]


def test_resistance_factor_on_hand_made_curves():
    general = [1, 0.9, 0.75, 0.6, 0.5, 0.45, 0.4]
    geo = [1, 1, 0.95, 0.9, 0.85, 0.7, 0.65]
    out = R.summarise(curves_to_metrics({"general": general, "geo": geo}), ARMS)
    (c,) = out["comparisons"]
    f = c["formats"]["cloze"]
    assert f["generations_to_fall"] == {"geo": 5, "general": 2} and f["factor"] == 2.5 and f["text"] == "2.50"
    assert f["auc_ratio"] == pytest.approx(5.225 / 3.9)  # trapezoid areas worked out by hand
    # least-squares slopes over generations 0..6 (mean 3, Sxx 28): -2.95/28 and -1.75/28
    assert f["decline_rate"] == {"general": pytest.approx(2.95 / 28), "geo": pytest.approx(1.75 / 28)}
    assert f["decline_ratio"] == pytest.approx(2.95 / 1.75) and f["decline_ratio_text"] == "1.69"
    assert f["retention"]["general"] == pytest.approx(general)
    assert f["ci"] is None and c["n_boot"] == 0  # one seed, no answers: a point estimate only
    assert c["formats"]["all"]["factor"] == 2.5
    assert c["train_tokens"] == {"geo": 6000.0, "general": 6000.0}  # equal compute is stated
    assert out["regimes"]["general"]["cloze"]["regime"] == "degradative"
    assert out["regimes"]["geo"]["cloze"]["regime"] == "bounded"
    assert c["regimes"]["geo"]["cloze"]["retention"] == pytest.approx(0.65)
    text = "\n".join(resistance_lines(out))
    assert "resistance factor 2.50" in text and "decline-rate ratio 1.69" in text and "regime geo: bounded" in text


def test_low_baseline_is_measured_above_chance():
    """Generation-0 accuracy 0.31 on 4 choices: raw acc/acc0 can never fall below 0.8 even at chance (0.25/0.31 =
    0.81), so both arms looked censored; above chance the general arm falls at generation 1."""
    m = curves_to_metrics({"general": [1, 0.2, 0.0], "geo": [1, 1, 0.9]}, base=0.31)
    f = R.summarise(m, ARMS)["comparisons"][0]["formats"]["cloze"]
    assert f["censored"] == {"geo": True, "general": False} and f["text"] == ">= 2/1 = 2.00"
    m = curves_to_metrics({"general": [1, 0.5], "geo": [1, 0.5]}, base=0.27)  # within min_margin of chance
    out = R.summarise(m, ARMS)
    assert out["comparisons"][0]["formats"]["cloze"]["text"].startswith("n/a")
    assert out["regimes"]["general"]["cloze"]["retention"] is None and out["regimes"]["general"]["cloze"]["regime"] is None


def test_censored_domain_arm_reports_a_lower_bound():
    out = R.summarise(curves_to_metrics({"general": [1, 0.7, 0.5, 0.4], "geo": [1, 0.95, 0.9, 0.85]}), ARMS)
    f = out["comparisons"][0]["formats"]["cloze"]
    assert f["text"] == ">= 3/1 = 3.00" and f["censored"] == {"geo": True, "general": False}
    out = R.summarise(curves_to_metrics({"general": [1, 0.9, 0.9], "geo": [1, 0.9, 0.85]}), ARMS)
    assert out["comparisons"][0]["formats"]["cloze"]["factor"] is None


def test_seeds_are_pooled_as_ratio_of_means():
    m = pd.concat([curves_to_metrics({"general": [1, 0.5], "geo": [1, 1.0]}, base=0.4).assign(seed=0),
                   curves_to_metrics({"general": [1, 1.0], "geo": [1, 1.0]}, base=0.8).assign(seed=1)])
    f = R.summarise(m, ARMS, n_boot=200)["comparisons"][0]["formats"]["cloze"]
    # pooled accuracy first, then retention: (mean acc_1 - chance) / (mean acc_0 - chance)
    acc1 = (0.25 + 0.15 * 0.5 + 0.25 + 0.55 * 1.0) / 2
    assert f["retention"]["general"][1] == pytest.approx((acc1 - 0.25) / ((0.4 + 0.8) / 2 - 0.25))
    assert f["decline_ratio_ci_kind"] != "n/a"  # bootstrap over the two seeds


def fake_run(path, n_seed_q=40, seed=0, collapse=(0.0, 0.15), formats=("cloze", "multiple_choice")):
    """A run directory written by hand: general arm loses a share of the facts per generation, geo hardly any."""
    rng = np.random.default_rng(seed)
    (path).mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"arms": ARMS}))
    rows = []
    for arm, loss in (("geo", collapse[0]), ("general", collapse[1])):
        known = rng.random(n_seed_q) < 0.8
        for g in range(6):
            if g:
                known = known & (rng.random(n_seed_q) > loss)
            for subject in ("geography", "chemistry"):
                for fmt in formats:
                    recs = [{"id": f"{subject}{i}", "is_correct": bool(known[i] if subject == "geography" else known[i] or g < 3),
                             "choices": ["a", "b", "c", "d"]} for i in range(n_seed_q)]
                    write_jsonl(path / f"arms/{arm}/gen_{g}/answers/{subject}__{fmt}.jsonl", recs)
                    rows.append({"arm": arm, "generation": g, "metric": "accuracy", "format": fmt, "subject": subject,
                                 "value": float(np.mean([r["is_correct"] for r in recs]))})
            rows.append({"arm": arm, "generation": g, "metric": "accuracy", "format": "cloze", "subject": None,
                         "value": float(known.mean())})
    write_jsonl(path / "metrics.jsonl", rows)
    return path


def test_bootstrap_over_seeds_and_questions_from_run_directories(tmp_path):
    """What a sweep point does (sweep.resistance_by_point -> summarise_runs): a domain arm that never falls gives a
    one-sided bound, not a point interval; no resample is dropped."""
    runs = [fake_run(tmp_path / f"s{k}", seed=k) for k in range(3)]
    out = R.summarise_runs(runs, n_boot=300)
    c = out["comparisons"][0]
    assert c["method"] == "paired bootstrap over seeds and questions" and c["questions"] == 40 and c["seeds"] == [0, 1, 2]
    assert c["chance"] == {"cloze": 0.25, "multiple_choice": 0.25} and "censoring-aware" in c["ci_method"]
    f = c["formats"]["multiple_choice"]
    assert f["censored"]["geo"] and not f["censored"]["general"] and f["text"].startswith(">= 5/")
    assert f["ci_kind"] == "lower bound" and f["ci"][1] is None and 1.0 < f["ci"][0] <= f["factor"]
    assert f["decline_rate"]["geo"] == pytest.approx(0.0) and f["decline_rate"]["general"] > 0.05
    assert f["decline_ratio_text"].startswith("inf") and f["decline_ratio_ci_kind"] == "infinite"
    lo, hi = f["auc_ratio_ci"]
    assert 1.0 < lo <= f["auc_ratio"] <= hi
    assert c["elsewhere"]["general"]["cloze"]["retention"] < 1  # cost on the other subjects is reported
    assert R.summarise_runs(runs, n_boot=300) == out  # seeded: the same CI every time
    one = R.summarise_run(runs[0], n_boot=100)["comparisons"][0]
    assert one["method"] == "paired bootstrap over questions" and one["formats"]["cloze"]["auc_ratio_ci"]
    text = "\n".join(resistance_lines(out))
    assert "(lower bound)" in text and "∞]" in text
    from kcollapse.report import resistance_section

    page = str(resistance_section(out))  # what the sweep's report.html shows for the point
    assert f"[{f['ci'][0]:.2f}, ∞] <span class=\"note\">lower bound</span>" in page


def test_decline_rate_ratio_has_a_paired_bootstrap_interval(tmp_path):
    runs = [fake_run(tmp_path / f"s{k}", seed=k, collapse=(0.04, 0.2), n_seed_q=60) for k in range(3)]
    f = R.summarise_runs(runs, n_boot=300)["comparisons"][0]["formats"]["multiple_choice"]
    lo, hi = f["decline_ratio_ci"]
    assert f["decline_ratio_ci_kind"] == "two-sided" and 1.0 < lo <= f["decline_ratio"] <= hi
    assert f["decline_rate"]["general"] > f["decline_rate"]["geo"] > 0


def test_identical_arms_give_a_factor_of_exactly_one_in_every_resample(tmp_path):
    # pairing: both arms are resampled with the same seeds and questions, so equal data can never differ
    run = fake_run(tmp_path / "r", collapse=(0.15, 0.15), seed=3)
    answers = R.load_answers(run, ["geography"])
    twin = pd.concat([answers[answers.arm == "general"], answers[answers.arm == "general"].assign(arm="geo")])
    f = R.compare(twin, "geo", "general", n_boot=200)["formats"]["cloze"]
    assert f["auc_ratio"] == 1.0 and f["auc_ratio_ci"] == [1.0, 1.0]
    assert f["factor"] in (1.0, None) and (f["ci"] is None or f["ci"] == [1.0, 1.0])


def test_a_format_lifted_past_the_margin_by_a_small_subject_is_not_compared(tmp_path):
    """The default run's letter formats sit at chance (0.26 on all 300 questions) but scored 0.31-0.32 on its 100
    geography questions, past chance + min_margin by luck: their resistance factors were noise, and so was "all",
    which averaged them in. With per-question answers a format counts only where generation 0 is above chance in
    95% of the resamples; one that knows a little more (0.45 on as many questions) still counts."""
    run = fake_run(tmp_path / "r", n_seed_q=100, formats=("cloze",))
    rng = np.random.default_rng(7)
    rows = read_jsonl(run / "metrics.jsonl")
    for fmt, known0 in (("no_instruction", 32), ("short_answer", 45)):
        for arm in ("geo", "general"):
            for g in range(6):  # generation 0 is one model, shared by both arms as in the loop; then guesses
                correct = np.arange(100) < known0 if g == 0 else rng.random(100) < 0.25
                for subject in ("geography", "chemistry"):
                    recs = [{"id": f"{subject}{i}", "is_correct": bool(c), "choices": ["a", "b", "c", "d"]}
                            for i, c in enumerate(correct)]
                    write_jsonl(run / f"arms/{arm}/gen_{g}/answers/{subject}__{fmt}.jsonl", recs)
                    rows.append({"arm": arm, "generation": g, "metric": "accuracy", "format": fmt, "subject": subject,
                                 "value": float(correct.mean())})
    write_jsonl(run / "metrics.jsonl", rows)
    c = R.summarise_run(run, n_boot=400)["comparisons"][0]
    f = c["formats"]["no_instruction"]
    assert f["factor"] is None and f["ci"] is None and not f["measurable"] and f["decline_ratio_text"] == "n/a"
    assert f["text"] == "n/a (generation-0 accuracy 0.32 not significantly above chance 0.25 on 100 questions)"
    assert c["formats"]["short_answer"]["measurable"] and c["formats"]["short_answer"]["factor"] is not None
    for arm in ("geo", "general"):
        assert "no_instruction" not in c["regimes"][arm] and "short_answer" in c["regimes"][arm]
        mean = np.mean([c["formats"][k]["retention"][arm] for k in ("cloze", "short_answer")], axis=0)
        assert c["formats"]["all"]["retention"][arm] == pytest.approx(list(mean))  # "all": the measurable formats
    from kcollapse.report import resistance_section

    page = str(resistance_section(R.summarise_run(run, n_boot=50)))
    assert "not significantly above chance" in page and "None" not in page  # an unknown regime is "–"


def _rising_general_arm(run, seed):
    """The general arm of `run` rewritten: each generation a few facts lost and more gained, as Gemma 3 270M's cloze
    rose under alpha 1.0 at lr 1e-5 (0.77 -> 0.87 in 6 generations)."""
    rng = np.random.default_rng(seed)
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if r["arm"] != "general"]
    known = np.array([r["is_correct"] for r in read_jsonl(run / "arms/geo/gen_0/answers/geography__cloze.jsonl")])
    for g in range(6):  # generation 0 is the one model both arms start from
        if g:
            known = (known & (rng.random(len(known)) > 0.06)) | (rng.random(len(known)) < 0.12)
        for subject in ("geography", "chemistry"):
            recs = [{"id": f"{subject}{i}", "is_correct": bool(c), "choices": ["a", "b", "c", "d"]} for i, c in enumerate(known)]
            write_jsonl(run / f"arms/general/gen_{g}/answers/{subject}__cloze.jsonl", recs)
            rows.append({"arm": "general", "generation": g, "metric": "accuracy", "format": "cloze", "subject": subject,
                         "value": float(known.mean())})
    write_jsonl(run / "metrics.jsonl", rows)
    return run


def test_a_decline_rate_ratio_the_data_do_not_have_gets_no_interval(tmp_path):
    """The general arm does not decline (the ratio is undefined) in the data and in half the resamples: the other
    half drew an interval, [0.02, 1.14] "two-sided", printed beside "n/a". Where the ratio is defined, the interval
    stays and says how many resamples had none."""
    run = _rising_general_arm(fake_run(tmp_path / "r", n_seed_q=60, formats=("cloze",), collapse=(0.05, 0.0)), 11)
    f = R.summarise_run(run, n_boot=400)["comparisons"][0]["formats"]["cloze"]
    assert f["decline_rate"]["general"] < 0 < f["decline_rate"]["geo"]
    assert f["decline_ratio_text"] == "n/a (the general arm does not decline)" and 0.3 < f["decline_ratio_undefined_share"] < 0.7
    assert f["decline_ratio_ci"] is None and f["decline_ratio_ci_kind"] == "n/a"
    run = _rising_general_arm(fake_run(tmp_path / "s", n_seed_q=60, formats=("cloze",), collapse=(0.05, 0.0)), 14)
    summary = R.summarise_run(run, n_boot=400)
    f = summary["comparisons"][0]["formats"]["cloze"]
    assert f["decline_ratio"] > 0 and f["decline_ratio_ci_kind"] == "two-sided" and f["decline_ratio_undefined_share"] > 0.2
    note = f" (undefined in {f['decline_ratio_undefined_share']:.0%} of resamples)"
    from kcollapse.report import resistance_section

    assert note in str(resistance_section(summary)) and any(note in line for line in resistance_lines(summary))


def test_html_section_escapes_text_and_embeds_the_figure():
    from kcollapse.report import resistance_section

    arms = [{"name": "general", "synthetic_ratio": 1.0}, {"name": "geo", "synthetic_ratio": 1.0, "domain": "<b>geo&</b>"}]
    m = curves_to_metrics({"general": [1, 0.7, 0.5], "geo": [1, 0.9, 0.85]}, subject="<b>geo&</b>")
    page = str(resistance_section(R.summarise(m, arms)))
    assert "&lt;b&gt;geo&amp;&lt;/b&gt;" in page and "<b>geo" not in page
    assert page.count("data:image/png;base64,") == 1 and "&gt;= 2/1 = 2.00" in page
