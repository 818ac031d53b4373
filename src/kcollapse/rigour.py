"""Report sections on the rigour of a study: provenance, calibration and the option-order control.

They answer a reviewer's usual questions about a collapse curve. Can the run be redone from what was published
(provenance.py's record in run.json)? Is the model's confidence still calibrated (ECE and Brier per format; a
reliability diagram for generation 0 and each arm's last generation)? Is a "confidently wrong" answer lost
knowledge or a drift to one option position (each question asked in a second option order, eval.permutation)?
Each function returns an HTML fragment for report.py, which hands in its `esc` (every value read from a file
passes through it) and its image embedding.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from kcollapse import figures
from kcollapse.evaluate.metrics import reliability
from kcollapse.io import read_jsonl
from kcollapse.rundir import answer_files

ORDER_METRICS = ["accuracy", "accuracy_permuted", "consistent_correct", "option_consistency", "position_consistency",
                 "position_bias", "max_freq"]


def _num(v, digits: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and pd.isna(v)) else f"{v:.{digits}f}"


def _value(df: pd.DataFrame, arm: str, g: int, metric: str, fmt: str):
    sel = df[(df["arm"] == arm) & (df["generation"] == g) & (df["metric"] == metric) & (df["format"] == fmt)
             & df["subject"].isna()]
    return None if sel.empty else float(sel["value"].iloc[-1])


# ------------------------------------------------------------------------------------------------ provenance

def provenance_section(run_dir: Path, esc) -> str:
    path = Path(run_dir) / "run.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "<p class='note'>No readable run.json.</p>"
    prov = data.get("provenance") if isinstance(data, dict) else None
    if not isinstance(prov, dict):
        return "<p class='note'>No provenance recorded in run.json (a run from before kcollapse recorded it).</p>"
    rows = [("config (resolved, speed-only fields left out)", "config.yaml", prov.get("config_sha256"))]
    for name, e in (prov.get("inputs") or {}).items():
        if isinstance(e, dict):
            rows.append((name, e.get("path") or e.get("source"), e.get("sha256") or e.get("content_sha256")))
    hashes = "".join(f"<tr><td>{esc(n)}</td><td class='text'>{esc(w)}</td><td class='text'>{esc(h or 'not hashed')}</td></tr>"
                     for n, w, h in rows)
    kc, host = prov.get("kcollapse") or {}, prov.get("host") or {}
    commit = kc.get("git_commit")
    facts = [("kcollapse", f"{kc.get('version')}" + (f" · git {commit[:12]}{' (uncommitted changes)' if kc.get('git_dirty') else ''}"
                                                     if commit else " · not from a git checkout")),
             ("versions", " ".join(f"{k}={v}" for k, v in (data.get("versions") or {}).items())),
             ("host", f"{host.get('hostname')} · {host.get('os')}"), ("CPU", f"{host.get('cpu')} · {host.get('cores')} cores"),
             ("GPU", ", ".join(host.get("gpus") or []) or "none"),
             ("torch threads · device · dtype", f"{host.get('torch_threads')} · {host.get('device')} · {host.get('dtype')}"),
             ("started · finished", f"{data.get('started')} · {data.get('finished', 'not finished')}")]
    facts_html = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in facts)
    times = data.get("generation_times") or {}
    time_rows = []
    if "gen_0" in times:
        time_rows.append(("generation 0", "0", times["gen_0"]))
    for arm, gens in times.items():
        if arm != "gen_0" and isinstance(gens, dict):
            time_rows += [(arm, g, t) for g, t in sorted(gens.items(), key=lambda kv: int(kv[0]))]
    times_html = "".join(f"<tr><td>{esc(a)}</td><td class='num'>{esc(g)}</td><td>{esc(t.get('started'))}</td>"
                         f"<td>{esc(t.get('finished'))}</td></tr>" for a, g, t in time_rows if isinstance(t, dict))
    return (f"<table>{facts_html}</table><table><tr><th>what</th><th>path or source</th><th>sha256</th></tr>{hashes}</table>"
            f"<p class='note'>Check the run directory against these: <code>kcollapse verify {esc(Path(run_dir).name)}</code>."
            "</p><details><summary>start and end of every generation (UTC)</summary><table><tr><th>arm</th>"
            f"<th>generation</th><th>started</th><th>finished</th></tr>{times_html}</table></details>")


# ------------------------------------------------------------------------------------------------ calibration

def calibration_section(run_dir: Path, result: dict, df: pd.DataFrame, fig_dir: Path, esc, img) -> str:
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
        rows.append(f"<tr><td>{esc(fmt)}</td>" + "".join(f"<td class='num'>{_num(v)}</td>" for v in cells) + "</tr>")
    head = "<th>format</th><th>gen 0 ECE</th><th>gen 0 Brier</th>" + "".join(
        f"<th>{esc(a)} last ECE</th><th>{esc(a)} last Brier</th>" for a in arms)
    out = (f"<table><tr>{head}</tr>{''.join(rows)}</table><p class='note'>ECE: expected calibration error over 10 "
           "confidence bins; Brier: mean over questions of the squared distance between the option probabilities and "
           "the one-hot answer (0 perfect; 0.75 a uniform guess over 4 options; 2 certain and wrong).</p>")
    if curves:
        out += img(figures.reliability_figure(curves, fig_dir / "reliability.png"), "reliability diagrams")
    return out


# ------------------------------------------------------------------------------------------------ option order

def order_section(result: dict, df: pd.DataFrame, esc) -> str:
    """Accuracy in both option orders and the position-bias signals, generation 0 and last, per arm and format."""
    if not (df["metric"] == "accuracy_permuted").any():
        return ("<p class='note'>Not measured: the run asked every question in one option order "
                "(eval.permutation: false, or a run from before the control existed).</p>")
    head = "<th>arm</th><th>format</th><th>generation</th>" + "".join(f"<th>{m.replace('_', ' ')}</th>" for m in ORDER_METRICS) \
        + "<th>position bias flagged</th>"
    rows = []
    for arm, a in result["arms"].items():
        for fmt, f in a["formats"].items():
            gens = sorted(df.loc[(df["arm"] == arm) & (df["format"] == fmt) & (df["metric"] == "accuracy_permuted"), "generation"].unique())
            if not gens:
                continue
            notes = {p["generation"]: p.get("position_note") for p in f.get("generations", []) if isinstance(p, dict)}
            for g in sorted({gens[0], gens[-1]}):
                rows.append(f"<tr><td>{esc(arm)}</td><td>{esc(fmt)}</td><td class='num'>{g}</td>" + "".join(
                    f"<td class='num'>{_num(_value(df, arm, g, m, fmt))}</td>" for m in ORDER_METRICS)
                    + f"<td class='note'>{esc(notes.get(g) or 'no')}</td></tr>")
    return (f"<table><tr>{head}</tr>{''.join(rows)}</table><p class='note'>Every question of a format that lists its "
            "options is asked again with them rotated (a fixed shift per question, so the gold option moves). Lost "
            "knowledge lowers both accuracies while the same option is still picked in both orders; a drift to one "
            "letter shows as a high position bias (distance between where the picks and the gold answers stand) with "
            "the same letter, not the same option, picked in both orders.</p>")
