"""Hostile text and untrusted artefacts: model-written text is data, never markup, code or terminal commands.

A model (or a corpus, or a benchmark) can emit `<script>`, HTML, control characters and terminal escapes, bidi
overrides, lone surrogates and megabyte lines. Run files stay valid JSONL for every reader (pandas' strict one
too), the report escapes everything, the terminal never receives raw control characters. Models load from
safetensors only, a model's own Python code never runs unless asked for, and no user file is ever unpickled.
"""

from __future__ import annotations

import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import yaml
from typer.testing import CliRunner

from kcollapse.cli import app
from kcollapse.config import ExperimentConfig, validate
from kcollapse.io import atomic_write_text, dumps, read_jsonl, sanitize_terminal, write_jsonl

from conftest import DATA

SCRIPT = "<script>alert(1)</script>"
HOSTILE = [
    SCRIPT,
    '<img src=x onerror="alert(2)"><a href="javascript:alert(3)">click</a></td></table><!--',
    "\x1b[2J\x1b[31mred\x1b]0;pwned title\x07 bell\x00nul\x08\x7f\x9b",
    "lone \ud800 and \udfff surrogates",
    "\u202eevil bidi override\u202c and \u2066isolate\u2069",
    '"}, {"injected": true} \\u0000 \n{"fake": "line"}',
]
MEGABYTE = "A" * 1_000_000 + SCRIPT


class Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs, self.values = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [k for k, _ in attrs]
        self.values += [v or "" for _, v in attrs]


def assert_strict_jsonl(path: Path, n_rows: int | None = None) -> list[dict]:
    """Valid for every reader: ASCII only, one object per line, parsed by json and by pandas (ujson)."""
    raw = path.read_bytes()
    assert raw.isascii(), f"{path}: raw non-ASCII bytes (control characters are escaped, text is \\u-escaped)"
    lines = raw.decode().splitlines()
    rows = [json.loads(line) for line in lines]
    assert all(isinstance(r, dict) for r in rows)
    assert rows == read_jsonl(path)
    assert len(pd.read_json(io.StringIO(raw.decode()), lines=True)) == len(rows)
    if n_rows is not None:
        assert len(rows) == n_rows
    return rows


def one_generation_config(model, corpus, *, samples: int, ratio: float, eval: dict):
    """The smallest real run these tests make: one arm, one generation, one training step, six questions."""
    return validate({
        "model": str(model), "threads": 1,
        "corpus": {"path": str(corpus), "min_chars": 20, "heldout_share": 0.1},
        "block_tokens": 16, "prompt_tokens": 8, "new_tokens": 8, "samples_per_generation": samples, "generations": 1,
        "arms": [{"name": "a", "synthetic_ratio": ratio}],
        "train": {"lr": 1e-3, "max_steps": 1, "chunk_tokens": 64, "batch_size": 2, "grad_accum": 1,
                  "gradient_checkpointing": False},
        "eval": {"benchmark": str(DATA / "bench.jsonl"), "limit": 6, "few_shot_k": 1, "perplexity_stride": 32, **eval},
    })


# ------------------------------------------------------------------------------------------ JSONL and files
def test_hostile_text_keeps_jsonl_valid(tmp_path):
    rows = [{"text": t, "source": "synthetic", "n": float("nan")} for t in HOSTILE + [MEGABYTE]]
    path = tmp_path / "synthetic.jsonl"
    write_jsonl(path, rows)
    back = assert_strict_jsonl(path, n_rows=len(rows))
    assert back[0]["text"] == SCRIPT and back[-1]["text"] == MEGABYTE and back[0]["n"] is None
    assert back[2]["text"] == HOSTILE[2]  # control characters survive (escaped in the file)
    assert back[3]["text"] == "lone \ufffd and \ufffd surrogates"  # invalid Unicode made valid
    assert "\n" not in dumps({"t": "a\nb\rc\u2028d\u2029"})  # line separators never split a record


def test_text_files_are_always_valid_utf8(tmp_path):
    path = tmp_path / "notes.txt"
    atomic_write_text(path, "ok \ud800 " + HOSTILE[2])
    path.read_bytes().decode("utf-8")  # no surrogate bytes written


def test_corpus_with_lone_surrogate_escapes_loads(tmp_path, tiny_gpt2):
    from kcollapse.config import CorpusConfig
    from kcollapse.corpus import load_texts, make_blocks
    from kcollapse.models import load_tokenizer

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{t} " + "words and more words " * 5}) + "\n" for t in HOSTILE))
    texts = load_texts(CorpusConfig(path=str(corpus)))
    assert len(texts) == len(HOSTILE)
    assert make_blocks(load_tokenizer(str(tiny_gpt2)), texts, 16)


# ------------------------------------------------------------------------------------------ terminal
def test_sanitize_terminal():
    out = sanitize_terminal(HOSTILE[2] + HOSTILE[3] + HOSTILE[4] + "\nnext\tline")
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]", out)
    assert "<U+001B>[2J" in out and "<U+0007>" in out and "<U+0000>" in out and "<U+202E>" in out
    assert "<U+D800>" in out and "\nnext\tline" in out
    assert sanitize_terminal("plain text, unicode ünïcødé") == "plain text, unicode ünïcødé"
    long = sanitize_terminal("x" * 10_000, limit=100)
    assert len(long) < 200 and "9,900 more characters" in long


def test_error_lines_quoting_corpus_text_are_sanitised(tmp_path, tiny_gpt2):
    """The domains found in a corpus are quoted in an error; a terminal escape in one must not reach the terminal."""
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": "words and more words " * 5, "domain": f"\x1b]0;pwned\x07{t}"}) + "\n"
                              for t in ("x", "\x1b[2J")))
    data = {"model": str(tiny_gpt2), "corpus": {"path": str(corpus), "min_chars": 20}, "block_tokens": 16,
            "arms": [{"name": "a", "synthetic_ratio": 0.5, "domain": "chemistry"}],
            "eval": {"benchmark": str(DATA / "bench.jsonl"), "formats": ["cloze"]}}
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["run", str(cfg), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "no corpus text has domain 'chemistry'" in result.stderr
    assert "\x1b" not in result.output and "\x07" not in result.output and "<U+001B>" in result.stderr
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ a run with a hostile model
def _hostile_run(tiny_gpt2, tmp_path, monkeypatch) -> Path:
    """A real one-generation run whose model writes hostile continuations and hostile free-text answers."""
    import kcollapse.lm
    import kcollapse.synthesize
    from kcollapse.loop import run_experiment
    from kcollapse.report import report_after_run

    def hostile(model, tokenizer, prompts, *a, **kw):
        return [HOSTILE[i % len(HOSTILE)] + (" long" * 2000 if i == 1 else "") for i in range(len(prompts))]

    def hostile_answers(model, tokenizer, prompts, *a, **kw):  # (a decode never yields a lone surrogate)
        answers = [t.replace("\n", " ") for t in HOSTILE if not re.search("[\ud800-\udfff]", t)]
        return [answers[i % len(answers)] for i in range(len(prompts))]

    monkeypatch.setattr(kcollapse.synthesize, "generate", hostile)
    monkeypatch.setattr(kcollapse.lm, "generate", hostile_answers)  # what free-text evaluation calls
    corpus = tmp_path / "corpus.jsonl"  # the real text is hostile too (JSON escapes of lone surrogates)
    corpus.write_text("".join(json.dumps({"text": f"{line} {HOSTILE[i % len(HOSTILE)]}"}) + "\n"
                              for i, line in enumerate((DATA / "corpus.txt").read_text().splitlines()) if line.strip()))
    cfg = one_generation_config(tiny_gpt2, corpus, samples=12, ratio=1.0,
                                eval={"free_text_tokens": 4, "formats": ["short_answer"]})
    out = run_experiment(cfg, tmp_path / "run")
    report_after_run(out)  # as `kcollapse run` does after the loop
    return out


def test_hostile_model_text_stays_data(tiny_gpt2, tmp_path, monkeypatch):
    run = _hostile_run(tiny_gpt2, tmp_path, monkeypatch)
    mix = assert_strict_jsonl(run / "arms/a/gen_1/synthetic.jsonl", n_rows=12)
    assert [r["continuation"] for r in mix][:1] == [SCRIPT]
    assert any("\ufffd" in r["text"] for r in mix) and not any(re.search("[\ud800-\udfff]", r["text"]) for r in mix)
    answers = [p for p in run.rglob("answers/*.jsonl")]
    assert answers
    for path in answers + [run / "metrics.jsonl", run / "gen_0/metrics.jsonl", run / "arms/a/gen_1/metrics.jsonl"]:
        assert_strict_jsonl(path)
    texts = [r["answer_text"] for p in answers for r in read_jsonl(p)]
    assert SCRIPT in texts

    # the report (written by the run) shows the hostile text as text; then again with megabyte lines in the files
    from kcollapse.report import write_report

    for extra in (False, True):
        if extra:
            path = run / "arms/a/gen_1/synthetic.jsonl"
            write_jsonl(path, [{"text": MEGABYTE, "source": "synthetic", "prompt": "p", "continuation": MEGABYTE}]
                        + read_jsonl(path))
            for p in answers:
                rows = read_jsonl(p)
                rows[0]["answer_text"] = MEGABYTE
                rows[0]["question"] = MEGABYTE
                write_jsonl(p, rows)
            write_report(run)
        raw = (run / "report.html").read_bytes()
        page = raw.decode("utf-8")  # valid UTF-8
        parser = Tags()
        parser.feed(page)
        assert "script" not in parser.tags and "onerror" not in parser.attrs
        assert "<script" not in page.lower() and not any(v.startswith("javascript:") for v in parser.values)
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
        assert "\x1b" not in page and "\x00" not in page and "\u202e" not in page
        assert len(raw) < 5_000_000  # megabyte lines are cut, not pasted


def test_hostile_text_in_the_answers_report_section_is_escaped(tmp_path):
    """The report's per-question view, fed directly: every hostile field escaped, megabyte lines truncated."""
    from kcollapse.report import answers_section, synthetic_section

    run = tmp_path / "run"
    rec = {"id": "q1", "subject": "s", "format": "short_answer", "question": SCRIPT, "choices": HOSTILE[:4],
           "correct_index": 0, "scores": [0, -1, -2, -3], "is_greedy": True, "predicted_index": 0, "is_correct": True,
           "confidence": 0.5, "answer_text": MEGABYTE, "judged_index": 0}
    for g in (0, 1):
        write_jsonl(run / f"arms/a/gen_{g}/answers/s__short_answer.jsonl", [rec])
        write_jsonl(run / f"arms/a/gen_{g}/synthetic.jsonl", [{"text": t, "source": "synthetic"} for t in
                                                               [MEGABYTE] + HOSTILE])
    html_answers = answers_section(run, "a", {"formats": {}})
    html_synth = synthetic_section(run, "a")
    for html in (html_answers, html_synth):
        parser = Tags()
        parser.feed(html)
        assert "script" not in parser.tags and "img" not in parser.tags and "onerror" not in parser.attrs
        assert "\x1b" not in html and len(html) < 200_000
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html_answers


def test_hostile_values_in_run_json_provenance_are_escaped_in_the_report(tiny_gpt2, tmp_path, monkeypatch):
    """run.json is untrusted too: a real run whose corpus path holds `<script>` and whose host is named with markup
    shows both as text in the report's provenance section, never as markup."""
    import platform
    from html import escape

    from kcollapse.loop import run_experiment
    from kcollapse.report import write_report

    hostname = HOSTILE[1]
    monkeypatch.setattr(platform, "node", lambda: hostname)  # what provenance.host records as the hostname
    corpus = tmp_path / SCRIPT / "corpus.txt"  # the path string holds SCRIPT (directories "<script>alert(1)<", "script>")
    corpus.parent.mkdir(parents=True)
    corpus.write_text((DATA / "corpus.txt").read_text())
    cfg = one_generation_config(tiny_gpt2, corpus, samples=8, ratio=0.5, eval={"free_text": False, "formats": ["cloze"]})
    run = run_experiment(cfg, tmp_path / "run")
    prov = json.loads((run / "run.json").read_text())["provenance"]
    assert prov["host"]["hostname"] == hostname and SCRIPT in prov["inputs"]["corpus"]["path"]  # the input is hostile

    page = write_report(run).read_text(encoding="utf-8")
    section = page[page.index('<h2 id="provenance">'):page.index('<h2 id="config">')]
    assert escape(prov["inputs"]["corpus"]["path"]) in section and "&lt;script&gt;alert(1)&lt;/script&gt;" in section
    assert escape(hostname) + " · " in section
    parser = Tags()
    parser.feed(section)
    assert "script" not in parser.tags and "img" not in parser.tags and "a" not in parser.tags
    assert "onerror" not in parser.attrs and "<script" not in section and "<!--" not in section
    assert SCRIPT not in page and hostname not in page and "<script" not in page.lower()


# ------------------------------------------------------------------------------------------ untrusted artefacts
def test_remote_code_is_off_unless_asked():
    assert ExperimentConfig().trust_remote_code is False
    import inspect

    from kcollapse.models import load_model

    assert inspect.signature(load_model).parameters["trust_remote_code"].default is False


def test_package_never_unpickles_or_trusts_remote_code_by_itself():
    """Static guard: no torch.load / pickle.load(s) of anything, no hard-coded trust_remote_code=True, weights are
    loaded with use_safetensors=True everywhere a model is read, or from a GGUF file (`gguf_file=`: tensors and
    metadata only, no pickle)."""
    src = Path(__file__).parents[1] / "src" / "kcollapse"
    offenders = []
    for path in src.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for pattern in (r"torch\.load\(", r"pickle\.loads?\(", r"trust_remote_code\s*=\s*True", r"joblib\.load",
                        r"weights_only\s*=\s*False", r"resume_from_checkpoint"):
            if re.search(pattern, text):
                offenders.append(f"{path.relative_to(src)}: {pattern}")
        for m in re.finditer(r"(\w+)\.from_pretrained\(", text):
            if m.group(1).startswith(("AutoModel", "AutoPeft")) or re.search(r"For[A-Z]\w+$|LMHeadModel$", m.group(1)):
                call = text[m.start():m.start() + 400].split("\n\n")[0]
                if "use_safetensors=True" not in call and "gguf_file=" not in call:
                    offenders.append(f"{path.relative_to(src)}: {m.group(0)}")
    # known, reported to the evaluation suite's owner: the optional embedding judge (a pip-installed model)
    known = {"evaluate/freetext.py: AutoModel.from_pretrained("}
    offenders = [o for o in offenders if o not in known]
    assert not offenders, offenders


def test_training_writes_no_pickled_trainer_state(tiny_gpt2, tmp_path):
    """Trainer checkpoints (optimizer/rng state) are pickles: the fine-tune step must not write any."""
    from kcollapse.config import TrainConfig
    from kcollapse.models import load_model
    from kcollapse.train import finetune

    model, tok = load_model(tiny_gpt2, device="cpu")
    work = tmp_path / "work"
    finetune(model, tok, ["some text to train on " * 20] * 4, TrainConfig(max_steps=1, chunk_tokens=32, batch_size=1,
                                                                          grad_accum=1, gradient_checkpointing=False),
             seed=0, work_dir=work)
    written = [p.name for p in work.rglob("*") if p.is_file()] if work.exists() else []
    assert not [n for n in written if n.endswith((".bin", ".pt", ".pth", ".pkl"))], written
