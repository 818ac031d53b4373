"""The report: hostile model text is escaped, figures are embedded, the page renders; compare overlays runs."""

import base64
import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from kc_fixture_runs import NOISY, NOISY_MODEL, make_run  # noqa: E402

from kcollapse.errors import UserError  # noqa: E402
from kcollapse.pages import esc  # noqa: E402
from kcollapse.report import compare_command, write_report  # noqa: E402

HUGE = "x" * 2_000_000
HOSTILE = ["<script>alert('pwned')</script>", "bell\x07 nul\x00 esc\x1b[31m", "lone \ud800 surrogate",
           "bidi \u202eevil", HUGE, "</pre></details><img src=http://evil/x.png onerror=alert(1)>"]


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.imgs, self.urls = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "img":
            self.imgs.append(attrs.get("src", ""))
        for key in ("src", "href"):
            if attrs.get(key) and not attrs[key].startswith(("data:", "#")):
                self.urls.append(attrs[key])


def _hostile_run(tmp_path):
    run = make_run(tmp_path / "run", NOISY, model=NOISY_MODEL, n_questions=40,
                   synthetic_texts={("alpha_1.0", g): (HOSTILE * 2)[2 * g % 6:][:6] for g in range(8)},  # 2 shown per gen
                   extra_config="# <script>config</script>\n")
    # the model's own free-text answers are hostile too (written with lone surrogates escaped, as kcollapse.io does)
    for path in run.glob("arms/alpha_1.0/gen_*/answers/*.jsonl"):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for r, text in zip(rows, [t if t is not HUGE else "y" * 20_000 for t in HOSTILE] * 10):
            r["answer_text"] = text
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_esc():
    assert esc("<script>") == "&lt;script&gt;"
    assert "&lt;U+0007&gt;" in esc("a\x07b") and "&lt;U+D800&gt;" in esc("a\ud800b")
    assert "&lt;U+202E&gt;" in esc("\u202e") and esc("line\nnext\ttab") == "line\nnext\ttab"
    out = esc(HUGE, limit=100)
    assert len(out) < 300 and "truncated: 2,000,000 characters" in out
    assert esc(None).startswith("<span")
    assert esc('"quote" & \'single\'') == "&quot;quote&quot; &amp; &#x27;single&#x27;"


@pytest.fixture(scope="module")
def hostile_report(tmp_path_factory):
    run = _hostile_run(tmp_path_factory.mktemp("hostile"))
    return run, write_report(run)


def test_report_escapes_hostile_text_and_embeds_figures(hostile_report):
    run, path = hostile_report
    assert path == run / "report.html"
    raw = path.read_bytes()
    text = raw.decode("utf-8")  # valid UTF-8: lone surrogates were made visible, not written
    assert len(raw) < 3_000_000  # the 2 MB lines were cut
    page = Page()
    page.feed(text)
    assert "script" not in page.tags  # neither ours nor the model's
    assert not page.urls  # nothing to fetch: readable offline
    assert len(page.imgs) >= 2 and all(s.startswith("data:image/png;base64,") for s in page.imgs)
    for src in page.imgs:
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt;" in text
    assert "&lt;script&gt;config&lt;/script&gt;" in text
    assert "&lt;U+0007&gt;" in text and "&lt;U+D800&gt;" in text and "&lt;U+202E&gt;" in text
    assert "truncated: 2,000,000 characters" in text and "truncated: 20,000 characters" in text
    assert "\x00" not in text and "\x07" not in text and "\u202e" not in text
    for section in ["Stages", "Curves per arm", "Option-order control", "Calibration", "Answers to chosen questions",
                    "Synthetic training text", "Provenance", "Config"]:
        assert section in text
    assert {p.name for p in (run / "figures").glob("*.png")} == {"timeline.png", "arm_alpha_1.0.png", "reliability.png",
                                                                    "format_dependence.png"}
    assert json.loads((run / "stages.json").read_text())["arms"]


def _inside_and_below_title(fig, title_text):
    """Every visible axes' tick labels, labels and title lie inside the figure and below the figure title."""
    renderer = fig.canvas.get_renderer()
    title = next(t for t in fig.texts if t.get_text() == title_text).get_window_extent(renderer)
    for ax in (a for a in fig.axes if a.axison):
        box = ax.get_tightbbox(renderer)
        assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= fig.bbox.width and box.y1 <= title.y0, (box, title)
    assert title.x0 >= 0 and title.y1 <= fig.bbox.height


def test_an_arm_figure_keeps_its_title_and_panels_apart(hostile_report, monkeypatch):
    """The arm figure is laid out by fixed margins (tight_layout measured every tick label: half its time): every
    panel's title, tick labels and x label stay inside the figure, off the other panels and below the figure title."""
    from kcollapse import figures
    from kcollapse.rundir import load_metrics

    run, _ = hostile_report
    drawn = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: drawn.append(fig) or b"")
    arm_stages = json.loads((run / "stages.json").read_text())["arms"]["alpha_1.0"]
    df = load_metrics(run)
    extra = [{"arm": "alpha_1.0", "generation": g, "metric": f"extra_{i}", "value": 1e-4 * g * i, "format": None,
              "subject": None} for i in range(24) for g in range(8)]  # a tall figure, as a real run's 30 panels
    figures.arm_figure(pd.concat([df, pd.DataFrame(extra)], ignore_index=True), "alpha_1.0", arm_stages,
                       run / "unused.png")
    fig = drawn[0]
    _inside_and_below_title(fig, "arm alpha_1.0")
    accuracy = fig.axes[0]  # its legend sits where no point is (lower left covered a format at chance)
    legend = accuracy.get_legend().get_window_extent(fig.canvas.get_renderer())
    points = [accuracy.transData.transform(xy) for line in accuracy.get_lines() if line.get_linestyle() != ":"
              for xy in line.get_xydata()]
    assert len(points) >= 16 and not any(legend.contains(*p) for p in points)
    boxes = [ax.get_tightbbox(fig.canvas.get_renderer()) for ax in fig.axes if ax.axison]
    assert len(boxes) >= 30
    for i, box in enumerate(boxes):
        assert not any(box.overlaps(other) for other in boxes[i + 1:]), i


def test_the_stage_timeline_fits_one_row_or_many(hostile_report, monkeypatch, tmp_path):
    """A run with one arm and one format has a one-row timeline: its title, row label and x label once ran off
    the figure (tight_layout gave up: too little height for the title strip and the axis labels); a long row label
    ran off its left edge (laid out at 100 dpi, its text measured narrower than in the PNG saved at 80)."""
    import warnings

    from kcollapse import figures

    run = Path(shutil.copytree(hostile_report[0], tmp_path / "run"))  # the shared run's report stays whole
    drawn = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: drawn.append(fig) or b"")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Tight layout not applied")
        write_report(run)
        title = "stage timeline\nA preserved · B knowledge collapse · C instruction-following collapse"
        timeline = [f for f in drawn if any(t.get_text() == title for t in f.texts)]
        assert len(timeline) == 1
        rows = [(t.get_text(), {0: "A", 1: "B"}) for t in timeline[0].axes[0].get_yticklabels()]
        assert rows and all(" · " in label for label, _ in rows)  # "arm · format", as the report labels them
        figures.timeline_figure(rows[:1], 1, run / "unused.png")
        figures.timeline_figure(rows * 10, 7, run / "unused.png")
        longest = "alpha_1.0_geography · multiple_choice_few_shot"  # the default run's, and at chance there
        figures.timeline_figure(rows + [(longest, {0: "A"})], 10, run / "unused.png", frozenset({longest}))
    for fig in timeline + drawn[-3:]:
        assert fig.dpi == figures.DPI  # laid out at the resolution it is saved at
        _inside_and_below_title(fig, title)


def test_a_reliability_legend_leaves_the_bins_visible(tmp_path, monkeypatch):
    """The default run's short answer has right answers at low confidence (bins at the upper left), where the
    legend sat and hid four of them; it now goes where no bin is."""
    from kcollapse import figures

    drawn = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: drawn.append(fig) or b"")
    bins = lambda pts: [{"confidence": c, "accuracy": a, "n": 10} for c, a in pts]  # noqa: E731
    curves = {"short_answer": {"generation 0": bins([(0.3, 1.0), (0.35, 0.9), (0.45, 0.95), (0.6, 0.85), (0.95, 1.0)]),
                               "alpha_1.0 gen 10": bins([(0.3, 0.5), (0.4, 0.95), (0.55, 0.6), (0.8, 0.3)])}}
    figures.reliability_figure(curves, tmp_path / "unused.png")
    ax = drawn[0].axes[0]
    legend = ax.get_legend().get_window_extent(drawn[0].canvas.get_renderer())
    points = [ax.transData.transform(xy) for c in ax.collections for xy in c.get_offsets()]
    assert len(points) == 9 and not any(legend.contains(*p) for p in points)


@pytest.mark.parametrize("free_text", [True, False])
def test_the_answers_shown_say_whether_the_model_wrote_free_text(tiny_gpt2, tmp_path, free_text):
    """A run with `eval.free_text: false` has no free-text answers: the answers section
    says so once, where each cell used to read "(none)", as if the model had written nothing."""
    from test_loop import tiny_config

    from kcollapse.config import validate
    from kcollapse.loop import run_experiment
    from kcollapse.report import answers_section

    cfg = validate(tiny_config(tiny_gpt2, [{"name": "a", "synthetic_ratio": 1.0}], generations=1,
                               **{"eval.formats": ["short_answer"], "eval.free_text": free_text}))
    run = run_experiment(cfg, tmp_path / "run")
    written = [json.loads(line) for p in sorted(run.glob("arms/a/gen_1/answers/*.jsonl"))
               for line in p.read_text().splitlines()]
    assert written and all((r["answer_text"] is not None) == free_text for r in written)
    section = str(answers_section(run, "a", {}))
    assert section.count('<td class="q">') > 0
    assert "(none)" not in section
    assert ("The free-text answer is what the model wrote" in section) == free_text
    assert ("this run wrote no free-text answers" in section) == (not free_text)
    cells = section.count("<th>generation ") * section.count('<td class="q">')  # generations 0 and 1, each question
    assert section.count('<div class="text">') == (cells if free_text else 0)


def test_report_on_missing_dir():
    with pytest.raises(UserError, match="not found"):
        write_report(Path("/nonexistent/run"))


def test_compare_overlays_runs(tmp_path, monkeypatch):
    from kcollapse import figures

    a = make_run(tmp_path / "a" / "run", NOISY, model=NOISY_MODEL, n_questions=40)
    b = make_run(tmp_path / "b" / "run", {"alpha_0.5": NOISY["alpha_1.0"]}, n_questions=40, answers=False, seed=1)
    out = tmp_path / "cmp"
    drawn, save = [], figures._save
    keep = lambda fig, path: drawn.append((fig, fig.canvas.get_renderer())) or save(fig, path)  # noqa: E731
    monkeypatch.setattr(figures, "_save", keep)
    compare_command([a, b], out)
    fig, renderer = drawn[0]  # one legend for every panel, below them, off their lines (a legend each covered them)
    panels = [ax for ax in fig.axes if ax.axison]
    assert len(fig.legends) == 1 and not any(ax.get_legend() for ax in panels)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["a/run/alpha_1.0", "b/run/alpha_0.5"]
    legend = fig.legends[0].get_window_extent(renderer)
    assert legend.x0 >= 0 and legend.y0 >= 0 and legend.x1 <= fig.bbox.width
    assert not any(legend.overlaps(ax.get_tightbbox(renderer)) for ax in panels)
    df = pd.read_csv(out / "comparison.csv")
    assert set(df["run"]) == {"a/run", "b/run"}  # same directory names: parents disambiguate
    assert {"run", "arm", "generation", "metric", "value", "format", "subject", "stage"} <= set(df.columns)
    acc = df[(df["metric"] == "accuracy") & (df["format"] == "multiple_choice") & df["subject"].isna()]
    assert "".join(acc[acc["run"] == "a/run"].sort_values("generation")["stage"]) == "AAABABBB"
    page = Page()
    page.feed((out / "report.html").read_text())
    assert "script" not in page.tags and len(page.imgs) == 1 and (out / "figures" / "comparison.png").is_file()
    with pytest.raises(UserError):
        compare_command([tmp_path / "missing"], out)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed")
def test_page_renders_in_chromium(hostile_report, tmp_path):
    run, path = hostile_report
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,2000",
                    path.resolve().as_uri()], capture_output=True, timeout=90)
    assert shot.is_file() and shot.stat().st_size > 50_000  # a page with figures, not a blank one
    from PIL import Image

    colors = Image.open(shot).convert("RGB").resize((64, 100)).getcolors(10_000)
    assert colors is not None and len(colors) > 20
