"""Figures of a collapse study: metric curves per arm with the stages shaded, the stage timeline, accuracy per
format (format dependence), overlays, reliability diagrams.

Every figure is drawn with matplotlib (Agg, no display needed), saved as PNG under RUN_DIR/figures/ and returned
as bytes so that report.py can embed it (base64) in one self-contained HTML page. Stage bands: none for A,
amber for B (knowledge collapse), red for C (instruction-following collapse).
"""

from __future__ import annotations

import functools
import io
import math
import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from kcollapse.io import current_umask  # noqa: E402


BAND = {"B": ("#f6c343", 0.22), "C": ("#e4572e", 0.22)}
STAGE_COLOR = {"A": "#8fd19e", "B": "#f6c343", "C": "#e4572e", "?": "#dddddd"}
TASK_ORDER = ["accuracy", "judged_accuracy", "greedy_rate", "max_freq", "confidence", "confident_wrong_rate",
              "accuracy_permuted", "consistent_correct", "position_bias", "brier", "format_adherence", "answer_wellformed", "answer_words", "answer_repetition", "judge_mean", "fluency"]
MODEL_ORDER = ["perplexity", "perplexity_heldout", "entropy", "entropy_std", "distinct_1", "distinct_2",
               "repetition_rate", "fluency", "synthetic_fact_error", "synthetic_letter_mismatch"]
SUBJECT_LABEL = {None: "whole mix", "synthetic": "synthetic part", "real": "real part", "answers": "free-text answers",
                 "split:train": "training facts", "split:heldout": "held-out facts"}
# what a row without a subject describes where that is not the generation's whole training mix
UNSPLIT = {"perplexity_heldout": ("held-out real text", None), "synthetic_fact_error": ("all facts", None),
           "synthetic_letter_mismatch": ("synthetic part", "synthetic")}  # label, and the subject whose colour it takes
COUNTS = {"synthetic_fact_claims", "synthetic_lettered_answers"}  # the denominators of two rates: not curves
# one colour per text source in every panel, whichever sources a metric has
SUBJECT_COLOR = {subj: plt.cm.tab10(i) for i, subj in enumerate(SUBJECT_LABEL)}


DPI = 80


def _literal_text(func):
    """Names come from files: draw them as written ("$x$" is not mathtext). Figures are laid out at the resolution
    they are saved at: text measured at another one is a few pixels wider or narrower, enough to clip a label."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with plt.rc_context({"text.parse_math": False, "figure.dpi": DPI}):
            return func(*args, **kwargs)

    return wrapper


def _png(fig, **kw) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, **kw)
    plt.close(fig)
    return buf.getvalue()


def _save(fig, path: Path) -> bytes:
    data = _png(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:  # atomic and readable like kcollapse.io's text writers (it has no bytes writer)
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return data


def shade(ax, stages: dict[int, str]) -> None:
    """Shade each generation's band by its stage (B amber, C red)."""
    for g, s in stages.items():
        if s in BAND:
            color, alpha = BAND[s]
            ax.axvspan(g - 0.5, g + 0.5, color=color, alpha=alpha, lw=0)


def worst_stage(formats: dict) -> dict[int, str]:
    """Generation -> the most advanced stage over all formats of an arm."""
    rank = {"A": 0, "B": 1, "C": 2}
    out: dict[int, str] = {}
    for f in formats.values():
        for p in f.get("generations", []):
            if isinstance(p, dict) and rank.get(p["stage"], -1) > rank.get(out.get(p["generation"]), -1):
                out[p["generation"]] = p["stage"]
    return out


def _series(df, metric, fmt=..., subject=...):
    sel = df["metric"] == metric
    if fmt is not ...:
        sel &= df["format"].isna() if fmt is None else df["format"] == fmt
    if subject is not ...:
        sel &= df["subject"].isna() if subject is None else df["subject"] == subject
    return df.loc[sel].groupby("generation")["value"].last().sort_index()


@_literal_text
def arm_figure(df: pd.DataFrame, arm: str, arm_stages: dict, path: Path) -> bytes:
    """One arm: accuracy per format (own stage bands, bootstrap CI, held-out split dashed), then every other
    metric (bands = the most advanced stage over formats)."""
    adf = df[df["arm"] == arm]
    formats = list(arm_stages.get("formats", {})) or sorted(adf["format"].dropna().unique())
    task = [m for m in TASK_ORDER[1:] if (adf["metric"] == m).any() and adf.loc[adf["metric"] == m, "format"].notna().any()]
    model = [m for m in MODEL_ORDER if ((adf["metric"] == m) & adf["format"].isna()).any()]
    known = set(TASK_ORDER) | set(MODEL_ORDER)
    other = sorted(m for m in set(adf["metric"]) - known - COUNTS if not m.startswith("seconds_"))  # timings: not curves
    panels = [("acc", f) for f in formats] + [("task", m) for m in task] + [("model", m) for m in model] + \
             [("other", m) for m in other]
    cols = 4
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(16, 3.3 * rows), squeeze=False)
    worst = worst_stage(arm_stages.get("formats", {}))
    colors = {f: plt.cm.tab10(i % 10) for i, f in enumerate(formats)}
    explained: set[str] = set()  # labels a legend has shown: colours mean the same in every panel
    for ax, (kind, name) in zip(axes.flat, panels):
        if kind == "acc":
            f = arm_stages.get("formats", {}).get(name, {})
            pts = [p for p in f.get("generations", []) if isinstance(p, dict)]
            shade(ax, {p["generation"]: p["stage"] for p in pts})
            s = _series(adf, "accuracy", name, None)
            ax.plot(s.index, s.values, "o-", color=colors.get(name), label="all questions")
            held = _series(adf, "accuracy", name, "split:heldout")
            if not held.empty:
                ax.plot(held.index, held.values, "s--", color="#444", label="held-out facts")
            ci = [(p["generation"], p["accuracy_diff_ci"]) for p in pts if p.get("accuracy_diff_ci")]
            base = f.get("baseline", {}).get("accuracy")
            if ci and base is not None:
                ax.fill_between([g for g, _ in ci], [base + c[0] for _, c in ci], [base + c[1] for _, c in ci],
                                color=colors.get(name), alpha=0.15, lw=0, label=f"baseline + {95}% CI of change")
            chance = f.get("baseline", {}).get("chance") or 0.25
            ax.axhline(chance, color="grey", ls=":", lw=1, label="chance")
            ax.set_title(f"accuracy · {name}  [{f.get('stages', '')}]", fontsize=9)
            ax.set_ylim(0, 1.02)
        elif kind == "task" or (kind == "other" and adf.loc[adf["metric"] == name, "format"].notna().any()):
            shade(ax, worst)
            for fmt in formats:
                s = _series(adf, name, fmt, None)
                if not s.empty:
                    ax.plot(s.index, s.values, "o-", ms=3, color=colors.get(fmt), label=fmt)
            ax.set_title(name.replace("_", " ") + " (per format)", fontsize=9)
        else:
            shade(ax, worst)
            for subj, s in adf[(adf["metric"] == name) & adf["format"].isna()].groupby("subject", dropna=False):
                subj = None if pd.isna(subj) else subj
                s = s.groupby("generation")["value"].last().sort_index()
                label, like = UNSPLIT.get(name, (SUBJECT_LABEL[None], None)) if subj is None else (
                    SUBJECT_LABEL.get(subj, str(subj)), subj)
                ax.plot(s.index, s.values, "o-", ms=3, color=SUBJECT_COLOR.get(like), label=label)
            mc = arm_stages.get("model_centric", {})
            warned = mc.get("warnings", {}).get(name)
            if warned is not None:  # warnings count models; model w's text is generation w+1's row
                shift = str(mc.get("sources", {}).get(name, {}).get("written_by", "")).startswith("model g-1")
                ax.axvline(warned + shift, color="black", ls="--", lw=0.9, label=f"model-centric warning (model {warned})")
            ax.set_title(name.replace("_", " ") + (" (model-centric)" if kind == "model" else ""), fontsize=9)
        labels = set(ax.get_legend_handles_labels()[1])
        if labels - explained:  # a legend where a line appears that no earlier one explained
            ax.legend(fontsize=7 if kind == "acc" else 6, loc="best")  # "best": e.g. a format at chance runs along the bottom
            explained |= labels
        ax.set_xlabel("generation", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"arm {arm}", fontsize=12, x=0.01, y=1 - 0.12 / fig.get_figheight(), ha="left", va="top")
    _grid_layout(fig, rows, cols)
    return _save(fig, path)


def _grid_layout(fig, rows: int, cols: int, top: float = 0.55, bottom: float = 0.45, left: float = 0.45,
                 row_gap: float = 0.7, col_gap: float = 0.45) -> None:
    """Margins and gaps in inches for a uniform grid of small panels (a title, tick labels and an x label each):
    what tight_layout finds, without measuring every tick label (on a 9-row arm figure it took 5 of its 8 s)."""
    width, height = fig.get_size_inches()
    axes_h = (height - top - bottom - (rows - 1) * row_gap) / rows
    axes_w = (width - left - 0.1 - (cols - 1) * col_gap) / cols
    fig.subplots_adjust(left=left / width, right=1 - 0.1 / width, bottom=bottom / height, top=1 - top / height,
                        hspace=row_gap / axes_h, wspace=col_gap / axes_w)


def _title_above(fig, title: str, size: int = 12, bottom: float = 0.0) -> None:
    """A left-aligned figure title in its own strip: tight_layout alone lets it overlap the first row's panel
    titles, and a title centred on a narrow axes runs off the figure. `bottom`: inches kept free below the panels."""
    fig.suptitle(title, fontsize=size, x=0.01, ha="left")
    lines = title.count("\n") + 1
    height = fig.get_figheight()
    fig.tight_layout(rect=(0, bottom / height, 1, 1 - (0.05 + 0.2 * lines * size / 12) / height))


@_literal_text
def timeline_figure(rows: list[tuple[str, dict[int, str]]], last: int, path: Path,
                    at_chance: frozenset[str] = frozenset()) -> bytes:
    """Rows `label -> {generation: stage}` as a coloured grid with the letters written in; rows labelled in
    `at_chance` (formats at chance at generation 0: their A preserves no knowledge) marked so, their A cells pale."""
    # 1.4 in: the two-line title strip, the tick labels and the x label, which tight_layout needs even for one row
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * (last + 1) + 3), 0.38 * len(rows) + 1.4))
    for y, (label, st) in enumerate(rows):
        for g in range(last + 1):
            s = st.get(g, "")
            pale = label in at_chance and s == "A"  # C (format broken) still applies to a format at chance
            ax.add_patch(plt.Rectangle((g - 0.5, y - 0.5), 1, 1, color=STAGE_COLOR.get(s, "#f4f4f4"), ec="white",
                                       alpha=0.3 if pale else 1.0))
            ax.text(g, y, s, ha="center", va="center", fontsize=8, color="grey" if pale else "black")
    ax.set_xlim(-0.5, last + 0.5)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_yticks(range(len(rows)), [label + (" (at chance at gen 0)" if label in at_chance else "") for label, _ in rows],
                  fontsize=8)
    ax.set_xticks(range(last + 1), [str(g) for g in range(last + 1)], fontsize=7)
    ax.set_xlabel("generation")
    _title_above(fig, "stage timeline\nA preserved · B knowledge collapse · C instruction-following collapse", size=9)
    return _save(fig, path)


@_literal_text
def format_figure(dependence: dict[str, dict], path: Path, level: int = 95) -> bytes:
    """One panel per arm: accuracy over generations, one line per format with its bootstrap CI band (the arm's
    `format_dependence` block of stages.json); formats at chance at generation 0 thin and dashed, without a band; the verdict in the title."""
    cols = min(3, max(1, len(dependence)))
    rows = max(1, math.ceil(len(dependence) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5.4 * cols, 3.8 * rows), squeeze=False)
    formats = list(dict.fromkeys(f for d in dependence.values() for f in d["formats"]))
    colors = {f: plt.cm.tab10(i % 10) for i, f in enumerate(formats)}
    for ax, (arm, d) in zip(axes.flat, dependence.items()):
        for fmt, f in d["formats"].items():
            pts = f["accuracy"]
            gens = [p["generation"] for p in pts]
            if not f["measurable"]:  # at chance: drawn thin, without a band, so the measurable formats stay readable
                ax.plot(gens, [p["accuracy"] for p in pts], "--", lw=1, alpha=0.6, color=colors[fmt],
                        label=f"{fmt} (at chance at gen 0)")
                continue
            ax.plot(gens, [p["accuracy"] for p in pts], "o-", ms=3, color=colors[fmt], label=fmt)
            band = [p["ci"] or [np.nan, np.nan] for p in pts]
            ax.fill_between(gens, [b[0] for b in band], [b[1] for b in band], color=colors[fmt], alpha=0.15, lw=0)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{arm}: {'format dependence found' if d.get('format_dependent') else d['verdict'].split(':')[0]}",
                     fontsize=9)
        ax.set_xlabel("generation", fontsize=8)
        ax.set_ylabel(f"accuracy ({level}% CI band)", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="best")
    for ax in list(axes.flat)[len(dependence):]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


@_literal_text
def overlay_figure(panels: list[tuple[str, dict[str, pd.Series]]], path: Path, title: str) -> bytes:
    """Panels of `title -> {line label: generation-indexed series}` (compare), one legend below them all (a line
    keeps its colour in every panel; a legend per panel covered its lines)."""
    cols = 3
    rows = max(1, math.ceil(len(panels) / cols))
    labels = list(dict.fromkeys(k for _, lines in panels for k in lines))
    legend_rows = math.ceil(len(labels) / 4)
    legend_height = 0.1 + 0.22 * legend_rows
    fig, axes = plt.subplots(rows, cols, figsize=(15, 3.4 * rows + legend_height), squeeze=False)
    cmap = plt.cm.tab10 if len(labels) <= 10 else plt.cm.tab20
    colors = {k: cmap(i % cmap.N) for i, k in enumerate(labels)}
    handles = {}
    for ax, (name, lines) in zip(axes.flat, panels):
        for label, s in lines.items():
            handles[label], = ax.plot(s.index, s.values, "o-", ms=3, color=colors[label], label=label)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("generation", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if handles:
        fig.legend([handles[k] for k in labels if k in handles], [k for k in labels if k in handles], loc="lower left",
                   bbox_to_anchor=(0.01, 0.0), ncol=4, fontsize=8, frameon=False)
    _title_above(fig, title, bottom=legend_height)
    return _save(fig, path)


@_literal_text
def retention_figure(c: dict, threshold: float = 0.8, fmt: str = "all") -> bytes:
    """PNG of one resistance comparison (resistance.compare): both arms' retention above chance on the domain's
    subject with bootstrap bands, the threshold and the regime bands."""
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
    return _png(fig, bbox_inches="tight")


@_literal_text
def dose_figure(rows: list[dict]) -> bytes:
    """PNG: retention at the last generation against the synthetic ratio, one line per series, seeds' range as bars."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    df = pd.DataFrame(rows).dropna(subset=["synthetic_ratio", "retention"])
    for series, s in df.groupby("series", sort=True):
        s = s.sort_values("synthetic_ratio")
        seeds = [np.array([x for x in p if x is not None] or [np.nan], float) for p in s["per_seed"]]
        err = [s["retention"] - [np.nanmin(p) for p in seeds], [np.nanmax(p) for p in seeds] - s["retention"]]
        ax.errorbar(s["synthetic_ratio"], s["retention"], yerr=np.clip(np.nan_to_num(err), 0, None), marker="o",
                    capsize=3, label=series)
    ax.axhline(0.8, color="k", ls="--", lw=1)
    ax.axhline(0.6, color="k", ls=":", lw=1)
    ax.set(xlabel="synthetic ratio (alpha)", ylabel="retention at last generation", title="dose-response")
    if not df.empty:
        ax.legend(fontsize=7)
    return _png(fig, bbox_inches="tight")


@_literal_text
def reliability_figure(curves: dict[str, dict[str, list[dict]]], path: Path) -> bytes:
    """Reliability diagrams, one panel per format: accuracy against mean confidence in each confidence bin (points
    sized by the questions in the bin) for each labelled line (generation 0, each arm's last generation)."""
    cols = min(4, max(1, len(curves)))
    rows = max(1, math.ceil(len(curves) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.6 * rows), squeeze=False)
    labels = list(dict.fromkeys(k for lines in curves.values() for k in lines))
    colors = {k: ("black" if i == 0 else plt.cm.tab10((i - 1) % 10)) for i, k in enumerate(labels)}
    for ax, (fmt, lines) in zip(axes.flat, curves.items()):
        ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1, label="calibrated")
        for label, bins in lines.items():
            if not bins:
                continue
            total = sum(b["n"] for b in bins)
            ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "-", color=colors[label], lw=1)
            ax.scatter([b["confidence"] for b in bins], [b["accuracy"] for b in bins], color=colors[label],
                       s=[10 + 120 * b["n"] / total for b in bins], label=label, zorder=3)
        ax.set_xlim(0, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"reliability · {fmt}", fontsize=9)
        ax.set_xlabel("confidence (bin mean)", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="best")
    for ax in list(axes.flat)[len(curves):]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)
