"""The statistics of the diagnosis, in one place: retention, resampling, intervals, censoring, decline rates.

Stages (stages.py), the resistance factor (resistance.py), the report and the sweep all call these functions and
compute none of them themselves. Definitions (docs/STATISTICS.md says the same with the reasons):

- Retention of accuracy *above chance*: (acc_g - chance) / (acc_0 - chance), chance = 1 / number of choices
  (0.25 without per-question answers). A model at chance has retained nothing whatever its raw accuracy.
  Undefined (NaN) when generation 0 is not `min_margin` above chance: there is no knowledge to lose.
- Regime of an arm from its retention at the last generation: homeostatic (> 0.8), bounded (0.6-0.8),
  degradative (< 0.6).
- Paired bootstrap: a resample draws the units (questions, seeds) with replacement as multinomial counts; every
  arm, generation and format of a resample gets the same counts, so a difference between them is never noise
  of the draw. Replicate 0 is the data (all counts 1). Intervals are percentiles of replicates 1..B.
- Fall time: the first generation > 0 whose retention is below `threshold`; an arm that never falls is
  *censored* at the last generation N (its true fall time is later).
- Onset ratio (resistance factor) = fall time of the domain arm / of the general arm. Censoring-aware interval:
  each resample gives bounds on the ratio (a censored domain time makes it >= t_d/t_g with no upper end; a
  censored general time <= t_d/N, lower end 0), the interval is [lower percentile of the lower bounds, upper
  percentile of the upper bounds]; an infinite upper end makes it a one-sided bound. No resample is dropped for
  censoring (only those whose generation 0 is not above chance: they measure nothing).
- Decline rate of an arm = minus the least-squares slope of retention over generations 0..N (retention lost
  per generation). Decline-rate ratio = general arm's rate / domain arm's rate (the paper's "~15x"); a domain
  arm that does not decline (rate <= 0) while the general arm does gives an infinite ratio; a general arm that
  does not decline gives an undefined one (nothing to resist; reported as the share of such resamples).
- Onset of a per-generation condition (stage B or C) in each resample: the first generation from which it holds
  for `persist` generations in a row; one that never happens is censored: ">= the last generation", an open end.
  The interval is censoring-aware like the onset ratio's: [lower percentile of (onset, or N when censored), upper
  percentile of (onset, or infinity when censored)].
- Format x generation interaction on per-question correctness (`interaction_tests`): on accuracy (format and
  generation factors, least squares, question-clustered sandwich, Wald test on the interaction directions that
  have variance: the one the verdict reads), a logistic regression with a linear trend per format (same
  covariance), and the paper's two-way ANOVA F test on the same answers.
"""

from __future__ import annotations

import warnings

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_CHANCE = 0.25  # 4 choices: what chance is when no answers file tells the number of choices
HOMEOSTATIC, BOUNDED = 0.8, 0.6


def chance_of(n_choices) -> float:
    """Chance accuracy of a question with `n_choices` options (DEFAULT_CHANCE when unknown)."""
    return 1.0 / n_choices if n_choices else DEFAULT_CHANCE


def retention(acc, acc0, chance=DEFAULT_CHANCE, min_margin: float = 0.05):
    """Accuracy retained above chance, elementwise; NaN where acc0 is not min_margin above chance."""
    acc, acc0, chance = (np.asarray(x, dtype=float) for x in (acc, acc0, chance))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(acc0 - chance > min_margin, (acc - chance) / (acc0 - chance), np.nan)
    return float(out) if out.ndim == 0 else out


def regime(value: float | None) -> str | None:
    """homeostatic (> 0.8), bounded (0.6-0.8) or degradative (< 0.6); None for an unknown retention."""
    if value is None or not np.isfinite(value):
        return None
    return "homeostatic" if value > HOMEOSTATIC else "bounded" if value >= BOUNDED else "degradative"


# ------------------------------------------------------------------------------------------------ resampling

def resample_counts(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot + 1, n) multinomial counts of n units drawn with replacement; row 0 is the data (all ones)."""
    return np.vstack([np.ones(n), rng.multinomial(n, np.full(n, 1 / n), size=n_boot)]) if n else np.ones((1, 0))


def weighted_means(counts: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Mean of `values` (units on the last axis, NaN = not measured) under each row of counts: (B+1, ...)."""
    present = ~np.isnan(values)
    num = np.tensordot(counts, np.where(present, values, 0.0), axes=([1], [-1]))
    den = np.tensordot(counts, present.astype(float), axes=([1], [-1]))
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / den


def interval(replicates, ci: float = 0.95, min_finite: int = 10) -> list[float] | None:
    """Percentile interval of bootstrap replicates (row 0, the data, excluded); None with too few finite ones."""
    v = np.asarray(replicates, dtype=float)[1:]
    v = v[np.isfinite(v)]
    if v.size < min_finite:
        return None
    return [float(x) for x in np.percentile(v, [(1 - ci) / 2 * 100, (1 + ci) / 2 * 100])]


def bounds_interval(lower, upper, ci: float = 0.95) -> tuple[list[float | None] | None, str]:
    """Censoring-aware interval from per-replicate bounds (row 0 excluded); (interval, kind).

    An infinite end comes back as None and kind says which side is bounded: 'two-sided', 'lower bound',
    'upper bound', 'unbounded', or 'infinite' (even the lower end is infinite). NaN bounds (nothing measured)
    are left out; fewer than 10 left: (None, 'n/a')."""
    lo, hi = np.asarray(lower, float)[1:], np.asarray(upper, float)[1:]
    keep = ~(np.isnan(lo) | np.isnan(hi))
    if keep.sum() < 10:
        return None, "n/a"
    a = np.quantile(lo[keep], (1 - ci) / 2, method="inverted_cdf")
    b = np.quantile(hi[keep], (1 + ci) / 2, method="inverted_cdf")
    if np.isposinf(a):
        return None, "infinite"  # every resample: only the general arm declines
    ends = [float(a) if np.isfinite(a) and a > 0 else None, float(b) if np.isfinite(b) else None]
    kind = {(True, True): "two-sided", (True, False): "lower bound", (False, True): "upper bound",
            (False, False): "unbounded"}[(ends[0] is not None, ends[1] is not None)]
    return [ends[0] if ends[0] is not None else 0.0, ends[1]], kind


# ------------------------------------------------------------------------------------------------ over generations

def fall_time(ret: np.ndarray, gens, threshold: float, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """(first generation > 0 with retention < threshold, fell) along `axis`; censored (fell False) at the last
    generation when it never falls."""
    ret = np.moveaxis(np.asarray(ret, float), axis, -1)
    g = np.asarray(gens)
    below = ret[..., 1:] < threshold
    fell = below.any(axis=-1)
    return np.where(fell, g[1:][below.argmax(axis=-1)], g[-1]), fell


def onset_ratio_bounds(t_dom, fell_dom, t_gen, fell_gen, last: int) -> tuple[np.ndarray, np.ndarray]:
    """Bounds of t_domain / t_general when either may be censored at `last` (see the module docstring)."""
    t_dom, t_gen = np.asarray(t_dom, float), np.asarray(t_gen, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        point = t_dom / t_gen
        lower = np.where(fell_gen, point, 0.0)
        upper = np.where(fell_dom, np.where(fell_gen, point, t_dom / last), np.inf)
    return lower, upper


def decline_rate(ret: np.ndarray, gens, axis: int = -1) -> np.ndarray:
    """Minus the least-squares slope of retention over generations (retention lost per generation)."""
    ret = np.moveaxis(np.asarray(ret, float), axis, -1)
    g = np.asarray(gens, float)
    ok = np.isfinite(ret)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        n = ok.sum(-1)
        gm = np.where(ok, g, 0).sum(-1) / n
        rm = np.where(ok, ret, 0).sum(-1) / n
        dg = np.where(ok, g - gm[..., None], 0)
        slope = (dg * np.where(ok, ret - rm[..., None], 0)).sum(-1) / (dg ** 2).sum(-1)
    return np.where(n >= 2, -slope, np.nan)


def rate_ratio(rate_general, rate_domain) -> np.ndarray:
    """General arm's decline rate / domain arm's: inf when only the general arm declines, NaN when the general arm
    does not decline (the ratio asks how much slower the domain arm loses what the general arm loses; a negative
    ratio would sit outside every interval drawn for it)."""
    rg, rd = np.asarray(rate_general, float), np.asarray(rate_domain, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(rg > 0, np.where(rd > 0, rg / rd, np.inf), np.nan)


def area(ret: np.ndarray, gens, axis: int = -1) -> np.ndarray:
    """Mean retention over generations 0..N (trapezoid area / N): needs no threshold and is never censored."""
    g = np.asarray(gens, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.trapezoid(np.asarray(ret, float), g, axis=axis) / (g[-1] - g[0]) if len(g) > 1 else np.nan


# ------------------------------------------------------------------------------------------------ onsets

def onset_generations(flags: np.ndarray, gens, persist: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of `flags` (replicates x generations): (first generation from which the flag holds `persist`
    generations in a row, fewer at the end; reached). Never reached: censored at the last generation."""
    flags = np.asarray(flags, bool)
    g = np.asarray(gens)
    window = np.stack([flags[:, i:i + persist].all(axis=1) for i in range(flags.shape[1])], axis=1)
    reached = window.any(axis=1)
    return np.where(reached, g[window.argmax(axis=1)], g[-1]), reached


def onset_interval(onset, reached, last: int, valid=None, ci: float = 0.95):
    """Censoring-aware interval of per-replicate onsets (row 0, the data, excluded): each replicate bounds the
    onset by [onset, onset], or [last, inf) when censored; `valid` False drops a replicate (nothing measured).
    Returns bounds_interval's (interval, kind); an open upper end is None ("lower bound")."""
    onset = np.asarray(onset, float)
    lower = np.where(reached, onset, float(last))
    upper = np.where(reached, onset, np.inf)
    if valid is not None:
        lower, upper = np.where(valid, lower, np.nan), np.where(valid, upper, np.nan)
    return bounds_interval(lower, upper, ci)


# ------------------------------------------------------------------------------------------------ interaction

LOGISTIC_MODEL = "correct ~ C(format) * generation"  # per-format linear trend in log-odds
ANOVA_MODEL = "correct ~ C(format) * C(generation)"  # the paper's two-way ANOVA: generation as a factor
SEPARATION = 15.0  # |log-odds coefficient| beyond this: a format all right or all wrong, no finite fit


def rank_wald(beta: np.ndarray, cov: np.ndarray, tol: float = 1e-8) -> tuple[float, int]:
    """Wald statistic b' C^+ b on the directions where C has variance (eigenvalues above tol x the largest), and
    their number, the chi-square df: a clustered covariance is singular when some cells have no variance."""
    values, vectors = np.linalg.eigh((cov + cov.T) / 2)
    keep = values > tol * max(values.max(), 0.0) if values.size and values.max() > 0 else np.zeros(len(values), bool)
    z = vectors[:, keep].T @ beta
    return float((z**2 / values[keep]).sum()), int(keep.sum())


def interaction_tests(answers: pd.DataFrame) -> dict:
    """Does accuracy's course over generations depend on the format? Tests of the format x generation
    interaction on per-question correctness (`answers`: columns question, format, generation, correct 0/1; every
    question in every format x generation).

    accuracy (the one the verdict reads): the paper's scale and model, correct ~ format * generation (both
    factors: any shape of course per format), fitted by least squares (a linear probability model: effects are
    differences in accuracy, the quantity the stages and the paper read), covariance cluster-robust by question;
    Wald chi-square test of the (formats - 1) x (generations - 1) interaction terms. On the log-odds scale a fall
    from 0.99 to 0.97 weighs as much as one from 0.9 to 0.7, so near a ceiling the logistic test below can call
    a holding control "dependent" and miss a collapse that happens in one format only (both seen on the default run).
    logistic: logit P(correct) ~ format * generation (format a factor, generation a number: each format its own
    rate of loss in log-odds per generation), maximum likelihood, covariance cluster-robust by question (the same
    question is asked in every format and generation); Wald chi-square test of the (formats - 1) interaction
    terms. anova: the paper's form, OLS two-way ANOVA of correctness on format and generation (both factors),
    F(df1, df2) of the interaction (type II), answers treated as independent."""
    import statsmodels.api as sm  # slow imports (statsmodels ~1 s): only when an arm has two measurable formats
    import statsmodels.formula.api as smf  # slow, as above
    from statsmodels.stats.anova import anova_lm  # slow, as above
    from statsmodels.tools.sm_exceptions import PerfectSeparationError  # slow, as above
    import scipy.stats  # slow, as above

    df = answers.assign(format=answers["format"].astype(str), generation=answers["generation"].astype(int),
                        correct=answers["correct"].astype(float)).reset_index(drop=True)
    out: dict = {"n_answers": int(len(df)), "n_questions": int(df["question"].nunique()),
                 "formats": sorted(df["format"].unique()), "generations": sorted(int(g) for g in df["generation"].unique())}
    clusters = df["question"].factorize()[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # separation warnings: checked below on the coefficients
        try:
            fit = smf.glm(LOGISTIC_MODEL, data=df, family=sm.families.Binomial()).fit(
                cov_type="cluster", cov_kwds={"groups": clusters})
        except (PerfectSeparationError, np.linalg.LinAlgError):  # older statsmodels raise on separation
            fit = None
    logistic = {"test": "Wald chi-square, cluster-robust by question", "model": "logit P(correct) ~ C(format) * generation",
                "df": len(out["formats"]) - 1}
    alike = df.pivot_table(index=["question", "generation"], columns="format", values="correct").nunique(axis=1).max() == 1
    if alike:  # the interaction is exactly 0 with no variance: a Wald statistic would be 0/0
        logistic.update(statistic=None, p_value=None, note="each question answered alike in every format, at every "
                        "generation: no interaction in the data")
    elif (fit is not None and fit.converged and np.all(np.abs(fit.params) < SEPARATION)
          and np.isfinite(fit.cov_params().to_numpy()).all()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a rank-deficient covariance: statsmodels' pseudo-inverse
            terms = [n for n in fit.params.index if ":generation" in n]
            wald = fit.wald_test(", ".join(f"{t} = 0" for t in terms), scalar=True, use_f=False)
        base = float(fit.params["generation"])  # the first format's trend; the others' differ by their term
        slopes = {f: base + float(fit.params.get(f"C(format)[T.{f}]:generation", 0.0)) for f in out["formats"]}
        logistic.update(statistic=float(wald.statistic), p_value=float(wald.pvalue), log_odds_per_generation=slopes)
    else:
        logistic.update(statistic=None, p_value=None,
                        note="no finite fit: a format is (almost) all right or all wrong at every generation")
    out["logistic"] = logistic
    ols = smf.ols(ANOVA_MODEL, data=df).fit()
    accuracy = {"test": "Wald chi-square, cluster-robust by question",
                "model": "P(correct) ~ C(format) * C(generation), linear probability",
                "df": (len(out["formats"]) - 1) * (len(out["generations"]) - 1)}
    if alike:
        accuracy.update(statistic=None, p_value=None, note=logistic["note"])
    else:
        robust = ols.get_robustcov_results(cov_type="cluster", groups=clusters)
        terms = [i for i, n in enumerate(ols.params.index) if n.startswith("C(format)") and ":C(generation)" in n]
        statistic, rank = rank_wald(np.asarray(robust.params)[terms], np.asarray(robust.cov_params())[np.ix_(terms, terms)])
        accuracy.update(statistic=statistic, p_value=float(scipy.stats.chi2.sf(statistic, rank)) if rank else None)
        if rank < accuracy["df"]:  # cells every question answers alike carry no sampling variance
            accuracy.update(df=rank, note=f"{accuracy['df'] - rank} of {accuracy['df']} interaction directions have "
                            f"no variance (cells every question answers alike): tested on the other {rank}")
    out["accuracy"] = accuracy
    row = anova_lm(ols, typ=2).loc["C(format):C(generation)"]
    finite = bool(np.isfinite(row["F"]))  # not when every cell is all right or all wrong (no residual variance)
    out["anova"] = {"test": "two-way ANOVA (OLS, type II)", "model": ANOVA_MODEL,
                    "F": float(row["F"]) if finite else None, "df1": int(row["df"]), "df2": int(ols.df_resid),
                    "p_value": float(row["PR(>F)"]) if finite else None}
    return out
