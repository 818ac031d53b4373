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
  arm that does not decline (rate <= 0) while the general arm does gives an infinite ratio, neither arm
  declining an undefined one (reported as the share of such resamples).
"""

from __future__ import annotations

import warnings

import numpy as np

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
    """General arm's decline rate / domain arm's: inf when only the general arm declines, NaN when neither does."""
    rg, rd = np.asarray(rate_general, float), np.asarray(rate_domain, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(rd > 0, rg / rd, np.where(rg > 0, np.inf, np.nan))


def area(ret: np.ndarray, gens, axis: int = -1) -> np.ndarray:
    """Mean retention over generations 0..N (trapezoid area / N): needs no threshold and is never censored."""
    g = np.asarray(gens, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.trapezoid(np.asarray(ret, float), g, axis=axis) / (g[-1] - g[0]) if len(g) > 1 else np.nan
