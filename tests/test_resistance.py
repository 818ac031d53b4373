"""Retention, resistance factor (with censoring), AUC ratio, regimes and paired bootstrap CIs on hand-made curves."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from kcollapse import resistance as R
from kcollapse.io import write_jsonl

ARMS = [{"name": "general", "synthetic_ratio": 1.0}, {"name": "geo", "synthetic_ratio": 1.0, "domain": "geography"}]


def curves_to_metrics(curves: dict, base: float = 0.5, subject="geography", formats=("cloze",)) -> pd.DataFrame:
    """arm -> retention list: accuracy rows (base * retention) on `subject`, and on the aggregate."""
    rows = []
    for arm, ret in curves.items():
        for g, r in enumerate(ret):
            for fmt in formats:
                rows += [{"arm": arm, "generation": g, "metric": "accuracy", "value": base * r, "format": fmt, "subject": s}
                         for s in (subject, None)]
            if g:
                rows.append({"arm": arm, "generation": g, "metric": "train_tokens", "value": 1000.0, "format": None,
                             "subject": None})
    return pd.DataFrame(rows)


def test_generations_to_fall_and_censoring():
    assert R.generations_to_fall([1, 0.9, 0.85, 0.7, 0.5]) == (3, False)
    assert R.generations_to_fall([1, 0.9, 0.85, 0.81]) == (3, True)  # never below 0.8: censored at N
    assert R.generations_to_fall([1, 0.9, 0.85], threshold=0.88) == (2, False)
    assert R.generations_to_fall([1, 0.5, 0.9], generations=[0, 2, 4]) == (2, False)
    assert R.factor_text(6, False, 2, False) == (3.0, "3.00")
    assert R.factor_text(10, True, 2, False) == (5.0, ">= 10/2 = 5.00")
    assert R.factor_text(3, False, 10, True) == (0.3, "<= 3/10 = 0.30")
    assert R.factor_text(10, True, 10, True)[0] is None


@pytest.mark.parametrize("value, name", [(1.0, "homeostatic"), (0.81, "homeostatic"), (0.8, "bounded"),
                                         (0.6, "bounded"), (0.59, "degradative"), (0.0, "degradative"), (None, None)])
def test_regimes(value, name):
    assert R.regime(value) == name


def test_pairs_match_ratio_and_mode_and_skip_unnamed_domains():
    arms = ARMS + [{"name": "half", "synthetic_ratio": 0.5}, {"name": "geo_half", "synthetic_ratio": 0.5, "domain": "geography"},
                   {"name": "acc", "synthetic_ratio": 1.0, "mode": "accumulate", "domain": "chemistry"},
                   {"name": "kw", "synthetic_ratio": 1.0, "domain_keywords": ["river"]}]
    assert R.pairs(arms) == [("geo", "general", "geography"), ("geo_half", "half", "geography")]


def test_resistance_factor_on_hand_made_curves():
    general = [1, 0.9, 0.75, 0.6, 0.5, 0.45, 0.4]
    geo = [1, 1, 0.95, 0.9, 0.85, 0.7, 0.6]
    out = R.summarise(curves_to_metrics({"general": general, "geo": geo}), ARMS)
    (c,) = out["comparisons"]
    f = c["formats"]["cloze"]
    assert f["generations_to_fall"] == {"geo": 5, "general": 2} and f["factor"] == 2.5 and f["text"] == "2.50"
    assert f["auc_ratio"] == pytest.approx(R.auc(geo, range(7)) / R.auc(general, range(7)))
    assert f["retention"]["general"] == pytest.approx(general)
    assert f["ci"] is None and c["n_boot"] == 0  # one seed, no answers: a point estimate only
    assert c["formats"]["all"]["factor"] == 2.5
    assert c["train_tokens"] == {"geo": 6000.0, "general": 6000.0}  # equal compute is stated
    assert out["regimes"]["general"]["cloze"]["regime"] == "degradative"
    assert out["regimes"]["geo"]["cloze"]["regime"] == "bounded"
    assert c["regimes"]["geo"]["cloze"]["retention"] == pytest.approx(0.6)
    text = "\n".join(R.lines(out))
    assert "resistance factor 2.50" in text and "regime geo: bounded" in text


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
    assert f["retention"]["general"][1] == pytest.approx((0.2 + 0.8) / (0.4 + 0.8))
    assert f["ci"] is not None  # bootstrap over the two seeds


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
                    recs = [{"id": f"{subject}{i}", "is_correct": bool(known[i] if subject == "geography" else known[i] or g < 3)}
                            for i in range(n_seed_q)]
                    write_jsonl(path / f"arms/{arm}/gen_{g}/answers/{subject}__{fmt}.jsonl", recs)
                    rows.append({"arm": arm, "generation": g, "metric": "accuracy", "format": fmt, "subject": subject,
                                 "value": float(np.mean([r["is_correct"] for r in recs]))})
            rows.append({"arm": arm, "generation": g, "metric": "accuracy", "format": "cloze", "subject": None,
                         "value": float(known.mean())})
    write_jsonl(path / "metrics.jsonl", rows)
    return path


def test_bootstrap_over_seeds_and_questions_from_run_directories(tmp_path):
    runs = [fake_run(tmp_path / f"s{k}", seed=k) for k in range(3)]
    out = R.summarise_runs(runs, n_boot=300)
    c = out["comparisons"][0]
    assert c["method"] == "paired bootstrap over seeds and questions" and c["questions"] == 40 and c["seeds"] == [0, 1, 2]
    f = c["formats"]["multiple_choice"]
    assert f["censored"]["geo"] and not f["censored"]["general"] and f["text"].startswith(">= 5/")
    lo, hi = f["ci"]
    assert lo <= f["factor"] <= hi and hi <= 5.0
    lo, hi = f["auc_ratio_ci"]
    assert 1.0 < lo <= f["auc_ratio"] <= hi
    assert c["elsewhere"]["general"]["cloze"]["retention"] < 1  # cost on the other subjects is reported
    assert R.summarise_runs(runs, n_boot=300) == out  # seeded: the same CI every time
    one = R.summarise_run(runs[0], n_boot=100)["comparisons"][0]
    assert one["method"] == "paired bootstrap over questions" and one["formats"]["cloze"]["auc_ratio_ci"]


def test_identical_arms_give_a_factor_of_exactly_one_in_every_resample(tmp_path):
    # pairing: both arms are resampled with the same seeds and questions, so equal data can never differ
    run = fake_run(tmp_path / "r", collapse=(0.15, 0.15), seed=3)
    answers = R.load_answers(run, ["geography"])
    twin = pd.concat([answers[answers.arm == "general"], answers[answers.arm == "general"].assign(arm="geo")])
    f = R.compare(twin, "geo", "general", n_boot=200)["formats"]["cloze"]
    assert f["auc_ratio"] == 1.0 and f["auc_ratio_ci"] == [1.0, 1.0]
    assert f["factor"] in (1.0, None) and (f["ci"] is None or f["ci"] == [1.0, 1.0])


def test_html_section_escapes_text_and_embeds_the_figure():
    arms = [{"name": "general", "synthetic_ratio": 1.0}, {"name": "geo", "synthetic_ratio": 1.0, "domain": "<b>geo&</b>"}]
    m = curves_to_metrics({"general": [1, 0.7, 0.5], "geo": [1, 0.9, 0.85]}, subject="<b>geo&</b>")
    page = R.html_section(R.summarise(m, arms))
    assert "&lt;b&gt;geo&amp;&lt;/b&gt;" in page and "<b>geo" not in page
    assert page.count("data:image/png;base64,") == 1 and "&gt;= 2/1 = 2.00" in page
