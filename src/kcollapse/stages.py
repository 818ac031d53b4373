"""Stage classifier: for every arm x format x generation, is the model in stage A, B or C?

Keisha et al. (2025) describe recursive synthetic training in three stages. A: knowledge is preserved.
B: *knowledge collapse*, accuracy falls while the answers keep their fluency and format (the model is
confidently wrong). C: *instruction-following collapse*, the format and the fluency of the answers break too.
This module turns a run directory into those letters, against the generation-0 baseline, with uncertainty.

The default rule (every number is a field of `StageRules`, overridable by a `stages:` section in
RUN_DIR/config.yaml or by a YAML file of those fields; the statistics are kcollapse.stats's, every definition is
in docs/STATISTICS.md):

- Accuracy is measured above chance: retention = (acc_g - chance) / (acc_0 - chance) (stats.retention).
- With per-question answers (arms/<arm>/gen_<g>/answers/*.jsonl) every signal is a paired bootstrap over the
  questions present at both generation g and generation 0 (`n_boot` resamples, `ci` level).
- Without answers the metric rows stand in (`accuracy`, `answer_wellformed` or `format_adherence`,
  `answer_repetition`, `answer_words`) and "significant" is replaced by `min_drop`.
- C's condition, against generation 0: the share of well-formed free-text answers (`answer_wellformed`; or
  `format_adherence` with `format_signal: format_adherence`, the fallback for runs without it) drops by at least
  `format_drop`, answer repetition (repeated word 4-grams) rises by at least `repetition_rise`, the answer length
  changes by more than a factor `words_factor` while that format signal did not rise (a base model that rambled at
  generation 0 and learns to answer in a word is learning the format, not losing it), or the fluency of the
  answers (`fluency` rows of subject `answers`: model g's own answers) falls by more than `fluency_drop`
  (relative); with answers each change must also be significant (its CI excludes no change).
- B's condition: retention < `retention_b` and the accuracy drop is significant (the CI of acc_g - acc_0 is below
  0; without answers: a drop of at least `min_drop`).
- The letter: C if C's condition holds, else B if B's, else A. Generation 0 is A by definition.
- Position bias (answers asked in two option orders, eval.permutation): a generation is flagged when
  `position_bias` (how far the picked letters' distribution is from the gold letters', both orders pooled) is at
  least `rules.position_bias` and the same letter is picked in both orders more often than the same option. The
  flag does not change the letter; it says that a falling accuracy and a high `max_freq` are a drift to one
  option position rather than (only) lost knowledge: the point's `position_note`, the format's
  `position_bias_generations` and `onset_position_bias`, "(position bias)" after the B onset in the tables.
- Onset of B (of C): the first generation from which B's (C's) own condition holds for `persist` evaluated
  generations in a row (fewer at the end of the run), so that one noisy generation starts nothing. B's onset
  does not follow C: answers that break while the facts stay are C with no B onset.
- Model-centric signals (`model_signals`: held-out perplexity of model g; entropy, distinct-n and repetition of
  the text model g wrote, which is generation g+1's synthetic mix) are reported beside, indexed by the model they
  describe. The *model warning* is the first model generation (same persistence) where one moves by its
  relative change against model 0. Lead time = first task-centric onset (the earlier of B and C) - model warning,
  in model generations: positive when the model-centric metrics warned first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from pydantic import ValidationError

from kcollapse import dependence, stats
from kcollapse.config import PAPER_FORMATS, StageRules
from kcollapse.errors import UserError
from kcollapse.evaluate import freetext, metrics
from kcollapse.evaluate.formats import LETTERS, get_format
from kcollapse.evaluate.metrics import option_consistency, position_bias, position_consistency, position_shares
from kcollapse.evaluate.textstats import repetition
from kcollapse.io import atomic_write_json, read_jsonl
from kcollapse.rundir import answer_files, load_metrics
from kcollapse.tables import print_stages


def load_rules(run_dir: Path, rules_file: Path | None = None) -> StageRules:
    """Defaults, then the `stages:` section of RUN_DIR/config.yaml, then `rules_file` (a YAML of StageRules)."""
    data: dict = {}
    sources = [(Path(run_dir) / "config.yaml", True)] + ([(Path(rules_file), False)] if rules_file else [])
    for path, section in sources:
        if not path.is_file():
            if not section:
                raise UserError(f"{path}: stage rules file not found")
            continue
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise UserError(f"{path}: cannot read YAML ({e.__class__.__name__})") from None
        part = raw.get("stages") if section and isinstance(raw, dict) else raw
        if part is None:
            continue
        if not isinstance(part, dict):
            raise UserError(f"{path}: stages: expected a mapping of StageRules fields")
        data.update(part)
    try:
        return StageRules.model_validate(data)
    except ValidationError as err:
        e = err.errors()[0]
        raise UserError(f"stage rules: {'.'.join(map(str, e['loc']))}: {e['msg']} (from {sources[-1][0]})") from None


# ----------------------------------------------------------------------------------------------- loading

def answers_frame(paths: list[Path], rules: StageRules) -> pd.DataFrame:
    """Per-question signals of one arm x generation x format, indexed by question id."""
    rows, files = [], [(path, read_jsonl(path)) for path in paths]
    for path, records in files:
        for r in records:
            if "id" not in r or "is_correct" not in r:
                raise UserError(f"{path}: answer record lacks 'id' or 'is_correct'")
    _apply_text_rule(files)
    for path, records in files:
        for r in records:
            if rules.subject and rules.subject.startswith("split:"):
                if r.get("split") != rules.subject[6:]:
                    continue
            elif rules.subject and r.get("subject") != rules.subject:
                continue
            text = r.get("answer_text")
            judged = r.get("judged_index")
            conf = r.get("confidence")
            correct = float(bool(r["is_correct"]))
            rows.append({
                "id": str(r["id"]),
                "correct": correct,
                "judged_correct": float(judged == r.get("correct_index")) if text is not None else np.nan,
                "adherent": _adherent(r, path) if text is not None else np.nan,
                "wellformed": float(bool(r["answer_wellformed"])) if text is not None else np.nan,
                "words": float(len(text.split())) if isinstance(text, str) else np.nan,
                "repetition": repetition(text) if isinstance(text, str) else np.nan,
                "confidence": float(conf) if conf is not None else np.nan,
                "confident_wrong": float(correct == 0 and conf is not None and conf >= rules.confident_threshold)
                if conf is not None else np.nan,
                "chance": stats.chance_of(len(r["choices"])) if r.get("choices") else np.nan,
            })
    df = pd.DataFrame(rows)
    return df.drop_duplicates("id", keep="last").set_index("id") if not df.empty else df


# format_signal -> (its per-question column in answers_frame, how a C reason names it); runs without the signal
# (older runs, imported logs) fall back to format_adherence
FORMAT_SIGNALS = {"answer_wellformed": ("wellformed", "well-formed answers"),
                  "format_adherence": ("adherent", "format adherence")}


def _letters(path: Path) -> bool:
    """Is the answers file's format answered with a letter? (unknown formats: no)"""
    try:
        return get_format(path.stem.rsplit("__", 1)[1]).answer == "letter"
    except UserError:
        return False


def _adherent(record: dict, path: Path) -> float:
    """The record's `format_adherent`, the `format_adherence` metric's own definition (an option named within the
    first words, not degenerate); records that lack it (older runs, imported logs) get that same rule applied."""
    if record.get("format_adherent") is not None:
        return float(bool(record["format_adherent"]))
    _, position = freetext.judge_mention(record["answer_text"], record.get("choices") or [], letters=_letters(path))
    return float(bool(metrics.adheres(record["answer_text"], position)))


def position_check(paths: list[Path], rules: StageRules, max_freq: float | None = None) -> dict | None:
    """Position-bias signals of one arm x generation x format from its two-order answers (None without them)."""
    records = [r for p in paths for r in read_jsonl(p) if r.get("perm_shift") is not None]
    if rules.subject and rules.subject.startswith("split:"):
        records = [r for r in records if r.get("split") == rules.subject[6:]]
    elif rules.subject:
        records = [r for r in records if r.get("subject") == rules.subject]
    if not records:
        return None
    shares = position_shares(records)
    top = max(shares, key=lambda p: shares[p][0])
    out = {"position_bias": position_bias(records), "position_consistency": position_consistency(records),
           "option_consistency": option_consistency(records),
           "top_position": LETTERS[top] if top < len(LETTERS) else str(top), "top_share": shares[top][0],
           "gold_share": shares[top][1], "n": len(records)}
    out["flagged"] = bool(out["position_bias"] >= rules.position_bias
                          and out["position_consistency"] > out["option_consistency"])
    if out["flagged"]:
        out["note"] = (f"position bias: {out['top_share']:.0%} of picks on {out['top_position']} over both option orders "
                       f"(gold {out['gold_share']:.0%} there){f', max_freq {max_freq:.2f}' if max_freq is not None else ''}; "
                       f"same letter in both orders {out['position_consistency']:.0%}, same option "
                       f"{out['option_consistency']:.0%}")
    return out


def _apply_text_rule(files: list[tuple[Path, list[dict]]]) -> None:
    """Answered records that do not say whether they are well-formed (written before `answer_wellformed` existed,
    imported logs) get the evaluator's fields: `format_adherent`, `answer_wellformed` by the text rule (their format's
    answer kind is unknown: adherent, or short and not degenerate) and, over the format's questions in every file
    together, `metrics.mark_shared_answers`, as the evaluator marks its own."""
    bare = []
    for path, records in files:
        for r in records:
            if "answer_wellformed" not in r and r.get("answer_text") is not None:
                r["format_adherent"] = bool(_adherent(r, path))
                r["answer_wellformed"] = bool(metrics.wellformed(r["answer_text"], r.get("judged_index") is not None,
                                                                 letters=False))
                bare.append(r)
    metrics.mark_shared_answers(bare)


def _metric(df: pd.DataFrame, arm: str, metric: str, fmt: str | None, subject: str | None) -> pd.Series:
    """generation -> value for one metric row family; format/subject None match null."""
    sel = (df["arm"] == arm) & (df["metric"] == metric)
    sel &= df["format"].isna() if fmt is None else (df["format"] == fmt)
    sel &= df["subject"].isna() if subject is None else (df["subject"] == subject)
    return df.loc[sel].set_index("generation")["value"].sort_index().dropna()


# ----------------------------------------------------------------------------------------------- rule

def _paired_bootstrap(cur: pd.DataFrame, base: pd.DataFrame, rules: StageRules, seed: int):
    """Point estimates and CIs of per-question mean differences (cur - base) and of retention (stats.py)."""
    ids = cur.index.intersection(base.index)
    x, x0 = cur.loc[ids], base.loc[ids]
    counts = stats.resample_counts(len(ids), rules.n_boot, np.random.default_rng([rules.seed, seed]))
    out: dict[str, Any] = {"n": int(len(ids))}
    for col in ["correct", "judged_correct", "adherent", "wellformed", "words", "repetition", "confident_wrong"]:
        a, b = x[col].to_numpy(float), x0[col].to_numpy(float)
        if np.isnan(a).all() or np.isnan(b).all():
            continue  # not measured (e.g. no free text)
        ma, mb = stats.weighted_means(counts, a), stats.weighted_means(counts, b)
        out[col] = (float(ma[0]), float(mb[0]), stats.interval(ma - mb, rules.ci, min_finite=1))
        out["_" + col] = (ma, mb)
    acc_col = "correct" if rules.accuracy == "accuracy" else "judged_correct"
    chance = rules.chance if rules.chance is not None else (
        float(np.nanmean(x0["chance"])) if x0["chance"].notna().any() else stats.DEFAULT_CHANCE)
    out["chance"] = chance
    if acc_col in out:
        ma, mb = out["_" + acc_col]
        ret = stats.retention(ma, mb, chance, rules.min_margin)
        if np.isfinite(ret[0]):
            out["retention"] = (float(ret[0]), stats.interval(ret, rules.ci, min_finite=1))
    return {k: v for k, v in out.items() if not k.startswith("_")}


def _classify_point(g: int, boot: dict | None, m: dict, m0: dict, rules: StageRules, chance: float) -> dict:
    """Stage of one generation from bootstrap results (or None) and metric values (m, baseline m0)."""
    rec: dict[str, Any] = {"generation": g}
    c_reasons, b_reasons = [], []
    acc_col = "correct" if rules.accuracy == "accuracy" else "judged_correct"
    if boot is not None and acc_col in boot:
        acc, acc0, diff_ci = boot[acc_col]
        rec.update(accuracy=acc, accuracy_diff_ci=diff_ci, n=boot["n"], method="bootstrap")
        ret = boot.get("retention")
        rec["retention"], rec["retention_ci"] = (ret if ret else (None, None))
        if ret and ret[0] < rules.retention_b and diff_ci[1] < 0:
            b_reasons.append(f"retention {ret[0]:.2f} [{ret[1][0]:.2f}, {ret[1][1]:.2f}] < {rules.retention_b}, "
                             f"accuracy {acc0:.2f} -> {acc:.2f}")
        for col, key in [("adherent", "format_adherence"), ("wellformed", "answer_wellformed"),
                         ("repetition", "answer_repetition"), ("words", "answer_words"),
                         ("confident_wrong", "confident_wrong_rate")]:
            if col in boot:
                rec[key] = boot[col][0]
        signal = rules.format_signal if FORMAT_SIGNALS[rules.format_signal][0] in boot else "format_adherence"
        col, label = FORMAT_SIGNALS[signal]
        format_rose = False
        if col in boot:
            v, v0, ci = boot[col]
            format_rose = v > v0  # from nothing at generation 0 too: a base model learning the format
            if v - v0 <= -rules.format_drop and ci[1] < 0:
                c_reasons.append(f"{label} {v0:.2f} -> {v:.2f}")
        if "repetition" in boot:
            v, v0, ci = boot["repetition"]
            if v - v0 >= rules.repetition_rise and ci[0] > 0:
                c_reasons.append(f"answer repetition {v0:.2f} -> {v:.2f}")
        if "words" in boot:
            v, v0, ci = boot["words"]
            if (v0 > 0 and not (1 / rules.words_factor <= v / v0 <= rules.words_factor) and (ci[0] > 0 or ci[1] < 0)
                    and not format_rose):
                c_reasons.append(f"answer length {v0:.1f} -> {v:.1f} words")
    else:
        acc, acc0 = m.get(rules.accuracy), m0.get(rules.accuracy)
        rec.update(accuracy=acc, method="metrics")
        rec["retention"] = rec["retention_ci"] = None
        ret = stats.retention(acc, acc0, chance, rules.min_margin) if acc is not None and acc0 is not None else np.nan
        if np.isfinite(ret):
            rec["retention"] = ret
            if ret < rules.retention_b and acc0 - acc >= rules.min_drop:
                b_reasons.append(f"retention {ret:.2f} < {rules.retention_b} (no CI: metrics only)")
        for key in ["format_adherence", "answer_wellformed", "answer_repetition", "answer_words", "confident_wrong_rate"]:
            if m.get(key) is not None:
                rec[key] = m[key]
        signal = rules.format_signal if m0.get(rules.format_signal) is not None else "format_adherence"
        v, v0 = m.get(signal), m0.get(signal)
        format_rose = v is not None and v0 is not None and v > v0
        if v is not None and v0 is not None and v - v0 <= -rules.format_drop:
            c_reasons.append(f"{FORMAT_SIGNALS[signal][1]} {v0:.2f} -> {v:.2f}")
        v, v0 = m.get("answer_repetition"), m0.get("answer_repetition")
        if v is not None and v0 is not None and v - v0 >= rules.repetition_rise:
            c_reasons.append(f"answer repetition {v0:.2f} -> {v:.2f}")
        v, v0 = m.get("answer_words"), m0.get("answer_words")
        if v is not None and v0 and not (1 / rules.words_factor <= v / v0 <= rules.words_factor) and not format_rose:
            c_reasons.append(f"answer length {v0:.1f} -> {v:.1f} words")
    v, v0 = m.get("fluency"), m0.get("fluency")
    if v is not None and v0:
        rec["fluency"] = v
        if (v0 - v) / abs(v0) >= rules.fluency_drop:
            c_reasons.append(f"fluency {v0:.2f} -> {v:.2f}")
    if "confident_wrong_rate" not in rec and m.get("confident_wrong_rate") is not None:
        rec["confident_wrong_rate"] = m["confident_wrong_rate"]
    if g == 0:
        c_reasons, b_reasons = [], []
    rec["stage"] = "C" if c_reasons else "B" if b_reasons else "A"
    rec["knowledge_loss"] = bool(b_reasons)  # B's own condition, met or not whatever C does (onset_B reads it)
    rec["reasons"] = c_reasons + b_reasons
    return rec


def onset(gens: list[int], flags: list[bool], persist: int) -> int | None:
    """First generation from which `flags` holds for `persist` entries in a row (fewer at the end)."""
    for i, flag in enumerate(flags):
        window = flags[i:i + persist]
        if flag and all(window):
            return gens[i]
    return None


# Rows at generation g that measure text the generation g-1 model wrote (the synthetic part of generation g's
# training mix, or the whole mix): their series is shifted so that every model-centric value is indexed by the
# model it describes. Everything else (perplexity_heldout, perplexity_own, the answers' fluency) measures model g.
TEXT_METRICS = {"entropy", "entropy_std", "distinct_1", "distinct_2", "repetition_rate", "vocab_size"}
ANSWERS_SUBJECT = "answers"  # fluency of the free-text answers of model g (the evaluator's subject for them)


def written_by_previous(metric: str, subject: str | None) -> bool:
    """Does this metric row at generation g describe text written by the generation g-1 model? (`synthetic_*`
    metrics, the fact check of organism/factcheck.py, do whatever their subject.)"""
    return subject == "synthetic" or metric.startswith("synthetic_") or (subject is None and metric in TEXT_METRICS)


def _model_centric(df: pd.DataFrame, arm: str, rules: StageRules) -> dict:
    """Model-centric series of an arm, indexed by the generation of the model they describe, and the first model
    generation at which one of them warns (moves by its `model_signals` change against model 0, `persist` in a
    row). Baseline: model 0 itself for perplexity; for text statistics the text model 0 wrote, which is
    generation 1's synthetic mix (model 0 is never asked to evaluate text it wrote at generation 0)."""
    series, warn_at, sources, missing = {}, {}, {}, []
    for metric, change in rules.model_signals.items():
        subject = rules.model_subject
        s = _metric(df, arm, metric, None, subject)
        if s.empty:
            subject = None
            s = _metric(df, arm, metric, None, None)
        if s.empty:
            missing.append(metric)
            continue
        shift = 1 if written_by_previous(metric, subject) else 0
        s.index = s.index - shift
        s = s[s.index >= 0]  # imported logs also hold the text the model before generation 0 wrote
        if 0 not in s.index:
            missing.append(metric)
            continue
        series[metric] = {int(g): float(v) for g, v in s.items()}
        sources[metric] = {"subject": subject, "written_by": "model g-1 (row generation g)" if shift else "model g"}
        base = s.loc[0]
        rel = (s - base) / abs(base) if base else s - base
        flags = [bool(f) and int(g) > 0 for f, g in zip((rel >= change) if change > 0 else (rel <= change), s.index)]
        g = onset([int(x) for x in s.index], flags, rules.persist)
        if g is not None:
            warn_at[metric] = g
    first = min(warn_at.values()) if warn_at else None
    return {"metrics": series, "sources": sources, "warnings": warn_at, "warning_generation": first,
            "not_written": missing}


LEAD_TIME = ("task_drop_generation (the earlier of the B and C onsets: the first model whose answers show the drop) "
             "minus model_centric.warning_generation (the first model whose own text or held-out perplexity moved), "
             "both counted in model generations; positive: the model-centric signal came first")


def classify_run(run_dir: Path, cfg: StageRules | None = None, rules_file: Path | None = None) -> dict:
    """The stages.json content for a run directory (nothing is written)."""
    run_dir = Path(run_dir)
    rules = cfg if cfg is not None else load_rules(run_dir, rules_file)
    df = load_metrics(run_dir)
    files = answer_files(run_dir)
    arms = list(dict.fromkeys(list(df["arm"]) + [a for a, _, _ in files]))
    result: dict[str, Any] = {"run": run_dir.name, "rules": rules.model_dump(), "arms": {}}
    all_gens: set[int] = set()
    for arm in arms:
        adf = df[df["arm"] == arm]
        formats = list(dict.fromkeys([f for f in adf["format"] if f is not None] + [f for a, _, f in files if a == arm]))
        formats.sort(key=lambda f: PAPER_FORMATS.index(f) if f in PAPER_FORMATS else len(PAPER_FORMATS))
        model = _model_centric(df, arm, rules)
        arm_out: dict[str, Any] = {"model_centric": model, "formats": {}}
        frames: dict[str, dict[int, pd.DataFrame]] = {}  # format -> generation -> answers (format dependence)
        fluency_of: dict[str, dict[int, float | None]] = {}
        for fmt in formats:
            gens = sorted(set(adf.loc[adf["format"] == fmt, "generation"]) | {g for a, g, f in files if a == arm and f == fmt})
            all_gens.update(gens)
            fdf = adf[adf["format"] == fmt]
            fdf = fdf[fdf["subject"].isna()] if rules.subject is None else fdf[fdf["subject"] == rules.subject]
            table = fdf.pivot_table(index="generation", columns="metric", values="value", aggfunc="last")
            mvals = {g: ({k: float(v) for k, v in table.loc[g].dropna().items()} if g in table.index else {}) for g in gens}
            fluency = _metric(df, arm, "fluency", None, ANSWERS_SUBJECT)  # the answers of model g
            if fluency.empty:  # runs written before answers had their own fluency row, imported logs
                fluency = _metric(df, arm, "fluency", None, None)
            for g in gens:
                if "fluency" not in mvals[g] and g in fluency.index and "fluency" not in table.columns:
                    mvals[g]["fluency"] = float(fluency[g])
            base = answers_frame(files[(arm, 0, fmt)], rules) if (arm, 0, fmt) in files else None
            frames[fmt] = {0: base} if base is not None and not base.empty else {}
            fluency_of[fmt] = {g: mvals[g].get("fluency") for g in gens}
            chance = rules.chance if rules.chance is not None else stats.DEFAULT_CHANCE
            points = []
            if 0 not in gens:
                arm_out["formats"][fmt] = {"error": "no generation-0 baseline", "generations": gens,
                                           "stages": "?" * len(gens), "onset_B": None, "onset_C": None}
                continue
            for g in gens:
                boot = None
                if base is not None and not base.empty and (arm, g, fmt) in files:
                    cur = answers_frame(files[(arm, g, fmt)], rules)
                    if g and not cur.empty:
                        frames[fmt][g] = cur
                    if not cur.empty and len(cur.index.intersection(base.index)):
                        boot = _paired_bootstrap(cur, base, rules, seed=g)
                        chance = boot["chance"]
                point = _classify_point(g, boot, mvals[g], mvals[0], rules, chance)
                pos = position_check(files[(arm, g, fmt)], rules, mvals[g].get("max_freq")) if (arm, g, fmt) in files else None
                if pos is not None:
                    point["position"] = pos
                    if pos["flagged"]:
                        point["position_note"] = pos["note"]
                        if point["stage"] == "B":
                            point["reasons"].append(pos["note"])
                points.append(point)
            letters = [p["stage"] for p in points]
            on_b = onset(gens, [p["knowledge_loss"] for p in points], rules.persist)
            on_c = onset(gens, [s == "C" for s in letters], rules.persist)
            biased = [p["generation"] for p in points if p.get("position", {}).get("flagged")]
            drop = min([g for g in (on_b, on_c) if g is not None], default=None)
            warn = model["warning_generation"]
            acc0 = points[0].get("accuracy")
            arm_out["formats"][fmt] = {
                "baseline": {"accuracy": acc0, "chance": chance, "n": points[0].get("n")},
                # at chance at generation 0 there is no knowledge to lose: B cannot be measured, only C
                "knowledge_measurable": acc0 is not None and acc0 - chance > rules.min_margin,
                "generations": points,
                "stages": "".join(letters),
                "onset_B": on_b,
                "onset_C": on_c,
                "task_drop_generation": drop,
                "position_bias_generations": biased,
                "onset_position_bias": onset(gens, [g in biased for g in gens], rules.persist),
                "lead_time": (drop - warn) if drop is not None and warn is not None else None,
                "lead_time_definition": LEAD_TIME,
            }
        signal = FORMAT_SIGNALS[rules.format_signal][0]
        arm_out["format_dependence"] = dependence.analyse(frames, arm_out["formats"], fluency_of, rules, signal)
        result["arms"][arm] = arm_out
    all_gens.update(int(g) for g in df["generation"])
    result["last_generation"] = max(all_gens) if all_gens else None
    return result


def current_stages(run_dir: Path) -> dict | None:
    """RUN_DIR/stages.json when it is current (written after metrics.jsonl and every answers file, e.g. by
    `kcollapse stages --rules ...`, whose rules it keeps), else None."""
    path = Path(run_dir) / "stages.json"
    if not path.is_file():
        return None
    inputs = [Path(run_dir) / "metrics.jsonl"] + [p for ps in answer_files(run_dir).values() for p in ps]
    newest = max((p.stat().st_mtime_ns for p in inputs if p.is_file()), default=0)
    if path.stat().st_mtime_ns < newest:
        return None
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return result if isinstance(result, dict) and isinstance(result.get("arms"), dict) else None


def run_stages(run_dir: Path) -> dict:
    """The run's stages: stages.json when current, else classified once (run's rules) and written there."""
    result = current_stages(run_dir)
    if result is None:
        atomic_write_json(Path(run_dir) / "stages.json", classify_run(run_dir))
        result = current_stages(run_dir)  # as read back: the same types whichever way the stages came
    return result


def stages_command(run_dir: Path, rules_file: Path | None = None) -> dict:
    """`kcollapse stages RUN_DIR`: classify, write RUN_DIR/stages.json, print the table."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: run directory not found")
    result = classify_run(run_dir, rules_file=rules_file)
    atomic_write_json(run_dir / "stages.json", result)
    print_stages(result)
    return result
