"""Report sections on the rigour of a study: provenance, calibration and the option-order control.

They answer a reviewer's usual questions about a collapse curve. Can the run be redone from what was published
(provenance.py's record in run.json)? Is the model's confidence still calibrated (ECE and Brier per format; a
reliability diagram for generation 0 and each arm's last generation)? Is a "confidently wrong" answer lost
knowledge or a drift to one option position (each question asked in a second option order, eval.permutation)?
This module gathers each section's rows and numbers (and draws the reliability figure); the markup is in
templates/provenance.html, calibration.html and option_order.html, rendered by pages.py with autoescaping. Text
read from a file (run.json's values, arm and format names, position notes) is untrusted: the templates print it
through the `text` filter; metric values are printed as formatted numbers. Each function returns the section as
markup for report.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from markupsafe import Markup

from kcollapse import figures
from kcollapse.evaluate.metrics import reliability
from kcollapse.io import read_jsonl
from kcollapse.pages import img, render
from kcollapse.rundir import answer_files

ORDER_METRICS = ["accuracy", "accuracy_permuted", "consistent_correct", "option_consistency", "position_consistency",
                 "position_bias", "max_freq"]


def _value(df: pd.DataFrame, arm: str, g: int, metric: str, fmt: str):
    sel = df[(df["arm"] == arm) & (df["generation"] == g) & (df["metric"] == metric) & (df["format"] == fmt)
             & df["subject"].isna()]
    return None if sel.empty else float(sel["value"].iloc[-1])


# ------------------------------------------------------------------------------------------------ provenance

def provenance_section(run_dir: Path) -> Markup:
    """What run.json records: the host and versions, the inputs' hashes, each generation's start and end."""
    path = Path(run_dir) / "run.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return render("provenance.html", missing="run.json")
    prov = data.get("provenance") if isinstance(data, dict) else None
    if not isinstance(prov, dict):
        return render("provenance.html", missing="provenance")
    hashes = [("config (resolved, speed-only fields left out)", "config.yaml", prov.get("config_sha256"))]
    for name, e in (prov.get("inputs") or {}).items():
        if isinstance(e, dict):
            hashes.append((name, e.get("path") or e.get("source"), e.get("sha256") or e.get("content_sha256")))
    kc, host = prov.get("kcollapse") or {}, prov.get("host") or {}
    commit = kc.get("git_commit")
    facts = [("kcollapse", f"{kc.get('version')}" + (f" · git {commit[:12]}{' (uncommitted changes)' if kc.get('git_dirty') else ''}"
                                                     if commit else " · not from a git checkout")),
             ("versions", " ".join(f"{k}={v}" for k, v in (data.get("versions") or {}).items())),
             ("host", f"{host.get('hostname')} · {host.get('os')}"), ("CPU", f"{host.get('cpu')} · {host.get('cores')} cores"),
             ("GPU", ", ".join(host.get("gpus") or []) or "none"),
             ("torch threads · device · dtype", f"{host.get('torch_threads')} · {host.get('device')} · {host.get('dtype')}"),
             ("started · finished", f"{data.get('started')} · {data.get('finished', 'not finished')}")]
    times = data.get("generation_times") or {}
    time_rows = []
    if "gen_0" in times:
        time_rows.append(("generation 0", "0", times["gen_0"]))
    for arm, gens in times.items():
        if arm != "gen_0" and isinstance(gens, dict):
            time_rows += [(arm, g, t) for g, t in sorted(gens.items(), key=lambda kv: int(kv[0]))]
    return render("provenance.html", missing=None, facts=facts, hashes=hashes, name=Path(run_dir).name,
                  times=[(a, g, t) for a, g, t in time_rows if isinstance(t, dict)])


# ------------------------------------------------------------------------------------------------ calibration

def calibration_section(run_dir: Path, result: dict, df: pd.DataFrame, fig_dir: Path) -> Markup:
    """ECE and Brier per format at generation 0 and each arm's last generation, and their reliability diagram."""
    files = answer_files(run_dir)
    arms = list(result["arms"])
    formats = list(dict.fromkeys(f for a in result["arms"].values() for f in a["formats"]))
    curves: dict[str, dict[str, list[dict]]] = {}
    rows = []
    for fmt in formats:
        lines: dict[str, list[dict]] = {}
        first = next((a for a in arms if (a, 0, fmt) in files), None)
        if first is not None:
            lines["generation 0"] = reliability([r for p in files[(first, 0, fmt)] for r in read_jsonl(p)])
        cells = [_value(df, arms[0], 0, m, fmt) for m in ("ece", "brier")] if arms else [None, None]
        for arm in arms:
            gens = [g for a, g, f in files if a == arm and f == fmt]
            last = max(gens, default=0)
            if last > 0:
                lines[f"{arm} gen {last}"] = reliability([r for p in files[(arm, last, fmt)] for r in read_jsonl(p)])
            cells += [_value(df, arm, last, m, fmt) for m in ("ece", "brier")]
        if lines:
            curves[fmt] = lines
        rows.append((fmt, cells))
    figure = img(figures.reliability_figure(curves, fig_dir / "reliability.png"), "reliability diagrams") if curves else None
    return render("calibration.html", arms=arms, rows=rows, figure=figure)


# ------------------------------------------------------------------------------------------------ option order

def order_section(result: dict, df: pd.DataFrame) -> Markup:
    """Accuracy in both option orders and the position-bias signals, generation 0 and last, per arm and format."""
    if not (df["metric"] == "accuracy_permuted").any():
        return render("option_order.html", rows=None)
    rows = []
    for arm, a in result["arms"].items():
        for fmt, f in a["formats"].items():
            gens = sorted(df.loc[(df["arm"] == arm) & (df["format"] == fmt) & (df["metric"] == "accuracy_permuted"), "generation"].unique())
            if not gens:
                continue
            notes = {p["generation"]: p.get("position_note") for p in f.get("generations", []) if isinstance(p, dict)}
            for g in sorted({gens[0], gens[-1]}):
                rows.append({"arm": arm, "format": fmt, "generation": g, "note": notes.get(g),
                             "cells": [_value(df, arm, g, m, fmt) for m in ORDER_METRICS]})
    return render("option_order.html", rows=rows, metrics=ORDER_METRICS)
