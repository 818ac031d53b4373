"""Resistance to collapse: how much longer a domain-specific arm keeps its facts than the general arm.

Keisha et al. (2025) find that synthetic training restricted to the evaluated domain resists knowledge collapse
about 15x longer. Here that claim becomes numbers, from metrics rows (and per-question answers when logged). The
statistics (retention above chance, fall times and censoring, decline rates, paired bootstrap, intervals) are
kcollapse.stats's; this module lays the data out for them:

- Retention(g) on the domain's subject, per format ("all" = mean over formats), above chance (stats.retention).
  Both arms of a comparison are scored on the same questions: those of the domain arm's subject. A format counts
  where its generation-0 accuracy there is `min_margin` above chance and, with per-question answers, above chance
  in `ci` of the resamples (a one-sided bootstrap test: a subject's 100 questions lift a format at chance past the
  margin by luck); the others are n/a, left out of "all" and of the domain regimes.
- Onset ratio (resistance factor) = generations until retention falls below `threshold` (0.8), domain arm over
  general arm; an arm that never falls is censored at N, the last generation (">= N/M", "<= M/N", or n/a when
  neither fell). Its interval is censoring-aware (stats.bounds_interval): no resample is dropped for censoring;
  a censored domain arm gives a one-sided bound.
- Decline-rate ratio = general arm's decline rate / domain arm's (slope of retention over generations): the
  paper's form of the claim. Beside both: the ratio of the areas under the retention curves (never censored).
- Uncertainty: paired bootstrap. Each resample draws seeds (both arms keep the same seeds: they share a run) and
  questions (the same ids in every arm, generation and format) with replacement.
- Regime of an arm from the same retention at the last generation (stats.regime).
- Beside the factor: equal compute (training tokens of each arm) and the cost elsewhere (retention on the other
  subjects at the last generation).

A domain arm is compared with the general arm of the same run that has the same synthetic_ratio and mode and no
domain restriction. Every function below takes DataFrames, so one run (`summarise_run`) and the seeds of a sweep
point (`summarise_runs`) go through the same code.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from kcollapse import stats
from kcollapse.errors import UserError
from kcollapse.io import read_jsonl
from kcollapse.rundir import answer_files, load_metrics

CI_METHOD = ("censoring-aware percentile interval: each resample bounds the ratio (a censored arm's fall time "
             "counts as at least the last generation) and no resample is dropped for it; an open end is a one-sided bound")


def factor_text(t_domain: int, censored_domain: bool, t_general: int, censored_general: bool) -> tuple[float | None, str]:
    """The resistance factor and how to read it: '2.50', '>= 10/2 = 5.00', '<= 3/10 = 0.30' or 'n/a ...'."""
    if censored_domain and censored_general:
        return None, f"n/a (neither arm fell within {t_domain} generations)"
    value = t_domain / t_general
    if censored_domain:
        return value, f">= {t_domain}/{t_general} = {value:.2f}"
    if censored_general:
        return value, f"<= {t_domain}/{t_general} = {value:.2f}"
    return value, f"{value:.2f}"


def ratio_text(value: float | None) -> str:
    if value is None or np.isnan(value):
        return "n/a (the general arm does not decline)"
    return "inf (only the general arm declines)" if np.isinf(value) else f"{value:.2f}"


# ------------------------------------------------------------------------------------------------ loading

def load_arms(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"{path}: not found; is {run_dir} a kcollapse run directory?")
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("arms") or []


def load_answers(run_dir: Path, subjects) -> pd.DataFrame:
    """Per-question correctness of these subjects: arm, generation, format, subject, id, correct, chance."""
    rows = []
    for subject in subjects:
        for (arm, gen, fmt), paths in answer_files(run_dir, subject).items():
            rows += [(arm, gen, fmt, subject, str(r.get("id")), r.get("is_correct"), stats.chance_of(len(r.get("choices") or [])))
                     for path in paths for r in read_jsonl(path)]
    df = pd.DataFrame(rows, columns=["arm", "generation", "format", "subject", "id", "correct", "chance"])
    df["correct"] = pd.to_numeric(df["correct"].astype(object).where(df["correct"].notna(), np.nan)).astype(float)
    return df


def pairs(arms: list) -> list[tuple[str, str, str]]:
    """(domain arm, general arm, domain) for every domain arm that has a general arm to compare with."""
    arms = [a if isinstance(a, dict) else a.model_dump() for a in arms]
    general = [a for a in arms if not (a.get("domain") or a.get("domain_corpus") or a.get("domain_keywords"))]
    out = []
    for a in arms:
        match = [g for g in general if g["synthetic_ratio"] == a["synthetic_ratio"]
                 and g.get("mode", "replace") == a.get("mode", "replace")]
        if a.get("domain") and match:
            out.append((a["name"], match[0]["name"], a["domain"]))
    return out


def _with_seed(df: pd.DataFrame) -> pd.DataFrame:
    return df if "seed" in df.columns else df.assign(seed=0)


def _accuracy(metrics: pd.DataFrame, subject) -> pd.DataFrame:
    sel = (metrics["metric"] == "accuracy") & metrics["format"].notna()
    sel &= metrics["subject"].isna() if subject is None else metrics["subject"] == subject
    return _with_seed(metrics[sel])


# ------------------------------------------------------------------------------------------------ compare

def compare(correct: pd.DataFrame, domain_arm: str, general_arm: str, threshold: float = 0.8, n_boot: int = 1000,
            ci: float = 0.95, seed: int = 0, min_margin: float = 0.05) -> dict:
    """Onset ratio, decline-rate ratio and area ratio per format, with paired bootstrap intervals.

    `correct`: columns seed (optional), arm, generation, format, id, correct (0/1 per question; or one row per
    format with id '*' and correct = accuracy when only metric rows exist), chance (optional; else 0.25).
    """
    df = _with_seed(correct)
    df = df[df["arm"].isin([domain_arm, general_arm])].dropna(subset=["correct"])
    gens = sorted(set.intersection(*(set(df.loc[df.arm == a, "generation"]) for a in (domain_arm, general_arm))))
    if 0 not in gens or len(gens) < 2:
        return {"error": "needs generation 0 and at least one later generation in both arms"}
    seeds, formats, ids = sorted(df["seed"].unique()), sorted(df["format"].unique()), sorted(df["id"].unique())
    chance = (df.groupby("format")["chance"].mean() if "chance" in df.columns else pd.Series(dtype=float))
    chance = np.array([chance.get(f, stats.DEFAULT_CHANCE) for f in formats])
    arms = [domain_arm, general_arm]
    full = pd.MultiIndex.from_product([seeds, arms, gens, formats], names=["seed", "arm", "generation", "format"])
    table = df.pivot_table(index=["seed", "arm", "generation", "format"], columns="id", values="correct", aggfunc="mean")
    X = table.reindex(index=full, columns=ids).to_numpy().reshape(len(seeds), 2, len(gens), len(formats), len(ids))
    rng = np.random.default_rng(seed)
    S, Q = len(seeds), len(ids)
    boot = n_boot if S > 1 or Q > 1 else 0
    W, C = stats.resample_counts(S, boot, rng), stats.resample_counts(Q, boot, rng)
    present = ~np.isnan(X)
    num = np.einsum("bs,bq,sagfq->bagf", W, C, np.nan_to_num(X), optimize=True)
    den = np.einsum("bs,bq,sagfq->bagf", W, C, present.astype(float), optimize=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = num / den
    ret = stats.retention(acc, acc[:, :, :1, :], chance, min_margin)
    past_margin = np.isfinite(ret[0, :, 0, :]).all(axis=0)  # generation 0 more than min_margin above chance
    # on a small subject a format at chance passes the margin by luck (the default run's letter formats: 0.31 on
    # 100 geography questions): with resamples it counts only if generation 0 is above chance in `ci` of them
    above_chance = (acc[1:, :, 0, :] > chance).all(axis=1).mean(axis=0) if boot else np.ones(len(formats))
    known = past_margin & (above_chance >= ci)
    ret[..., ~known] = np.nan
    with warnings.catch_warnings():  # a format at chance (all NaN) is left out of "all"
        warnings.simplefilter("ignore", RuntimeWarning)
        ret = np.concatenate([ret, np.nanmean(ret, axis=3, keepdims=True)], axis=3)
    g = np.asarray(gens)
    t, fell = stats.fall_time(ret, g, threshold, axis=2)  # (B, arm, format)
    lower, upper = stats.onset_ratio_bounds(t[:, 0], fell[:, 0], t[:, 1], fell[:, 1], int(g[-1]))
    measured = np.isfinite(ret[:, :, 0, :]).all(axis=1)  # a resample whose generation 0 is at chance measures nothing
    lower, upper = np.where(measured, lower, np.nan), np.where(measured, upper, np.nan)
    rate = stats.decline_rate(ret, g, axis=2)  # (B, arm, format)
    rate_ratio = stats.rate_ratio(rate[:, 1], rate[:, 0])
    area = stats.area(ret, g, axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc_ratio = area[:, 0] / area[:, 1]

    out = {}
    for f, fmt in enumerate(formats + ["all"]):
        value, text = factor_text(int(t[0, 0, f]), not fell[0, 0, f], int(t[0, 1, f]), not fell[0, 1, f])
        interval, kind = stats.bounds_interval(lower[:, f], upper[:, f], ci) if boot else (None, "n/a")
        if f < len(formats) and past_margin[f] and not known[f]:
            value, text, interval, kind = None, (f"n/a (generation-0 accuracy {acc[0, 0, 0, f]:.2f} not significantly "
                                                 f"above chance {chance[f]:.2f} on {Q} questions)"), None, "n/a"
        elif not measured[0, f]:
            value, text, interval, kind = None, "n/a (generation-0 accuracy not above chance)", None, "n/a"
        rr = rate_ratio[:, f]
        # no interval for a ratio the data do not have: the resamples where the general arm happens to decline would
        # draw one (Gemma 3 270M's cloze: rising in the data and in 84% of resamples; the other 16% gave [0.05, 0.50])
        rr_interval, rr_kind = stats.bounds_interval(rr, rr, ci) if boot and not np.isnan(rr[0]) else (None, "n/a")
        out[fmt] = {
            "factor": value, "text": text, "ci": interval, "ci_kind": kind, "measurable": bool(measured[0, f]),
            "generations_to_fall": {domain_arm: int(t[0, 0, f]), general_arm: int(t[0, 1, f])},
            "censored": {domain_arm: bool(not fell[0, 0, f]), general_arm: bool(not fell[0, 1, f])},
            "decline_rate": {a: _num(rate[0, i, f]) for i, a in enumerate(arms)},
            "decline_rate_ci": {a: stats.interval(rate[:, i, f], ci) for i, a in enumerate(arms)},
            "decline_ratio": _num(rr[0]), "decline_ratio_text": ratio_text(rr[0]) if measured[0, f] else "n/a",
            "decline_ratio_ci": rr_interval, "decline_ratio_ci_kind": rr_kind,
            "decline_ratio_undefined_share": float(np.isnan(rr[1:]).mean()) if boot else None,
            "auc_ratio": _num(auc_ratio[0, f]), "auc_ratio_ci": stats.interval(auc_ratio[:, f], ci),
            "retention": {a: [_num(x) for x in ret[0, i, :, f]] for i, a in enumerate(arms)},
            "retention_ci": {a: [stats.interval(ret[:, i, k, f], ci) for k in range(len(gens))] for i, a in enumerate(arms)},
        }
    return {"generations": [int(x) for x in gens], "seeds": [s.item() if hasattr(s, "item") else s for s in seeds], "questions": Q,
            "chance": {f: float(c) for f, c in zip(formats, chance)},
            "method": "paired bootstrap over " + " and ".join(n for n, k in (("seeds", S), ("questions", Q)) if k > 1)
            if boot else "point estimate (one seed, no per-question answers)", "ci_method": CI_METHOD if boot else None,
            "n_boot": boot, "formats": out}


def _num(x):
    return float(x) if x is not None and np.isfinite(x) else x if isinstance(x, str) else None


def retention_at_last(metrics: pd.DataFrame, arm: str, subject=None, exclude=(), chance=None,
                      min_margin: float = 0.05, formats=None) -> dict[str, dict]:
    """format -> {retention, per_seed, generation, regime} at the arm's last generation, retention above chance
    (subject None = all questions; subject '*others*' = mean over benchmark subjects except `exclude`; chance:
    format -> chance, default 0.25; formats: only these, e.g. those a comparison found measurable)."""
    if subject == "*others*":
        acc = _with_seed(metrics[(metrics.metric == "accuracy") & metrics.subject.notna() & metrics.format.notna()])
        acc = acc[~acc.subject.isin(list(exclude)) & ~acc.subject.astype(str).str.startswith("split:")]
    else:
        acc = _accuracy(metrics, subject)
    acc = acc[(acc["arm"] == arm) & (acc["format"].isin(formats) if formats is not None else True)]
    acc = acc.groupby(["seed", "format", "generation"])["value"].mean().unstack("generation")
    if acc.empty or 0 not in acc.columns:
        return {}
    last = int(acc.columns.max())
    chance = chance or {}
    by_format = lambda frame: np.array([chance.get(f, stats.DEFAULT_CHANCE) for f in frame.index.get_level_values("format")])  # noqa: E731
    per_seed = pd.Series(stats.retention(acc[last], acc[0], by_format(acc), min_margin), index=acc.index)
    pooled_last, pooled_0 = acc[last].groupby(level="format").mean(), acc[0].groupby(level="format").mean()
    pooled = pd.Series(stats.retention(pooled_last, pooled_0, by_format(pooled_0), min_margin), index=pooled_0.index)
    out = {f: {"retention": _num(r), "per_seed": [_num(x) for x in per_seed.xs(f, level="format")], "generation": last}
           for f, r in pooled.items()}
    finite = [v["retention"] for v in out.values() if v["retention"] is not None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        seeds = per_seed.groupby(level="seed").mean()
    out["all"] = {"retention": float(np.mean(finite)) if finite else None, "generation": last,
                  "per_seed": [_num(x) for x in seeds]}
    return {f: dict(v, regime=stats.regime(v["retention"])) for f, v in out.items()}


def summarise(metrics: pd.DataFrame, arms: list, answers: pd.DataFrame | None = None, threshold: float = 0.8,
              n_boot: int = 1000, ci: float = 0.95, seed: int = 0, chance: dict | None = None,
              min_margin: float = 0.05) -> dict:
    """Comparisons (domain vs general arm) and regimes of every arm, from metrics rows (+ answers if given).
    chance: format -> chance accuracy (default: from the answers' number of choices, else 0.25)."""
    metrics = _with_seed(metrics)
    if chance is None and answers is not None and "chance" in answers.columns and not answers.empty:
        chance = answers.groupby("format")["chance"].mean().to_dict()
    chance = chance or {}
    arm_cfg = {a["name"]: a for a in (x if isinstance(x, dict) else x.model_dump() for x in arms)}
    comparisons = []
    for dom, gen, domain in pairs(list(arm_cfg.values())):
        ans = None if answers is None else _with_seed(answers)
        ans = ans[ans["subject"] == domain] if ans is not None else None
        if ans is None or ans.empty:  # no per-question answers: the domain's accuracy rows, one 'question'
            ans = _accuracy(metrics, domain).assign(id="*").rename(columns={"value": "correct"})
            ans = ans.assign(chance=[chance.get(f, stats.DEFAULT_CHANCE) for f in ans["format"]])
        result = compare(ans, dom, gen, threshold, n_boot, ci, seed, min_margin)
        known = [f for f, c in result["formats"].items() if c["measurable"] and f != "all"] if "formats" in result else None
        tokens = metrics[metrics.metric == "train_tokens"].groupby(["arm", "seed"])["value"].sum().groupby("arm").mean()
        result.update(domain=domain, domain_arm=dom, general_arm=gen,
                      train_tokens={a: _num(tokens.get(a)) for a in (dom, gen)},
                      elsewhere={a: retention_at_last(metrics, a, "*others*", [domain], chance, min_margin) for a in (dom, gen)},
                      regimes={a: retention_at_last(metrics, a, domain, (), chance, min_margin, known) for a in (dom, gen)})
        comparisons.append(result)
    regimes = {a: retention_at_last(metrics, a, None, (), chance, min_margin) for a in arm_cfg if a in set(metrics["arm"])}
    return {"threshold": threshold, "ci_level": ci, "comparisons": comparisons, "regimes": regimes,
            "retention_definition": "(accuracy(g) - chance) / (accuracy(0) - chance), chance = 1 / number of choices",
            "arms": {a: {k: c.get(k) for k in ("synthetic_ratio", "mode", "domain")} for a, c in arm_cfg.items()}}


def summarise_runs(run_dirs: list[Path], seeds: list | None = None, **kw) -> dict:
    """One config run with several seeds (paired: each run holds both arms of a comparison)."""
    frames, answers, arms = [], [], None
    for i, run_dir in zip(seeds if seeds is not None else range(len(run_dirs)), run_dirs):
        arms = arms or load_arms(run_dir)
        frames.append(load_metrics(run_dir).assign(seed=i))
        domains = {d for _, _, d in pairs(arms)}
        answers.append(load_answers(run_dir, domains).assign(seed=i))
    if not frames:
        raise UserError("resistance: no run directories given")
    ans = pd.concat(answers, ignore_index=True)
    return summarise(pd.concat(frames, ignore_index=True), arms, ans if not ans.empty else None, **kw)


def summarise_run(run_dir: Path, **kw) -> dict:
    """The resistance summary of one run directory (one seed; CIs over questions when answers are logged)."""
    return summarise_runs([Path(run_dir)], **kw)
