"""The report: one self-contained HTML page per run (`kcollapse report`), and one across runs (`kcollapse compare`).

A researcher should be able to mail RUN_DIR/report.html to a colleague and have it read offline: the figures are
base64 PNGs (also saved under RUN_DIR/figures/), there is no script and nothing is fetched. The page holds the
config, the stage table and timeline, per-arm curves with the stages shaded, the option-order control, calibration
(ECE, Brier, reliability diagrams) and provenance (rigour.py), the model's answers to chosen questions at
generation 0, mid and last, and samples of the synthetic text of every generation.

Model-written text is hostile input: everything shown passes through `esc`, which HTML-escapes it, makes control
characters, bidi overrides and lone surrogates visible, and truncates very long texts with a note.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import re
import unicodedata
from importlib import resources
from pathlib import Path
from string import Template

import pandas as pd
from rich.console import Console
from rich.markup import escape

from kcollapse import figures, resistance, rigour
from kcollapse.errors import UserError
from kcollapse.evaluate.formats import LETTERS
from kcollapse.io import atomic_write_text
from kcollapse.rundir import answer_files, load_metrics
from kcollapse.stages import b_onset_text, classify_run, onset_text, position_text, run_stages
BIDI = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f")
SAMPLES_PER_GEN = 2
QUESTIONS_SHOWN = 6


def esc(text, limit: int = 1500) -> str:
    """HTML-safe rendering of untrusted text: escaped, invisible characters shown as <U+XXXX>, cut at `limit`."""
    if text is None:
        return '<span class="note">(none)</span>'
    text = str(text)
    note = ""
    if len(text) > limit:
        note = f' <span class="trunc">[… truncated: {len(text):,} characters in all]</span>'
        text = text[:limit]
    out, run = [], []
    for ch in text:
        o = ord(ch)
        bad = (0xD800 <= o <= 0xDFFF or ch in BIDI or o in (0xFEFF, 0xFFFD) or
               (unicodedata.category(ch) == "Cc" and ch not in "\n\t"))
        if bad:
            out.append(html.escape("".join(run)))
            run = []
            out.append(f'<span class="ctl">&lt;U+{o:04X}&gt;</span>')
        else:
            run.append(ch)
    out.append(html.escape("".join(run)))
    return "".join(out) + note


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _fmt(v, digits: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and pd.isna(v)) else f"{v:.{digits}f}"


def _stage_cells(stages: dict[int, str], last: int) -> str:
    return '<span class="stages">' + "".join(
        f'<span class="s{stages.get(g, "X") if stages.get(g) in ("A", "B", "C") else "X"}" title="generation {g}">'
        f'{stages.get(g, "·")}</span>' for g in range(last + 1)) + "</span>"


def _points(f: dict) -> dict[int, str]:
    return {p["generation"]: p["stage"] for p in f.get("generations", []) if isinstance(p, dict)}


# ------------------------------------------------------------------------------------------- sections

def stage_table(result: dict, label: str | None = None) -> str:
    last = result.get("last_generation") or 0
    rows = []
    for arm, a in result["arms"].items():
        warn = a["model_centric"]["warning_generation"]
        warned = ", ".join(f"{esc(m)} (gen {g})" for m, g in a["model_centric"]["warnings"].items()) or "none"
        for fmt, f in a["formats"].items():
            last_pt = next((p for p in reversed(f.get("generations", [])) if isinstance(p, dict)), {})
            why = "; ".join(last_pt.get("reasons", [])) or f.get("error", "")
            lead = f.get("lead_time")
            rows.append(
                "<tr>" + (f"<td>{esc(label)}</td>" if label else "") +
                f"<td>{esc(arm)}</td><td>{esc(fmt)}</td><td>{_stage_cells(_points(f), last)}</td>"
                f"<td>{esc(b_onset_text(f, last))}</td><td>{onset_text(f.get('onset_C'), last)}</td><td>{esc(position_text(f))}</td>"
                f"<td class='num'>{_fmt((f.get('baseline') or {}).get('accuracy'))}</td>"
                f"<td class='num'>{_fmt(last_pt.get('retention'), 2)}</td>"
                f"<td>{'–' if warn is None else f'gen {warn}'}<br><span class='note'>{warned}</span></td>"
                f"<td class='num'>{'–' if lead is None else f'{lead:+d}'}</td><td class='note'>{esc(why)}</td></tr>")
    head = ("<tr>" + ("<th>run</th>" if label else "") + f"<th>arm</th><th>format</th><th>stage per generation 0…{last}</th>"
            "<th>B onset</th><th>C onset</th><th>position bias</th><th>gen-0 accuracy</th><th>last retention</th>"
            "<th>model-centric warning</th><th>lead (gens)</th><th>last generation: why</th></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def answers_section(run_dir: Path, arm: str, arm_stages: dict) -> str:
    """Chosen questions of one format, the model's answers at generation 0, mid and last side by side."""
    files = {k: v for k, v in answer_files(run_dir).items() if k[0] == arm}
    if not files:
        return '<p class="note">No per-question answers for this arm.</p>'
    fmts = [f for f in arm_stages.get("formats", {}) if (arm, 0, f) in files] or sorted({f for _, _, f in files})
    fmt = min(fmts, key=lambda f: (arm_stages["formats"].get(f, {}).get("onset_B") is None,
                                   arm_stages["formats"].get(f, {}).get("onset_B") or 0))
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
    rows = []
    for qid in ids[:QUESTIONS_SHOWN]:
        q = first[qid]
        choices = q.get("choices") or []
        ci = q.get("correct_index")
        opts = "<br>".join(("<b>" if i == ci else "") + f"{LETTERS[i] if i < len(LETTERS) else i}. {esc(c, 200)}" +
                           (" ✓</b>" if i == ci else "") for i, c in enumerate(choices))
        cells = []
        for g in shown:
            r = by_gen[g].get(qid)
            if r is None:
                cells.append('<td class="note">not asked</td>')
                continue
            pi = r.get("predicted_index")
            mark = '<span class="ok">✓ right</span>' if r.get("is_correct") else '<span class="bad">✗ wrong</span>'
            pick = LETTERS[pi] if isinstance(pi, int) and 0 <= pi < len(LETTERS) else "?"
            cells.append(f"<td>{mark} · picks {pick} · conf {_fmt(r.get('confidence'), 2)}"
                         f"<div class='text'>{esc(r.get('answer_text'), 400)}</div></td>")
        rows.append(f"<tr><td class='q'><b>{esc(q.get('question'), 500)}</b><br>{opts}</td>{''.join(cells)}</tr>")
    head = "".join(f"<th>generation {g}</th>" for g in shown)
    return (f"<p class='note'>Format <b>{esc(fmt)}</b>; questions right at generation {shown[0]} and wrong at "
            f"generation {shown[-1]} first. The free-text answer is what the model wrote; the pick is the scored "
            f"option.</p><table class='answers'><tr><th>question (✓ = correct option)</th>{head}</tr>{''.join(rows)}</table>")


def synthetic_section(run_dir: Path, arm: str) -> str:
    """A few synthetic training texts of every generation (streamed: files can be large)."""
    parts = []
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
        body = "".join(f"<div class='text' style='margin:4px 0 8px;border-left:3px solid #ccc;padding-left:8px'>"
                       f"{esc(t, 800)}</div>" for t in samples) or "<p class='note'>no synthetic text</p>"
        parts.append(f"<h3>{esc(path.parent.name)} <span class='note'>({total} synthetic texts)</span></h3>{body}")
    if not parts:
        return '<p class="note">No synthetic.jsonl for this arm.</p>'
    return "".join(parts)


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


def page(title: str, body: str) -> str:
    template = (resources.files("kcollapse") / "templates" / "report.html").read_text(encoding="utf-8")
    return Template(template).substitute(title=esc(title), body=body)


LEGEND = ("<p class='legend note'><span class='sA'>A</span>knowledge preserved <span class='sB'>B</span>knowledge "
          "collapse: accuracy falls, format and fluency hold (confidently wrong) <span class='sC'>C</span>"
          "instruction-following collapse: format or fluency break <span class='sX'>·</span>not evaluated</p>")


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
    sections = [f"<h1>Knowledge collapse report: {esc(run_dir.resolve().name)}</h1>",
                f"<p class='meta'>Written {dt.datetime.now().strftime('%Y-%m-%d %H:%M')} by kcollapse from "
                f"{esc(str(run_dir.resolve()))} · {len(result['arms'])} arm(s) · generations 0…{last}</p>",
                "<nav>" + "".join(f"<a href='#{i}'>{t}</a>" for i, t in [("stages", "Stages"), ("curves", "Curves"),
                                                                         ("order", "Option order"), ("calibration", "Calibration"),
                                                                         ("answers", "Answers"), ("synthetic", "Synthetic text"),
                                                                         ("provenance", "Provenance"), ("config", "Config")]) + "</nav>",
                "<h2 id='stages'>Stages</h2>", LEGEND, stage_table(result)]
    if timeline:
        sections.append(_img(figures.timeline_figure(timeline, last, fig_dir / "timeline.png"), "stage timeline"))
    sections.append(
        f"<p class='note'>Rule: B when accuracy retained above chance falls below {result['rules']['retention_b']} "
        f"of generation 0 and the drop is significant ({int(result['rules']['ci'] * 100)}% paired bootstrap over "
        "questions when answers are logged); C when well-formed answers (rules.format_signal), answer repetition or "
        "length, or fluency degrade "
        f"beyond tolerance. Onsets need {result['rules']['persist']} generations in a row. Lead = task-centric drop "
        "minus the first model-centric warning (perplexity, entropy, distinct-n of the training text): positive when "
        "the model-centric metrics warned first. Thresholds: stages.json → rules.</p>")
    sections.append("<h2 id='curves'>Curves per arm</h2><p class='note'>Accuracy panels: bands are that format's "
                    "stages, the shaded region is the generation-0 accuracy plus the bootstrap CI of the change, the "
                    "dashed line the held-out facts when the benchmark has them. Other panels: bands show the most "
                    "advanced stage over all formats.</p>")
    for arm, a in result["arms"].items():
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", arm)
        sections.append(f"<h3>{esc(arm)}</h3>" + _img(figures.arm_figure(df, arm, a, fig_dir / f"arm_{safe}.png"),
                                                      f"metrics of arm {arm}"))

    sections.append("<h2 id='order'>Option-order control</h2>" + rigour.order_section(result, df, esc))
    sections.append("<h2 id='calibration'>Calibration</h2>" + rigour.calibration_section(run_dir, result, df, fig_dir, esc, _img))
    if (run_dir / "config.yaml").is_file() and resistance.pairs(resistance.load_arms(run_dir)):  # domain arm + its general twin
        sections.append("<h2 id='resistance'>Domain-specific mitigation</h2>"
                        + resistance.html_section(resistance.summarise_run(run_dir)))
    sections.append("<h2 id='answers'>Answers to chosen questions</h2>")
    for arm, a in result["arms"].items():
        sections.append(f"<h3>{esc(arm)}</h3>" + answers_section(run_dir, arm, a))
    sections.append("<h2 id='synthetic'>Synthetic training text</h2>")
    for i, arm in enumerate(result["arms"]):
        sections.append(f"<details{' open' if i == 0 else ''}><summary>{esc(arm)}</summary>"
                        f"{synthetic_section(run_dir, arm)}</details>")
    cfg = run_dir / "config.yaml"
    cfg_text = cfg.read_text(encoding="utf-8", errors="replace") if cfg.is_file() else "(no config.yaml)"
    sections.append("<h2 id='provenance'>Provenance</h2>" + rigour.provenance_section(run_dir, esc))
    sections.append(f"<h2 id='config'>Config</h2><pre>{esc(cfg_text, 40000)}</pre>")
    out = run_dir / "report.html"
    atomic_write_text(out, page(f"kcollapse · {run_dir.resolve().name}", "\n".join(sections)))
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
    for metric in ["perplexity", "perplexity_heldout", "entropy", "distinct_2", "repetition_rate", "fluency"]:
        lines = {}
        for (r, a), g in all_df[(all_df["metric"] == metric) & all_df["format"].isna()].groupby(["run", "arm"]):
            s = g[g["subject"] == "synthetic"] if (g["subject"] == "synthetic").any() else g[g["subject"].isna()]
            if not s.empty:
                lines[line(r, a)] = s.groupby("generation")["value"].last()
        if lines:
            panels.append((f"{metric} (model-centric)", lines))
    body = [f"<h1>Knowledge collapse: comparison of {len(results)} run(s)</h1>",
            f"<p class='meta'>Written {dt.datetime.now().strftime('%Y-%m-%d %H:%M')} by kcollapse · runs: "
            + ", ".join(f"{esc(k)} ({esc(str(Path(p).resolve()))})" for k, p in zip(results, run_dirs)) + "</p>",
            "<h2>Stages</h2>", LEGEND]
    for label, result in results.items():
        body.append(f"<h3>{esc(label)}</h3>" + stage_table(result))
    if panels:
        body.append("<h2>Curves</h2>" + _img(figures.overlay_figure(panels, out / "figures" / "comparison.png",
                                                                     "arms overlaid"), "comparison curves"))
    body.append("<p class='note'>All rows: comparison.csv (run, arm, generation, metric, value, format, subject, "
                "stage).</p>")
    path = out / "report.html"
    atomic_write_text(path, page("kcollapse · comparison", "\n".join(body)))
    print(f"wrote {path} and {out / 'comparison.csv'}")
    return path
