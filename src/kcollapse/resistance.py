"""Resistance to collapse: how much longer a domain-specific arm keeps its facts than the general arm.

Keisha et al. (2025) find that synthetic training restricted to the evaluated domain resists knowledge collapse
about 15x longer. Here that claim becomes numbers, from metrics rows (and per-question answers when logged):

- Retention(g) = accuracy(g) / accuracy(0) on the domain's subject, per format ("all" = mean over formats).
  Both arms of a comparison are scored on the same questions: those of the domain arm's subject.
- Generations to fall = the first generation whose retention is below `threshold` (0.8). An arm that never falls
  is censored at N, the last generation observed (its true value is larger).
- Resistance factor = domain arm's generations to fall / general arm's; a censored domain arm gives ">= N/M", a
  censored general arm "<= M/N", both censored no factor. Beside it: the ratio of the areas under the two
  retention curves (mean retention over generations 0..N), which needs no threshold and is never censored.
- Uncertainty: paired bootstrap. Each resample draws seeds (both arms keep the same seeds: they share a run) and
  questions (the same ids in every arm, generation and format) with replacement; CI = percentiles.
- Regime of an arm, from its retention at the last generation (follow-up work's terms): homeostatic (> 0.8),
  bounded (0.6 to 0.8), degradative (< 0.6).
- Beside the factor: equal compute (training tokens of each arm) and the cost elsewhere (retention on the other
  subjects at the last generation).

A domain arm is compared with the general arm of the same run that has the same synthetic_ratio and mode and no
domain restriction. Every function below takes DataFrames, so one run (`summarise_run`) and the seeds of a sweep
point (`summarise_runs`) go through the same code.
"""

from __future__ import annotations

import base64
import html
import io
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from kcollapse.errors import UserError
from kcollapse.io import read_jsonl
from kcollapse.rundir import answer_files, load_metrics

def regime(retention: float | None) -> str | None:
    """homeostatic (> 0.8), bounded (0.6-0.8) or degradative (< 0.6); None for an unknown retention."""
    if retention is None or not np.isfinite(retention):
        return None
    return "homeostatic" if retention > 0.8 else "bounded" if retention >= 0.6 else "degradative"


def generations_to_fall(retention, generations=None, threshold: float = 0.8) -> tuple[int, bool]:
    """(first generation with retention < threshold, censored); censored at the last generation when it never falls."""
    ret = np.asarray(retention, dtype=float)
    gens = np.arange(len(ret)) if generations is None else np.asarray(generations)
    below = np.flatnonzero(ret[1:] < threshold)
    return (int(gens[1:][below[0]]), False) if below.size else (int(gens[-1]), True)


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


def auc(retention, generations) -> float:
    """Mean retention over generations 0..N (trapezoid area / N)."""
    ret, gens = np.asarray(retention, float), np.asarray(generations, float)
    return float(np.trapezoid(ret, gens) / (gens[-1] - gens[0])) if len(gens) > 1 else float("nan")


# ------------------------------------------------------------------------------------------------ loading

def load_arms(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"{path}: not found; is {run_dir} a kcollapse run directory?")
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("arms") or []


def load_answers(run_dir: Path, subjects) -> pd.DataFrame:
    """Per-question correctness of these subjects: arm, generation, format, subject, id, correct."""
    rows = []
    for subject in subjects:
        for (arm, gen, fmt), paths in answer_files(run_dir, subject).items():
            rows += [(arm, gen, fmt, subject, str(r.get("id")), r.get("is_correct")) for path in paths for r in read_jsonl(path)]
    df = pd.DataFrame(rows, columns=["arm", "generation", "format", "subject", "id", "correct"])
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
            ci: float = 0.95, seed: int = 0) -> dict:
    """Resistance factor and AUC ratio per format, with paired bootstrap CIs.

    `correct`: columns seed (optional), arm, generation, format, id, correct (0/1 per question; or one row per
    format with id '*' and correct = accuracy when only metric rows exist).
    """
    df = _with_seed(correct)
    df = df[df["arm"].isin([domain_arm, general_arm])].dropna(subset=["correct"])
    gens = sorted(set.intersection(*(set(df.loc[df.arm == a, "generation"]) for a in (domain_arm, general_arm))))
    if 0 not in gens or len(gens) < 2:
        return {"error": "needs generation 0 and at least one later generation in both arms"}
    seeds, formats, ids = sorted(df["seed"].unique()), sorted(df["format"].unique()), sorted(df["id"].unique())
    arms = [domain_arm, general_arm]
    full = pd.MultiIndex.from_product([seeds, arms, gens, formats], names=["seed", "arm", "generation", "format"])
    table = df.pivot_table(index=["seed", "arm", "generation", "format"], columns="id", values="correct", aggfunc="mean")
    X = table.reindex(index=full, columns=ids).to_numpy().reshape(len(seeds), 2, len(gens), len(formats), len(ids))
    rng = np.random.default_rng(seed)
    S, Q = len(seeds), len(ids)
    boot = n_boot if S > 1 or Q > 1 else 0
    W = np.vstack([np.ones(S), rng.multinomial(S, np.full(S, 1 / S), size=boot)])  # replicate 0 = the data
    C = np.vstack([np.ones(Q), rng.multinomial(Q, np.full(Q, 1 / Q), size=boot)])
    present = ~np.isnan(X)
    num = np.einsum("bs,bq,sagfq->bagf", W, C, np.nan_to_num(X), optimize=True)
    den = np.einsum("bs,bq,sagfq->bagf", W, C, present.astype(float), optimize=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = num / den
        ret = acc / acc[:, :, :1, :]
    with warnings.catch_warnings():  # a format without a baseline is left out of "all"
        warnings.simplefilter("ignore", RuntimeWarning)
        ret = np.concatenate([ret, np.nanmean(np.where(np.isfinite(ret), ret, np.nan), axis=3, keepdims=True)], axis=3)
    g = np.asarray(gens)
    below = ret[:, :, 1:, :] < threshold
    fell = below.any(axis=2)
    t = np.where(fell, g[1:][below.argmax(axis=2)], g[-1])  # (B, arm, format)
    with np.errstate(invalid="ignore", divide="ignore"):
        factor = np.where(fell[:, 0] | fell[:, 1], t[:, 0] / t[:, 1], np.nan)
        area = np.trapezoid(ret, g, axis=2) / (g[-1] - g[0])
        auc_ratio = area[:, 0] / area[:, 1]
    q = [(1 - ci) / 2 * 100, (1 + ci) / 2 * 100]

    def interval(values):
        v = values[1:][np.isfinite(values[1:])]
        return [float(x) for x in np.percentile(v, q)] if v.size >= 10 else None

    out = {}
    for f, fmt in enumerate(formats + ["all"]):
        value, text = factor_text(int(t[0, 0, f]), not fell[0, 0, f], int(t[0, 1, f]), not fell[0, 1, f])
        if not np.isfinite(ret[0, :, 0, f]).all():
            value, text = None, "n/a (no accuracy at generation 0)"
        out[fmt] = {
            "factor": value, "text": text, "ci": interval(factor[:, f]),
            "generations_to_fall": {domain_arm: int(t[0, 0, f]), general_arm: int(t[0, 1, f])},
            "censored": {domain_arm: bool(not fell[0, 0, f]), general_arm: bool(not fell[0, 1, f])},
            "auc_ratio": _num(auc_ratio[0, f]), "auc_ratio_ci": interval(auc_ratio[:, f]),
            "retention": {a: [_num(x) for x in ret[0, i, :, f]] for i, a in enumerate(arms)},
            "retention_ci": {a: [interval(ret[:, i, k, f]) for k in range(len(gens))] for i, a in enumerate(arms)},
        }
    return {"generations": [int(x) for x in gens], "seeds": [s.item() if hasattr(s, "item") else s for s in seeds], "questions": Q,
            "method": "paired bootstrap over " + " and ".join(n for n, k in (("seeds", S), ("questions", Q)) if k > 1)
            if boot else "point estimate (one seed, no per-question answers)", "n_boot": boot, "formats": out}


def _num(x):
    return float(x) if x is not None and np.isfinite(x) else x if isinstance(x, str) else None


def retention_at_last(metrics: pd.DataFrame, arm: str, subject=None, exclude=()) -> dict[str, dict]:
    """format -> {retention, per_seed, generation} at the arm's last generation (subject None = all questions;
    subject '*others*' = mean over benchmark subjects except `exclude`)."""
    if subject == "*others*":
        acc = _with_seed(metrics[(metrics.metric == "accuracy") & metrics.subject.notna() & metrics.format.notna()])
        acc = acc[~acc.subject.isin(list(exclude)) & ~acc.subject.astype(str).str.startswith("split:")]
    else:
        acc = _accuracy(metrics, subject)
    acc = acc[acc["arm"] == arm].groupby(["seed", "format", "generation"])["value"].mean().unstack("generation")
    if acc.empty or 0 not in acc.columns:
        return {}
    last = int(acc.columns.max())
    with np.errstate(invalid="ignore", divide="ignore"):
        per_seed = (acc[last] / acc[0]).replace([np.inf, -np.inf], np.nan)  # (seed, format)
        pooled = acc[last].groupby(level="format").mean() / acc[0].groupby(level="format").mean()
    out = {f: {"retention": _num(r), "per_seed": [_num(x) for x in per_seed.xs(f, level="format")], "generation": last}
           for f, r in pooled.items()}
    finite = [v["retention"] for v in out.values() if v["retention"] is not None]
    out["all"] = {"retention": float(np.mean(finite)) if finite else None, "generation": last,
                  "per_seed": [_num(x) for x in per_seed.groupby(level="seed").mean()]}
    return out


def summarise(metrics: pd.DataFrame, arms: list, answers: pd.DataFrame | None = None, threshold: float = 0.8,
              n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> dict:
    """Comparisons (domain vs general arm) and regimes of every arm, from metrics rows (+ answers if given)."""
    metrics = _with_seed(metrics)
    arm_cfg = {a["name"]: a for a in (x if isinstance(x, dict) else x.model_dump() for x in arms)}
    comparisons = []
    for dom, gen, domain in pairs(list(arm_cfg.values())):
        ans = None if answers is None else _with_seed(answers)
        ans = ans[ans["subject"] == domain] if ans is not None else None
        if ans is None or ans.empty:  # no per-question answers: the domain's accuracy rows, one 'question'
            ans = _accuracy(metrics, domain).assign(id="*").rename(columns={"value": "correct"})
        result = compare(ans, dom, gen, threshold, n_boot, ci, seed)
        tokens = metrics[metrics.metric == "train_tokens"].groupby(["arm", "seed"])["value"].sum().groupby("arm").mean()
        result.update(domain=domain, domain_arm=dom, general_arm=gen,
                      train_tokens={a: _num(tokens.get(a)) for a in (dom, gen)},
                      elsewhere={a: retention_at_last(metrics, a, "*others*", exclude=[domain]) for a in (dom, gen)},
                      regimes={a: {f: dict(v, regime=regime(v["retention"])) for f, v in
                                   retention_at_last(metrics, a, domain).items()} for a in (dom, gen)})
        comparisons.append(result)
    regimes = {a: {f: dict(v, regime=regime(v["retention"])) for f, v in retention_at_last(metrics, a).items()}
               for a in arm_cfg if a in set(metrics["arm"])}
    return {"threshold": threshold, "ci_level": ci, "comparisons": comparisons, "regimes": regimes,
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


def lines(summary: dict, label: str = "") -> list[str]:
    """Plain-text lines: each comparison's factor, CI and AUC ratio per format, then the regimes."""
    pct, out = int(round(summary["ci_level"] * 100)), []
    for c in summary["comparisons"]:
        out.append(f"{label}{c['domain_arm']} vs {c['general_arm']} on {c['domain']} (retention < {summary['threshold']}; "
                   f"{len(c.get('seeds') or [])} seed(s); {c.get('method', c.get('error'))}; train tokens "
                   + " vs ".join(f"{t:,.0f}" if t else "?" for t in c["train_tokens"].values()) + ")")
        for fmt, f in c.get("formats", {}).items():
            ci = f"[{f['ci'][0]:.2f}, {f['ci'][1]:.2f}]" if f["ci"] else "[-]"
            ar = f"{f['auc_ratio']:.2f}" if f["auc_ratio"] is not None else "n/a"
            aci = f" [{f['auc_ratio_ci'][0]:.2f}, {f['auc_ratio_ci'][1]:.2f}]" if f["auc_ratio_ci"] else ""
            out.append(f"  {fmt:<26} resistance factor {f['text']:<20} {pct}% CI {ci:<14} AUC ratio {ar}{aci}")
    for arm, fmts in summary["regimes"].items():
        if "all" in fmts:
            r = fmts["all"]
            out.append(f"{label}regime {arm}: {r['regime']} (retention {ratio_text(r['retention'])} at generation "
                       f"{r['generation']}, mean over formats, all subjects)")
    return out


# ------------------------------------------------------------------------------------------------ report

def retention_figure(c: dict, threshold: float = 0.8, fmt: str = "all") -> bytes:
    """PNG: both arms' retention on the domain's subject with bootstrap bands, the threshold and regime lines."""
    import matplotlib  # deferred: matplotlib is slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: matplotlib is slow to import

    f, gens = c["formats"][fmt], c["generations"]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for arm, color in ((c["domain_arm"], "#1f77b4"), (c["general_arm"], "#d62728")):
        ax.plot(gens, [np.nan if v is None else v for v in f["retention"][arm]], "o-", color=color, label=arm)
        band = [(b or [np.nan, np.nan]) for b in f["retention_ci"][arm]]
        ax.fill_between(gens, [b[0] for b in band], [b[1] for b in band], color=color, alpha=0.15, lw=0)
    ax.axhline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold}")
    ax.axhspan(0.6, 0.8, color="#f6c343", alpha=0.12, lw=0)
    ax.axhspan(ax.get_ylim()[0] if ax.get_ylim()[0] < 0.6 else 0.0, 0.6, color="#e4572e", alpha=0.08, lw=0)
    ax.set(xlabel="generation", ylabel=f"retention on {c['domain']}", title=f"{fmt} · factor {f['text']}")
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _ci(v) -> str:
    return f"[{v[0]:.2f}, {v[1]:.2f}]" if v else "–"


def ratio_text(v) -> str:
    return "–" if v is None else f"{v:.2f}"


def html_section(summary: dict, label: str = "") -> str:
    """HTML (escaped; figures embedded as base64) of one summary: the factor table, retention curves, regimes."""
    e, pct = html.escape, int(round(summary["ci_level"] * 100))
    head = ["domain arm", "general arm", "format", "resistance factor", f"{pct}% CI", "AUC ratio", f"{pct}% CI",
            "gens to fall (domain / general)", "regime on the domain (domain / general)", "retention elsewhere (domain / general)"]
    rows, figs = [], []
    for c in summary["comparisons"]:
        if "error" in c:
            rows.append(f"<tr><td>{e(c['domain_arm'])}</td><td>{e(c['general_arm'])}</td><td colspan=8>{e(c['error'])}</td></tr>")
            continue
        d, g = c["domain_arm"], c["general_arm"]
        for fmt, f in c["formats"].items():
            reg = " / ".join(str((c["regimes"][a].get(fmt) or {}).get("regime")) for a in (d, g))
            other = " / ".join(ratio_text((c["elsewhere"][a].get(fmt) or {}).get("retention")) for a in (d, g))
            cells = [d, g, fmt, f["text"], _ci(f["ci"]), ratio_text(f["auc_ratio"]), _ci(f["auc_ratio_ci"]),
                     " / ".join(f"{f['generations_to_fall'][a]}{'+' if f['censored'][a] else ''}" for a in (d, g)), reg, other]
            rows.append("<tr>" + "".join(f"<td>{e(str(x))}</td>" for x in cells) + "</tr>")
        tokens = " vs ".join(f"{e(a)}: {t:,.0f}" if t else f"{e(a)}: ?" for a, t in c["train_tokens"].items())
        figs.append(f"<p class='note'>{e(label)}{e(d)} vs {e(g)} on {e(c['domain'])}: {len(c['seeds'])} seed(s), "
                    f"{c['questions']} question(s), {e(c['method'])}; training tokens (equal compute) {tokens}.</p>"
                    f"<img alt='retention of {e(d)} and {e(g)}' src='data:image/png;base64,"
                    f"{base64.b64encode(retention_figure(c, summary['threshold'])).decode()}'>")
    table = ("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>") if rows else \
        "<p class='note'>No domain arm with a general arm of the same synthetic ratio to compare with.</p>"
    reg_rows = "".join(f"<tr><td>{e(arm)}</td><td>{e(fmt)}</td><td>{ratio_text(v['retention'])}</td><td>{e(str(v['regime']))}</td>"
                       f"<td>{v['generation']}</td></tr>" for arm, fmts in summary["regimes"].items() for fmt, v in fmts.items())
    return (f"{table}<p class='note'>Retention = accuracy(g) / accuracy(0) on the domain's subject; factor = generations "
            f"until retention falls below {summary['threshold']}, domain arm over general arm (a '+' marks an arm that never "
            "fell: censored at the last generation, so the factor is a bound); AUC ratio = ratio of mean retention over "
            "all generations.</p>" + "".join(figs) +
            "<h3>Regimes (all questions, last generation)</h3><p class='note'>homeostatic: retention &gt; 0.8 · bounded: "
            "0.6-0.8 · degradative: &lt; 0.6</p><table><tr><th>arm</th><th>format</th><th>retention</th><th>regime</th>"
            f"<th>generation</th></tr>{reg_rows}</table>")
