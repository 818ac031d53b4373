"""Plain-text presentation for the terminal: the stage table and the format dependence (`kcollapse stages`), and
the resistance lines that `kcollapse sweep` prints. Numbers come from stages.py / dependence.py / resistance.py
(statistics in stats.py); names that come from files are printed as text, never as rich markup or terminal escapes.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from kcollapse.dependence import p_text
from kcollapse.io import sanitize_terminal
from kcollapse.pages import interval, num, undefined_in

WIDE = 200  # columns of a table written to a file or a pipe


def console() -> Console:
    """A console at the terminal's width; written to a file or a pipe (a log, `kcollapse stages RUN > stages.txt`),
    one WIDE enough that a table row keeps its names whole (at rich's default 80 columns "short_answer" came out as
    "short_an" over "swer"). A COLUMNS setting wider still is kept."""
    screen = Console()
    return screen if screen.is_terminal else Console(width=max(screen.width, WIDE))


def onset_text(value: int | None, last: int | None) -> str:
    return f"gen {value}" if value is not None else f"not reached by {last}"


def at_chance(f: dict) -> bool:
    """A format at chance at generation 0 (stages' `knowledge_measurable` false): it has no knowledge to lose, so
    its stage A preserves none and B does not apply."""
    return "error" not in f and not f.get("knowledge_measurable", True)


def b_onset_text(f: dict, last: int | None) -> str:
    """The B onset, marked when the model is position-biased there (a drift to one letter, not only lost facts);
    n/a for a format at chance at generation 0."""
    if at_chance(f):
        return "n/a: at chance at gen 0"
    text = onset_text(f.get("onset_B"), last)
    if f.get("onset_B") is not None and f["onset_B"] in f.get("position_bias_generations", []):
        text += " (position bias)"
    return text


def position_text(f: dict) -> str:
    gens = f.get("position_bias_generations") or []
    if not gens:
        return "-"
    return f"gen {f['onset_position_bias']}" if f.get("onset_position_bias") is not None else f"gen {gens[0]} (not persistent)"


def _plain(text, limit: int = 200):
    """A name from a file, printed as itself: no rich markup, no terminal escapes."""
    return Text(sanitize_terminal(text, limit))


def print_stages(result: dict) -> None:
    """The stage table of a stages.json result, one row per arm x format."""
    last = result.get("last_generation")
    colors = {"A": "green", "B": "yellow", "C": "red", "?": "dim"}
    table = Table(title=_plain(f"stages of {result['run']}"),
                  caption="A preserved · B knowledge collapse · C instruction-following collapse · model warn = "
                          "first model whose own text or held-out perplexity moved · lead = first task-centric onset "
                          "- model warn (model generations; + = warned first)")
    biased = any(f.get("position_bias_generations") for a in result["arms"].values() for f in a["formats"].values())
    for col in ["arm", "format", f"gen 0..{last}", "B onset", "C onset"] + ["position bias"] * biased + ["model warn", "lead"]:
        table.add_column(col, no_wrap=col.startswith("gen"), overflow="fold")
    for arm, a in result["arms"].items():
        warn = a["model_centric"]["warning_generation"]
        for fmt, f in a["formats"].items():
            gens = [p["generation"] for p in f["generations"]] if "error" not in f else f["generations"]
            by_gen = dict(zip(gens, f["stages"]))
            cells = Text()
            for g in range(0, (last or 0) + 1):
                s = by_gen.get(g, "·")
                pale = at_chance(f) and s == "A"  # as in the report
                cells.append(s, style="dim" if pale else colors.get(s, "dim"))
            lead = f.get("lead_time")
            b_on, c_on = (f["error"], "") if "error" in f else (b_onset_text(f, last), onset_text(f["onset_C"], last))
            table.add_row(_plain(arm), _plain(fmt), cells, b_on, c_on, *[position_text(f)] * biased,
                          "-" if warn is None else f"model {warn}",
                          "-" if lead is None else f"{lead:+d}")
        if not a["formats"]:
            table.add_row(_plain(arm), "(no task metrics)", "", "", "", *[""] * biased,
                          "-" if warn is None else f"model {warn}", "")
    console().print(table)
    print_format_dependence(result)


def test_lines(inter: dict | None) -> list[str]:
    """The interaction tests of a format_dependence block in words (empty without a test)."""
    if not inter:
        return []
    ac, lg, av = inter["accuracy"], inter["logistic"], inter["anova"]
    size = (f"{inter['n_questions']} questions x {len(inter['formats'])} formats x {len(inter['generations'])} "
            f"generations" + (f", {inter['questions_left_out']} question(s) not in every cell left out"
                              if inter.get("questions_left_out") else ""))
    logistic = (f"chi2({lg['df']}) = {lg['statistic']:.2f}, {p_text(lg['p_value'])}" if lg.get("p_value") is not None
                else f"not computed ({lg.get('note')})")
    anova = (f"F({av['df1']}, {av['df2']}) = {av['F']:.2f}, {p_text(av['p_value'])}" if av.get("p_value") is not None
             else f"F({av['df1']}, {av['df2']}) not computable (no variance within cells)")
    on_accuracy = (f"chi2({ac['df']}) = {ac['statistic']:.2f}, {p_text(ac['p_value'])}"
                   if ac.get("p_value") is not None else f"not computed ({ac.get('note')})")
    return [f"on accuracy (the verdict reads it), {ac['model']}, Wald test of the interaction (cluster-robust by "
            f"question): {on_accuracy}",
            f"logistic regression, {lg['model']}, Wald test of the interaction (cluster-robust by question): {logistic}",
            f"two-way ANOVA (the paper's form), {av['model']}: {anova}", size]


def print_format_dependence(result: dict) -> None:
    """Per arm: each format's B and C onsets with their intervals, the interaction tests and the verdict."""
    out = console()
    for arm, a in result["arms"].items():
        d = a.get("format_dependence")
        if not d or not d.get("formats"):
            continue
        pct = int(round(result.get("rules", {}).get("ci", 0.95) * 100))
        table = Table(title=_plain(f"format dependence of {arm}"),
                      caption=f"onset: first generation from which the stage's effect-size condition holds "
                              f"{result.get('rules', {}).get('persist', 2)} generations in a row (the stage table's "
                              "onsets also need the drop to be significant); CI: paired bootstrap over questions; "
                              "never reached: >= last generation, an open bound")
        for col in ["format", "measurable", f"B onset [{pct}% CI]", f"C onset [{pct}% CI]"]:
            table.add_column(col, overflow="fold")
        for fmt, f in d["formats"].items():
            table.add_row(_plain(fmt), "yes" if f["measurable"] else "no (at chance at gen 0)",
                          f["onset_B"]["text"] if f["onset_B"] else "n/a", f["onset_C"]["text"])
        out.print(table)
        for line in test_lines(d.get("interaction")) or [d.get("message", "")]:  # one line each: a terminal wraps it
            out.print(_plain(f"  {line}", 600), soft_wrap=True)
        out.print(_plain(f"  verdict: {d['verdict']}", 600), soft_wrap=True)


def resistance_lines(summary: dict, label: str = "") -> list[str]:
    """Plain-text lines: each comparison's onset ratio and decline-rate ratio per format with their intervals,
    then the regimes."""
    pct, out = int(round(summary["ci_level"] * 100)), []
    for c in summary["comparisons"]:
        out.append(f"{label}{c['domain_arm']} vs {c['general_arm']} on {c['domain']} (retention above chance < "
                   f"{summary['threshold']}; {len(c.get('seeds') or [])} seed(s); {c.get('method', c.get('error'))}; "
                   "train tokens " + " vs ".join(f"{t:,.0f}" if t else "?" for t in c["train_tokens"].values()) + ")")
        if c.get("ci_method"):
            out.append(f"  intervals: {c['ci_method']}")
        for fmt, f in c.get("formats", {}).items():
            out.append(f"  {fmt:<26} resistance factor {f['text']:<20} {pct}% CI {interval(f['ci']):<14} ({f['ci_kind']}); "
                       f"decline-rate ratio {f['decline_ratio_text']} {pct}% CI {interval(f['decline_ratio_ci'])}"
                       f"{undefined_in(f)}; AUC ratio {num(f['auc_ratio'])} {interval(f['auc_ratio_ci'])}")
    for arm, fmts in summary["regimes"].items():
        if "all" in fmts:
            r = fmts["all"]
            out.append(f"{label}regime {arm}: {r['regime']} (retention above chance {num(r['retention'])} at generation "
                       f"{r['generation']}, mean over formats, all subjects)")
    return out
