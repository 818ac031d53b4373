"""Does collapse depend on the instruction format? Per arm: per-format onsets with intervals, the format x
generation interaction test, and a verdict in words (Keisha et al. 2025's central claim, measured).

stages.py hands over, per format, the per-question answers frames of every generation (`stages.answers_frame`)
and its own per-format result (baseline, `knowledge_measurable`); the statistics are kcollapse.stats's
(docs/STATISTICS.md defines them):

- One paired bootstrap per arm: the questions are resampled once (`rules.n_boot` multinomial draws) and the same
  draw weighs every generation and every format, so generations and formats are compared on the same questions.
- Onsets: in each resample, B's effect-size condition (retention above chance < `retention_b`) and C's (the
  format signal falls by `format_drop`, repetition rises by `repetition_rise`, the length changes by a factor
  `words_factor` while the format signal does not rise, the answers' fluency falls by `fluency_drop`) per
  generation; the onset is the first generation from which it holds `persist` generations in a row. The
  significance part of the stage rule is what the resampling replaces, so the data's onset here can come a
  generation before `onset_B` when the drop there is not yet significant. Censoring-aware intervals (stats.onset_interval): never reached is ">= last generation".
- Only measurable formats (stages' `knowledge_measurable`: generation-0 accuracy more than `min_margin` above
  chance) enter the interaction test and the comparison of onsets: a format at chance has no knowledge to lose.
- The verdict: format dependence found when the interaction test's p < ALPHA, or two measurable formats' B (or C)
  onset intervals do not overlap; otherwise "this run found no format dependence". Found by the interaction alone
  while no format reached B or C, it says so: the formats' accuracies moved apart (a control over 20 generations
  can: alpha 0's largest drift 0.07, chi2(65) = 101.3, p = 0.003), but nothing collapsed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from kcollapse import stats
from kcollapse.config import StageRules

ALPHA = 0.05
METHOD = ("questions resampled with replacement (paired: one draw for every generation and format of the arm); "
          "onset = first generation from which the stage's effect-size condition holds `persist` generations in a "
          "row; never reached: censored, '>= last generation'; interaction: accuracy ~ format * generation (both factors), cluster-robust by question, Wald test (the verdict reads it); logistic regression correct ~ format * "
          "generation, cluster-robust by question, Wald test; ANOVA: the paper's two-way form")


def _matrix(frames: dict[int, pd.DataFrame], gens: list[int], ids: pd.Index, col: str) -> np.ndarray:
    """generations x questions of one per-question column (NaN: not asked, or not asked at generation 0)."""
    out = np.full((len(gens), len(ids)), np.nan)
    for i, g in enumerate(gens):
        f = frames.get(g)
        if f is not None and not f.empty and col in f:
            out[i] = f[col].reindex(ids).to_numpy(float)
    out[:, np.isnan(out[0])] = np.nan  # paired with generation 0, as the stage rule's bootstrap is
    return out


def _c_flags(frames, gens, ids, counts, rules: StageRules, signal: str) -> np.ndarray:
    """replicates x generations: do C's per-question conditions hold (generation 0 never)?"""
    flags = np.zeros((counts.shape[0], len(gens)), bool)
    present = lambda m: not np.isnan(m[0]).all() and not np.isnan(m[1:]).all()  # noqa: E731
    format_rose = np.zeros_like(flags)
    for col in (signal, "adherent"):  # runs without the signal fall back to format adherence
        m = _matrix(frames, gens, ids, col)
        if present(m):
            means = stats.weighted_means(counts, m)
            flags |= means - means[:, :1] <= -rules.format_drop
            format_rose = means > means[:, :1]
            break
    m = _matrix(frames, gens, ids, "repetition")
    if present(m):
        means = stats.weighted_means(counts, m)
        flags |= means - means[:, :1] >= rules.repetition_rise
    m = _matrix(frames, gens, ids, "words")
    if present(m):
        means = stats.weighted_means(counts, m)
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = means / means[:, :1]
        flags |= (means[:, :1] > 0) & ((ratio < 1 / rules.words_factor) | (ratio > rules.words_factor)) & ~format_rose
    flags[:, 0] = False
    return flags


def _fluency_flags(gens, rules: StageRules, fluency: dict) -> np.ndarray:
    """1 x generations: has the answers' fluency fallen by `fluency_drop`? One metric row per generation, not per
    question, so it is the same in every replicate: an onset it sets has no sampling interval."""
    v0 = fluency.get(gens[0])
    drop = np.array([bool(v0) and fluency.get(g) is not None and (v0 - fluency[g]) / abs(v0) >= rules.fluency_drop
                     for g in gens])
    drop[0] = False
    return drop[None, :]


def _onset(flags, gens, rules: StageRules, valid=None) -> dict:
    on, reached = stats.onset_generations(flags, gens, rules.persist)
    ci, kind = stats.onset_interval(on, reached, gens[-1], valid, rules.ci)
    point = int(on[0]) if reached[0] else None
    return {"generation": point, "reached": bool(reached[0]), "ci": ci, "ci_kind": kind,
            "text": onset_text(point, gens[-1], ci)}


def _onset_c(per_question, fluency, gens, rules: StageRules) -> dict:
    """C's onset from every condition; when the fluency row alone moves it earlier than the per-question signals do,
    its interval comes from no resampling (`resampled` false) and no comparison of intervals may read it."""
    out = _onset(per_question | fluency, gens, rules)
    alone = _onset(per_question, gens, rules)
    out["resampled"] = alone["generation"] == out["generation"]
    if not out["resampled"]:
        out["text"] += " (set by the answers' fluency, one number per generation: no sampling interval)"
    return out


def onset_text(point: int | None, last: int, ci) -> str:
    """'gen 3 [3, 4]', 'gen 3 [2, ∞)', or '>= 5 (not reached) [5, ∞)': a never-reached onset is an open bound."""
    span = "[n/a]" if ci is None else f"[{ci[0]:.0f}, {'∞)' if ci[1] is None else f'{ci[1]:.0f}]'}"
    return f"gen {point} {span}" if point is not None else f">= {last} (not reached) {span}"


def _overlap(a: list, b: list) -> bool:
    """Do two onset intervals (an open upper end is None) share a generation?"""
    hi_a, hi_b = (np.inf if a[1] is None else a[1]), (np.inf if b[1] is None else b[1])
    return a[0] <= hi_b and b[0] <= hi_a


def balanced_answers(frames: dict[str, dict[int, pd.DataFrame]], formats: list[str],
                     col: str = "correct") -> tuple[pd.DataFrame, dict]:
    """Long frame (question, format, generation, correct: the frames' `col`) of the questions answered in every
    format at every generation the formats share (a balanced design), and what was left out."""
    gens = sorted(set.intersection(*[{g for g, f in frames[fmt].items() if not f.empty} for fmt in formats]))
    ids = pd.Index([])
    for fmt in formats:
        for g in gens:
            idx = frames[fmt][g].index
            ids = idx if fmt == formats[0] and g == gens[0] else ids.intersection(idx)
    all_ids = set().union(*[set(f.index) for fmt in formats for f in frames[fmt].values()])
    rows = [pd.DataFrame({"question": ids, "format": fmt, "generation": g,
                          "correct": frames[fmt][g].loc[ids, col].to_numpy(float)})
            for fmt in formats for g in gens]
    answers = pd.concat(rows, ignore_index=True).dropna() if rows else pd.DataFrame(columns=["question", "correct"])
    return answers, {"generations": gens, "questions_left_out": len(all_ids) - answers["question"].nunique()}


def analyse(frames: dict[str, dict[int, pd.DataFrame]], formats: dict[str, dict], fluency: dict[str, dict],
            rules: StageRules, signal: str) -> dict[str, Any]:
    """The arm's `format_dependence` block of stages.json (CONTRACTS.md). frames: format -> generation -> answers
    frame; formats: stages' per-format results; fluency: format -> generation -> the answers' fluency row;
    signal: the per-question column C reads the format from."""
    usable = [f for f in formats if "error" not in formats[f] and 0 in frames.get(f, {}) and len(frames[f]) > 1]
    out: dict[str, Any] = {"method": METHOD, "alpha": ALPHA, "formats": {}}
    ids = pd.Index(sorted(set().union(*[set(fr.index) for f in usable for fr in frames[f].values()])))
    counts = stats.resample_counts(len(ids), rules.n_boot, np.random.default_rng([rules.seed, 16]))
    acc_col = "correct" if rules.accuracy == "accuracy" else "judged_correct"  # the stage rule's accuracy
    for fmt in usable:
        gens = sorted(frames[fmt])
        acc = stats.weighted_means(counts, _matrix(frames[fmt], gens, ids, acc_col))
        chance = formats[fmt]["baseline"]["chance"]
        measurable = bool(formats[fmt].get("knowledge_measurable"))
        entry: dict[str, Any] = {
            "measurable": measurable, "generations": gens,
            "accuracy": [{"generation": g, "accuracy": float(acc[0, i]), "ci": stats.interval(acc[:, i], rules.ci)}
                         for i, g in enumerate(gens)],
            "onset_C": _onset_c(_c_flags(frames[fmt], gens, ids, counts, rules, signal),
                                _fluency_flags(gens, rules, fluency.get(fmt, {})), gens, rules)}
        if measurable:
            ret = stats.retention(acc, acc[:, :1], chance, rules.min_margin)
            valid = np.isfinite(ret[:, 0])  # a resample whose generation 0 is not above chance measures nothing
            with np.errstate(invalid="ignore"):
                flags = ret < rules.retention_b
            flags[:, 0] = False
            entry["onset_B"] = _onset(flags, gens, rules, valid)
        else:
            entry["onset_B"] = None
            acc0 = formats[fmt]["baseline"]["accuracy"]
            entry["note"] = f"at chance at generation 0 (accuracy {acc0:.2f}): no knowledge to lose"
        out["formats"][fmt] = entry
    tested = [f for f in usable if out["formats"][f]["measurable"]]
    out["tested_formats"] = tested
    out["excluded"] = {f: out["formats"][f]["note"] for f in usable if f not in tested}
    out["excluded"].update({f: "no generation-0 answers or a single generation" for f in formats if f not in usable})
    out["interaction"], out["non_overlapping"] = None, []
    if len(tested) < 2:
        what = f"one measurable format ({tested[0]})" if tested else "no measurable format"
        out["message"] = f"{what}: no format x generation interaction to test"
        out["format_dependent"] = None
        out["verdict"] = f"{what}, so format dependence cannot be tested"
        return out
    answers, left = balanced_answers(frames, tested, acc_col)
    if len(left["generations"]) < 2 or answers["question"].nunique() < 2:
        out["message"] = (f"formats {', '.join(tested)}: fewer than two questions or generations answered in all of "
                          "them, so no format x generation interaction to test")
        out["format_dependent"] = None
        out["verdict"] = out["message"]
        return out
    out["interaction"] = {**stats.interaction_tests(answers), **left}
    out["non_overlapping"] = separated(out["formats"], tested)
    out.update(verdict(out))
    return out


def separated(formats: dict[str, dict], tested: list[str]) -> list[dict]:
    """Pairs of formats whose B (or C) onset intervals do not overlap, at least one of the two reached, both
    intervals from the resampling (a fluency-set C onset has none)."""
    out = []
    for stage in ("onset_B", "onset_C"):
        for i, a in enumerate(tested):
            for b in tested[i + 1:]:
                oa, ob = formats[a][stage], formats[b][stage]
                resampled = oa.get("resampled", True) and ob.get("resampled", True)
                if (oa["ci"] and ob["ci"] and resampled and (oa["reached"] or ob["reached"])
                        and not _overlap(oa["ci"], ob["ci"])):
                    out.append({"stage": stage[-1], "formats": [a, b], "onsets": [oa["text"], ob["text"]]})
    return out


def interaction_text(inter: dict) -> tuple[str, float | None]:
    """The interaction test the verdict reads, in words, and its p-value: the accuracy-scale one with
    question-clustered errors (stats.interaction_tests says why); else the logistic; else the ANOVA."""
    ac, lg, av = inter["accuracy"], inter["logistic"], inter["anova"]
    if ac.get("p_value") is not None:
        return (f"format x generation interaction on accuracy chi2({ac['df']}) = {ac['statistic']:.2f}, "
                f"{p_text(ac['p_value'])}"), ac["p_value"]
    if lg.get("p_value") is not None:
        text = f"format x generation interaction chi2({lg['df']}) = {lg['statistic']:.2f}, {p_text(lg['p_value'])}"
        return text, lg["p_value"]
    if av.get("p_value") is not None:
        return (f"format x generation interaction F({av['df1']}, {av['df2']}) = {av['F']:.2f}, {p_text(av['p_value'])} "
                f"(two-way ANOVA; logistic test not computed: {lg.get('note')})"), av["p_value"]
    return "format x generation interaction not computable", None


def p_text(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def verdict(out: dict) -> dict:
    text, p = interaction_text(out["interaction"])
    pairs = out["non_overlapping"]
    found = (p is not None and p < ALPHA) or bool(pairs)
    onsets = "; ".join(f"{d['stage']} onsets {d['formats'][0]} {d['onsets'][0]} vs {d['formats'][1]} {d['onsets'][1]} "
                       "do not overlap" for d in pairs) or "the onset intervals overlap"
    words = "format dependence found" if found else "this run found no format dependence"
    reached = [f for f in out.get("tested_formats", [])
               if any((out["formats"][f].get(s) or {}).get("reached") for s in ("onset_B", "onset_C"))]
    if found and not pairs and not reached:  # e.g. a control over many generations: small drifts that differ
        onsets += "; no format reached B or C (the formats' accuracies moved apart; nothing collapsed)"
    return {"format_dependent": found, "verdict": f"{words}: {text}; {onsets}"}
