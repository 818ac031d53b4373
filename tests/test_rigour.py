"""Study rigour on tiny local models: the option-order control tells position bias from knowledge, provenance is
recorded and verified, and the Brier score is what a hand computation gives.

The position-biased model is a real checkpoint: a GPT-2 whose final layer norm has zero weight, so its hidden
state is the same constant vector at every position, chosen to make the letter "A" the most likely next token
whatever the prompt. In letter formats it answers "A" in every option order (position bias); in text formats its
scores depend on the choice texts only, so it picks the same option in every order (what knowing looks like to
the control).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from kcollapse.cli import app
from kcollapse.config import EvalConfig, validate
from kcollapse.evaluate import evaluate, load_benchmark
from kcollapse.io import read_jsonl
from kcollapse.loop import run_experiment
from kcollapse.report import write_report
from kcollapse.stages import classify_run, stages_command
from kcollapse.tables import b_onset_text, position_text

from conftest import DATA, build_tokenizer, corpus_lines
from test_loop import tiny_config

RIGOUR_FORMATS = ["multiple_choice", "short_answer", "cloze"]


def letter_gpt2(path, letter: str):
    """A GPT-2 checkpoint that answers `letter` to every prompt (see the module docstring)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    tok = build_tokenizer(corpus_lines())
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=256,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():  # constant final hidden state h with wte[letter] . h = 8: it wins by a wide margin everywhere
        w = model.transformer.wte.weight[tok.convert_tokens_to_ids(letter)]
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(8 * w / w.norm() ** 2)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def letter_a_gpt2(tmp_path_factory):
    return letter_gpt2(tmp_path_factory.mktemp("letter_a_gpt2"), "A")


def rows(run_dir, fmt, metric, generation=0):
    df = pd.read_json(run_dir / "metrics.jsonl", lines=True)
    sel = df[(df.format == fmt) & (df.metric == metric) & df.subject.isna() & (df.generation == generation)]
    return float(sel.value.iloc[0])


def test_a_model_biased_to_one_position_is_flagged_as_position_bias_not_knowledge(letter_a_gpt2, tmp_path, capsys):
    cfg = validate(tiny_config(letter_a_gpt2, [{"name": "a", "synthetic_ratio": 0.5}], generations=1, threads=1,
                               **{"eval.formats": RIGOUR_FORMATS, "eval.free_text": False, "train.lr": 1e-6,
                                  "eval.permutation": True}))
    out = run_experiment(cfg, tmp_path / "run")
    records = [r for p in (out / "arms/a/gen_0/answers").glob("*__multiple_choice.jsonl") for r in read_jsonl(p)]
    assert records and all(r["predicted_index"] == 0 and r["perm_predicted_position"] == 0 for r in records)
    assert len({r["perm_shift"] for r in records}) > 1 and all(1 <= r["perm_shift"] <= 3 for r in records)
    # the gold letters over both orders, by hand: where the answer stands before and after the rotation
    golds = [r["correct_index"] for r in records] + [(r["correct_index"] - r["perm_shift"]) % 4 for r in records]
    gold_on_a = golds.count(0) / len(golds)
    assert rows(out, "multiple_choice", "max_freq") == 1.0
    assert rows(out, "multiple_choice", "position_bias") == pytest.approx(1 - gold_on_a)
    assert rows(out, "multiple_choice", "position_consistency") == 1.0
    assert rows(out, "multiple_choice", "option_consistency") == 0.0
    assert rows(out, "multiple_choice", "consistent_correct") == 0.0  # right in one order is luck, never in both
    # the text format: same constant model, but its pick follows the choice text wherever it stands
    assert rows(out, "short_answer", "option_consistency") == 1.0
    assert rows(out, "short_answer", "position_consistency") == 0.0
    assert not any(m.startswith("position") for m in pd.read_json(out / "metrics.jsonl", lines=True)
                   .query("format == 'cloze'").metric)  # cloze lists no options: nothing to permute

    result = classify_run(out)
    mc, sa = result["arms"]["a"]["formats"]["multiple_choice"], result["arms"]["a"]["formats"]["short_answer"]
    assert mc["position_bias_generations"] == [0, 1] and position_text(mc) == "gen 0"
    assert all("position bias" in p["position_note"] and "on A" in p["position_note"] and "max_freq 1.00" in p["position_note"]
               for p in mc["generations"])
    assert sa["position_bias_generations"] == [] and not any("position_note" in p for p in sa["generations"])
    stages_command(out)
    table = capsys.readouterr().out
    assert "position" in table and "gen 0" in table
    report = write_report(out).read_text()
    assert "Option-order control" in report and "100% of picks on A" in report

    # the control is what tells them apart: asked in one order only, nothing is flagged
    cfg_off = validate(tiny_config(letter_a_gpt2, [{"name": "a", "synthetic_ratio": 0.5}], generations=1, threads=1,
                                   **{"eval.formats": RIGOUR_FORMATS, "eval.free_text": False, "train.lr": 1e-6,
                                      "eval.permutation": False}))
    off = run_experiment(cfg_off, tmp_path / "off")
    assert classify_run(off)["arms"]["a"]["formats"]["multiple_choice"]["position_bias_generations"] == []
    assert rows(off, "multiple_choice", "max_freq") == 1.0


def test_a_drop_that_is_a_change_of_favourite_letter_is_b_marked_position_bias(letter_a_gpt2, tmp_path, monkeypatch):
    """Gen 0 answers "A" to a benchmark whose answers are mostly A (it looks knowledgeable); training turns it into a
    model that answers "D": accuracy collapses (stage B), and the control shows both were positions, not facts."""
    import kcollapse.train as train
    from kcollapse.models import load_model

    items = read_jsonl(DATA / "bench.jsonl")
    for k, item in enumerate(items):  # gold moved to A for 10 of 12 questions
        gold = 0 if k < 10 else 1
        rest = [c for i, c in enumerate(item["choices"]) if i != item["answer"]]
        item["choices"] = rest[:gold] + [item["choices"][item["answer"]]] + rest[gold:]
        item["answer"] = gold
    bench = tmp_path / "bench_mostly_a.jsonl"
    bench.write_text("".join(json.dumps(i) + "\n" for i in items))
    letter_d, _ = load_model(letter_gpt2(tmp_path / "letter_d", "D"))
    monkeypatch.setattr(train, "finetune", lambda *a, **kw: letter_d)
    cfg = validate(tiny_config(letter_a_gpt2, [{"name": "a", "synthetic_ratio": 1.0}], threads=1, **{
        "eval.benchmark": str(bench), "eval.formats": ["multiple_choice"], "eval.free_text": False, "eval.permutation": True}))
    out = run_experiment(cfg, tmp_path / "run")
    assert rows(out, "multiple_choice", "accuracy") == pytest.approx(10 / 12)
    assert rows(out, "multiple_choice", "accuracy_permuted") < 0.5 and rows(out, "multiple_choice", "consistent_correct") == 0
    f = classify_run(out)["arms"]["a"]["formats"]["multiple_choice"]
    assert f["stages"] == "ABB" and f["onset_B"] == 1 and f["position_bias_generations"] == [0, 1, 2]
    assert b_onset_text(f, 2) == "gen 1 (position bias)"
    assert any("100% of picks on D" in reason for reason in f["generations"][1]["reasons"])


@pytest.mark.parametrize("scoring", ["reference", "loglik"])
def test_brier_equals_a_hand_computation(tiny_gpt2, tmp_path, scoring):
    from kcollapse.models import load_model

    model, tok = load_model(tiny_gpt2)
    cfg = EvalConfig(benchmark=str(DATA / "bench.jsonl"), formats=["multiple_choice", "short_answer"], free_text=False,
                     few_shot_k=1, scoring=scoring, permutation=False)
    out = evaluate(model, tok, cfg, load_benchmark(cfg), answers_dir=tmp_path)
    for fmt in ("multiple_choice", "short_answer"):
        records = [r for p in sorted(tmp_path.glob(f"*__{fmt}.jsonl")) for r in read_jsonl(p)]
        hand = []
        for r in records:  # probabilities from the raw scores, as the scoring definitions say
            if scoring == "reference":
                p = [s / sum(r["scores"]) for s in r["scores"]]
            else:
                e = [math.exp(s - max(r["scores"])) for s in r["scores"]]
                p = [x / sum(e) for x in e]
            hand.append(sum((pk - (k == r["correct_index"])) ** 2 for k, pk in enumerate(p)))
        row = {m["metric"]: m["value"] for m in out if m["format"] == fmt and m["subject"] is None}
        assert row["brier"] == pytest.approx(sum(hand) / len(hand), rel=1e-9)
        assert "ece" in row and 0.0 < row["brier"] < 2.0
    # one record written out in full: p = (0.5, 0.3, 0.2), gold 0 -> 0.25 + 0.09 + 0.04
    from kcollapse.evaluate.metrics import brier

    assert brier([{"option_probs": [0.5, 0.3, 0.2], "correct_index": 0}]) == pytest.approx(0.38)


def test_provenance_is_recorded_and_verify_catches_a_changed_byte(tiny_gpt2, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    shutil.copy(DATA / "corpus.txt", corpus)
    cfg = validate(tiny_config(tiny_gpt2, [{"name": "a", "synthetic_ratio": 0.5}], threads=1, **{
        "corpus.path": str(corpus), "eval.formats": ["multiple_choice", "cloze"], "eval.free_text": False}))
    out = run_experiment(cfg, tmp_path / "run")
    run = json.loads((out / "run.json").read_text())
    prov = run["provenance"]
    assert prov["inputs"]["corpus"]["sha256"] == hashlib.sha256(corpus.read_bytes()).hexdigest()
    assert prov["inputs"]["benchmark"]["sha256"] == hashlib.sha256((DATA / "bench.jsonl").read_bytes()).hexdigest()
    weights = hashlib.sha256((tiny_gpt2 / "model.safetensors").read_bytes()).hexdigest()
    assert prov["inputs"]["gen0_weights"]["sha256"] == hashlib.sha256(f"model.safetensors\t{weights}\n".encode()).hexdigest()
    assert len(prov["config_sha256"]) == 64 and prov["kcollapse"]["version"]
    assert prov["host"]["device"] == "cpu" and prov["host"]["dtype"] == "float32" and prov["host"]["torch_threads"] == 1
    times = run["generation_times"]
    assert set(times) == {"gen_0", "a"} and set(times["a"]) == {"1", "2"}
    assert all(t["started"] <= t["finished"] for t in [times["gen_0"], *times["a"].values()])
    report = write_report(out).read_text()
    assert prov["inputs"]["corpus"]["sha256"] in report and "Provenance" in report
    assert 'alt="reliability diagrams"' in report and (out / "figures/reliability.png").is_file()

    def verify():
        result = CliRunner().invoke(app, ["verify", str(out)])
        return result.exit_code, [line for line in result.stdout.splitlines() if line.strip()]

    code, lines = verify()
    assert code == 0 and lines[0].startswith("ok")
    original = corpus.read_bytes()
    i = original.index(b"e")
    corpus.write_bytes(original[:i] + b"E" + original[i + 1:])  # one byte, same length
    code, lines = verify()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("corpus:") and str(corpus) in lines[0]
    run_experiment(cfg, out)  # a resume on the changed corpus keeps the original record (and warns)
    assert json.loads((out / "run.json").read_text())["provenance"] == prov
    assert "corpus differs from the one this run started with" in capsys.readouterr().err
    corpus.write_bytes(original)
    assert verify()[0] == 0
    weights_file = out / "gen_0/model/model.safetensors"
    data = bytearray(weights_file.read_bytes())
    data[-1] ^= 1
    weights_file.write_bytes(bytes(data))
    cfg_file = out / "config.yaml"
    cfg_file.write_text(cfg_file.read_text().replace("threads: 1", "threads: 2").replace("seed: 0\ndevice", "seed: 1\ndevice"))
    code, lines = verify()  # threads only changes speed (a resume may change it); the seed changes the run
    assert code == 1 and [line.split(":")[0] for line in lines] == ["config", "gen0_weights"], lines


def test_verify_on_a_directory_without_a_record_is_one_clean_line(tmp_path):
    result = CliRunner().invoke(app, ["verify", str(tmp_path)])
    assert result.exit_code == 2 and result.stderr.strip().startswith("error: ") and "run.json" in result.stderr
