"""The report: one self-contained HTML page per run (`kcollapse report`), and one across runs (`kcollapse compare`).

A researcher should be able to mail RUN_DIR/report.html to a colleague and have it read offline: the figures are
base64 PNGs (also saved under RUN_DIR/figures/), there is no script and nothing is fetched. The page holds the
config, the stage table and timeline, per-arm curves with the stages shaded, the option-order control, calibration
(ECE, Brier, reliability diagrams) and provenance (rigour.py), the model's answers to chosen questions at
generation 0, mid and last, and samples of the synthetic text of every generation.

The page is jinja2 templates (kcollapse/templates/, autoescaped) filled here. Model-written text is hostile input:
everything shown passes the `text` filter (`pages.esc`), which HTML-escapes it, makes control characters, bidi
overrides and lone surrogates visible, and truncates very long texts with a note.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import pandas as pd
from markupsafe import Markup
from rich.console import Console
from rich.markup import escape

from kcollapse import figures, resistance, rigour
from kcollapse.errors import UserError
from kcollapse.evaluate.formats import LETTERS
from kcollapse.io import atomic_write_text
from kcollapse.pages import img, page, render
from kcollapse.rundir import answer_files, load_metrics
from kcollapse.stages import LEAD_TIME, classify_run, run_stages
from kcollapse.tables import at_chance, b_onset_text, onset_text, position_text, test_lines

SAMPLES_PER_GEN = 2
QUESTIONS_SHOWN = 6


def _points(f: dict) -> dict[int, str]:
    return {p["generation"]: p["stage"] for p in f.get("generations", []) if isinstance(p, dict)}


# ------------------------------------------------------------------------------------------- sections

def stage_table(result: dict, label: str | None = None) -> Markup:
    last = result.get("last_generation") or 0
    rows = []
    for arm, a in result["arms"].items():
        for fmt, f in a["formats"].items():
            last_pt = next((p for p in reversed(f.get("generations", [])) if isinstance(p, dict)), {})
            stages = _points(f)
            rows.append({"arm": arm, "format": fmt, "cells": [(g, stages.get(g, "·")) for g in range(last + 1)],
                         "onset_B": b_onset_text(f, last), "onset_C": onset_text(f.get("onset_C"), last),
                         "at_chance": at_chance(f),
                         "position": position_text(f),
                         "accuracy0": (f.get("baseline") or {}).get("accuracy"), "retention": last_pt.get("retention"),
                         "warn": a["model_centric"]["warning_generation"], "warnings": a["model_centric"]["warnings"],
                         "lead": f.get("lead_time"), "why": "; ".join(last_pt.get("reasons", [])) or f.get("error", "")})
    return render("stage_table.html", rows=rows, last=last, label=label)


def format_section(result: dict, fig_dir: Path) -> Markup | None:
    """Format dependence per arm (stages.json's `format_dependence`): verdict, onsets with intervals, tests, and
    one figure of accuracy per format with CI bands."""
    deps = {arm: a["format_dependence"] for arm, a in result["arms"].items() if (a.get("format_dependence") or {}).get("formats")}
    if not deps:
        return None
    rules = result.get("rules", {})
    pct = int(round(rules.get("ci", 0.95) * 100))
    arms = [{"name": arm, "verdict": d["verdict"], "lines": test_lines(d.get("interaction")) or [d.get("message", "")],
             "formats": [{"name": fmt, "measurable": "yes" if f["measurable"] else "no (at chance at gen 0)",
                          "accuracy0": f["accuracy"][0]["accuracy"], "onset_C": f["onset_C"]["text"],
                          "onset_B": f["onset_B"]["text"] if f["onset_B"] else "n/a"}
                         for fmt, f in d["formats"].items()]}
            for arm, d in deps.items()]
    figure = img(figures.format_figure(deps, fig_dir / "format_dependence.png", pct),
                 "accuracy per format of arm " + ", ".join(deps))
    return render("format_dependence.html", arms=arms, figure=figure, pct=pct, margin=rules.get("min_margin", 0.05))


def resistance_section(summary: dict, label: str = "") -> Markup:
    """The resistance summary of a run or a sweep point: table, retention figures (embedded), regimes."""
    figs = [img(figures.retention_figure(c, summary["threshold"]), f"retention of {c['domain_arm']} and {c['general_arm']}")
            for c in summary["comparisons"] if "error" not in c]
    return render("resistance.html", summary=summary, label=label, figures=figs)


def answers_section(run_dir: Path, arm: str, arm_stages: dict) -> Markup:
    """Chosen questions of one format (the earliest B onset, else the first format above chance at generation 0),
    the model's answers at generation 0, mid and last side by side."""
    files = {k: v for k, v in answer_files(run_dir).items() if k[0] == arm}
    if not files:
        return render("answers.html", fmt=None)
    fmts = [f for f in arm_stages.get("formats", {}) if (arm, 0, f) in files] or sorted({f for _, _, f in files})
    stage = lambda f: arm_stages.get("formats", {}).get(f, {})  # noqa: E731
    # the earliest collapse; else a format the model knew (one at chance shows guesses, not lost facts)
    fmt = min(fmts, key=lambda f: (stage(f).get("onset_B") is None, stage(f).get("onset_B") or 0, at_chance(stage(f))))
    gens = sorted(g for a, g, f in files if f == fmt)
    shown = sorted({gens[0], gens[len(gens) // 2], gens[-1]})

    def load(g):
        recs = {}
        for p in files[(arm, g, fmt)]:
            for line in p.read_text(encoding="utf-8", errors="surrogateescape").splitlines():
                try:
                    r = json.loads(line)
                    recs[str(r["id"])] = r
                except (ValueError, KeyError, TypeError):
                    continue
        return recs

    by_gen = {g: load(g) for g in shown}
    first, lastg = by_gen[shown[0]], by_gen[shown[-1]]
    ids = sorted(first, key=lambda i: (not (first[i].get("is_correct") and not lastg.get(i, {}).get("is_correct", True)), i))
    questions = []
    for qid in ids[:QUESTIONS_SHOWN]:
        q = first[qid]
        ci = q.get("correct_index")
        answers = []
        for g in shown:
            r = by_gen[g].get(qid)
            pi = None if r is None else r.get("predicted_index")
            answers.append(None if r is None else {
                "right": bool(r.get("is_correct")), "confidence": r.get("confidence"), "text": r.get("answer_text"),
                "pick": LETTERS[pi] if isinstance(pi, int) and 0 <= pi < len(LETTERS) else "?"})
        questions.append({"question": q.get("question"), "answers": answers,
                          "options": [(LETTERS[i] if i < len(LETTERS) else i, c, i == ci)
                                      for i, c in enumerate(q.get("choices") or [])]})
    free_text = any(a is not None and a["text"] is not None for q in questions for a in q["answers"])
    return render("answers.html", fmt=fmt, shown=shown, questions=questions, free_text=free_text)


def synthetic_section(run_dir: Path, arm: str) -> Markup:
    """A few synthetic training texts of every generation (streamed: files can be large)."""
    return render("synthetic.html", generations=synthetic_samples(run_dir, arm))


def synthetic_samples(run_dir: Path, arm: str) -> list[dict]:
    """Per generation of an arm: its name, how many synthetic texts its mix held, the first few of them."""
    generations = []
    paths = sorted(Path(run_dir).glob(f"arms/{arm}/gen_*/synthetic.jsonl"),
                   key=lambda p: int(re.sub(r"\D", "", p.parent.name) or 0))
    for path in paths:
        samples, total = [], 0
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                if isinstance(r, dict) and r.get("source") == "synthetic":
                    total += 1
                    if len(samples) < SAMPLES_PER_GEN:
                        samples.append(r.get("text"))
        generations.append({"name": path.parent.name, "total": total, "samples": samples})
    return generations


def _derived_rows(result: dict) -> pd.DataFrame:
    """Per-format signals computed from the answers (e.g. confident-wrong rate) as metric rows."""
    rows = []
    for arm, a in result["arms"].items():
        for fmt, f in a["formats"].items():
            for p in f.get("generations", []):
                if isinstance(p, dict) and p.get("method") == "bootstrap":
                    for key in ["confident_wrong_rate", "format_adherence", "answer_wellformed", "answer_words", "answer_repetition"]:
                        if p.get(key) is not None:
                            rows.append({"arm": arm, "generation": p["generation"], "metric": key,
                                         "value": p[key], "format": fmt, "subject": None})
    return pd.DataFrame(rows, columns=["arm", "generation", "metric", "value", "format", "subject"])


def with_derived(df: pd.DataFrame, result: dict) -> pd.DataFrame:
    """Metrics plus answer-derived rows for metrics the run did not log itself."""
    extra = _derived_rows(result)
    if extra.empty:
        return df
    logged = set(zip(df["arm"], df["metric"]))
    extra = extra[[(a, m) not in logged for a, m in zip(extra["arm"], extra["metric"])]]
    return pd.concat([df, extra], ignore_index=True) if not extra.empty else df


NAV = [("stages", "Stages"), ("format-dependence", "Format dependence"), ("curves", "Curves"), ("order", "Option order"), ("calibration", "Calibration"),
       ("answers", "Answers"), ("synthetic", "Synthetic text"), ("provenance", "Provenance"), ("config", "Config")]


def write_report(run_dir: Path) -> Path:
    """Write RUN_DIR/report.html and RUN_DIR/figures/*.png (and RUN_DIR/stages.json when absent or older than the
    metrics); return the report's path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: run directory not found")
    result = run_stages(run_dir)  # stages.json when current (e.g. custom rules), else classified now
    df = with_derived(load_metrics(run_dir), result)
    last = result.get("last_generation") or 0
    fig_dir = run_dir / "figures"

    timeline = [(f"{arm} · {fmt}", _points(f)) for arm, a in result["arms"].items() for fmt, f in a["formats"].items()]
    pale = frozenset(f"{arm} · {fmt}" for arm, a in result["arms"].items() for fmt, f in a["formats"].items() if at_chance(f))
    arms = [{"name": arm,
             "figure": img(figures.arm_figure(df, arm, a, fig_dir / f"arm_{re.sub(r'[^A-Za-z0-9_.-]', '_', arm)}.png"),
                           f"metrics of arm {arm}"),
             "answers": answers_section(run_dir, arm, a), "synthetic": synthetic_samples(run_dir, arm)}
            for arm, a in result["arms"].items()]
    opened = next((a for a in arms if any(g["total"] for g in a["synthetic"])), arms[0] if arms else None)
    for a in arms:  # the first arm with synthetic text opens (a control arm has none)
        a["synthetic"], a["open"] = render("synthetic.html", generations=a["synthetic"]), a is opened
    mitigation = None
    if (run_dir / "config.yaml").is_file() and resistance.pairs(resistance.load_arms(run_dir)):  # domain arm + its general twin
        mitigation = resistance_section(resistance.summarise_run(run_dir))
    cfg = run_dir / "config.yaml"
    body = render(
        "run_report.html", name=run_dir.resolve().name, path=str(run_dir.resolve()), last=last, nav=NAV, arms=arms,
        written=dt.datetime.now().strftime("%Y-%m-%d %H:%M"), stage_table=stage_table(result),
        timeline=img(figures.timeline_figure(timeline, last, fig_dir / "timeline.png", pale), "stage timeline") if timeline else None,
        rule=render("stage_rule.html", rules=result["rules"], lead=LEAD_TIME), resistance=mitigation,
        formats=format_section(result, fig_dir),
        middle=[{"id": "order", "title": "Option-order control", "body": rigour.order_section(result, df)},
                {"id": "calibration", "title": "Calibration",
                 "body": rigour.calibration_section(run_dir, result, df, fig_dir)}],
        late=[{"id": "provenance", "title": "Provenance", "body": rigour.provenance_section(run_dir)}],
        config=cfg.read_text(encoding="utf-8", errors="replace") if cfg.is_file() else "(no config.yaml)")
    out = run_dir / "report.html"
    atomic_write_text(out, page(f"kcollapse · {run_dir.resolve().name}", body))
    return out


def report_after_run(run_dir: Path) -> Path | None:
    """The report of a run just finished; on failure a warning only (the results are complete and safe, and
    `kcollapse report` can redo it)."""
    try:
        return write_report(run_dir)
    except Exception as e:
        console = Console(stderr=True)
        console.print(f"[yellow]warning[/]: report not written ({type(e).__name__}: {escape(str(e))[:200]}); "
                      f"run `kcollapse report {escape(str(run_dir))}`")
        return None


def report_command(run_dir: Path) -> Path:
    """`kcollapse report RUN_DIR` (a sweep directory is cli's to dispatch to sweep.report_sweep)."""
    out = write_report(run_dir)
    print(f"wrote {out}")
    return out


# ------------------------------------------------------------------------------------------- compare

def _labels(run_dirs: list[Path]) -> list[str]:
    names = [Path(p).resolve().name for p in run_dirs]
    if len(set(names)) < len(names):
        names = [f"{Path(p).resolve().parent.name}/{Path(p).resolve().name}" for p in run_dirs]
    if len(set(names)) < len(names):
        names = [f"{n}#{i}" for i, n in enumerate(names)]
    return names


def compare_command(run_dirs: list[Path], out: Path) -> Path:
    """Overlay every arm of several runs: OUT/report.html and OUT/comparison.csv."""
    if not run_dirs:
        raise UserError("compare: give at least one run directory")
    out = Path(out)
    frames, results = [], {}
    for label, run_dir in zip(_labels(run_dirs), run_dirs):
        if not Path(run_dir).is_dir():
            raise UserError(f"{run_dir}: run directory not found")
        result = classify_run(Path(run_dir))
        results[label] = result
        df = with_derived(load_metrics(Path(run_dir)), result)
        stage = {(arm, fmt, p["generation"]): p["stage"] for arm, a in result["arms"].items()
                 for fmt, f in a["formats"].items() for p in f.get("generations", []) if isinstance(p, dict)}
        df["stage"] = [stage.get((a, f, g)) if f is not None else None
                       for a, f, g in zip(df["arm"], df["format"], df["generation"])]
        df.insert(0, "run", label)
        frames.append(df)
    all_df = pd.concat(frames, ignore_index=True).sort_values(["run", "arm", "metric", "format", "subject", "generation"],
                                                              na_position="first")
    atomic_write_text(out / "comparison.csv", all_df.to_csv(index=False))

    line = lambda r, a: f"{r}/{a}" if len(results) > 1 else a  # noqa: E731
    panels = []
    formats = list(dict.fromkeys(f for d in frames for f in d["format"].dropna()))
    for subject, what in [(None, "accuracy"), ("split:heldout", "accuracy, held-out facts")]:
        for fmt in formats:
            lines = {}
            for (r, a), g in all_df[(all_df["metric"] == "accuracy") & (all_df["format"] == fmt)].groupby(["run", "arm"]):
                s = g[g["subject"].isna()] if subject is None else g[g["subject"] == subject]
                if not s.empty:
                    lines[line(r, a)] = s.groupby("generation")["value"].last()
            if lines:
                panels.append((f"{what} · {fmt}", lines))
    for metric in ["perplexity", "perplexity_heldout", "entropy", "distinct_2", "repetition_rate", "fluency",
                   "synthetic_fact_error"]:
        lines = {}
        for (r, a), g in all_df[(all_df["metric"] == metric) & all_df["format"].isna()].groupby(["run", "arm"]):
            s = g[g["subject"] == "synthetic"] if (g["subject"] == "synthetic").any() else g[g["subject"].isna()]
            if not s.empty:
                lines[line(r, a)] = s.groupby("generation")["value"].last()
        if lines:
            panels.append((f"{metric} (model-centric)", lines))
    curves = img(figures.overlay_figure(panels, out / "figures" / "comparison.png", "arms overlaid"),
                 "comparison curves") if panels else None
    body = render("compare.html", written=dt.datetime.now().strftime("%Y-%m-%d %H:%M"), curves=curves,
                  runs=[(label, str(Path(p).resolve()), stage_table(r)) for (label, r), p in zip(results.items(), run_dirs)])
    path = out / "report.html"
    atomic_write_text(path, page("kcollapse · comparison", body))
    print(f"wrote {path} and {out / 'comparison.csv'}")
    return path
