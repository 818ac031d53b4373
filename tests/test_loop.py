"""The recursive loop end to end on tiny local models: run directory, modes, mixing, chat, LoRA, resume."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch
import yaml

from kcollapse.config import validate
from kcollapse.errors import UserError
from kcollapse.io import read_jsonl
from kcollapse.loop import run_experiment
from kcollapse.provenance import verify
from kcollapse.report import report_after_run

from conftest import DATA, interrupted


def tiny_config(model, arms, **over) -> dict:
    cfg = {
        "model": str(model),
        "corpus": {"path": str(DATA / "corpus.txt"), "min_chars": 20, "heldout_share": 0.1},
        "block_tokens": 16, "prompt_tokens": 8, "new_tokens": 8, "samples_per_generation": 24, "generations": 2,
        "arms": arms,
        "train": {"lr": 1e-3, "max_steps": 2, "chunk_tokens": 64, "batch_size": 2, "grad_accum": 1,
                  "gradient_checkpointing": False},
        "sampling": {"batch_size": 16},
        "eval": {"benchmark": str(DATA / "bench.jsonl"), "limit": 6, "free_text_tokens": 4, "few_shot_k": 1,
                 "perplexity_stride": 32},
    }
    for key, value in over.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return cfg


def metrics(run_dir):
    return pd.read_json(run_dir / "metrics.jsonl", lines=True)


def stable(run_dir):
    """The run's metrics without wall-clock rows: what must be identical across resumes and schedules."""
    df = metrics(run_dir)
    return df[~df.metric.str.startswith("seconds_")].reset_index(drop=True)


def test_two_generation_run_writes_the_run_directory(tiny_gpt2, tmp_path):
    cfg = validate(tiny_config(tiny_gpt2, [{"name": "half", "synthetic_ratio": 0.5}]))
    out = run_experiment(cfg, tmp_path / "run")
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["weight_decay"] == 0.01 and saved["arms"][0]["synthetic_ratio"] == 0.5  # defaults written out
    assert "torch=" in (out / "config.yaml").read_text().splitlines()[0]
    df = metrics(out)
    assert list(df.columns) == ["arm", "generation", "metric", "value", "format", "subject"]
    assert set(df.generation) == {0, 1, 2} and set(df.arm) == {"half"}
    for name in ("perplexity_heldout", "accuracy", "seconds_synthesize", "seconds_train", "seconds_eval", "train_tokens"):
        assert name in set(df.metric), name
    for g in (1, 2):
        mix = read_jsonl(out / f"arms/half/gen_{g}/synthetic.jsonl")
        assert [r["source"] for r in mix].count("synthetic") == 12 and len(mix) == 24
        assert all(r["prompt"] and "continuation" in r for r in mix if r["source"] == "synthetic")
        assert list((out / f"arms/half/gen_{g}/answers").glob("*__multiple_choice.jsonl"))
    assert list((out / "arms/half/gen_0/answers").glob("*.jsonl"))
    assert (out / "gen_0/model/model.safetensors").exists()
    assert (out / "arms/half/gen_2/model/model.safetensors").exists()
    assert not (out / "arms/half/gen_1/model").exists()  # keep_checkpoints: first_last
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.tmp"))
    assert json.loads((out / "state.json").read_text())["complete"] is True


@pytest.mark.parametrize("ratio, expected_synthetic", [(0.0, 0), (0.25, 6), (1.0, 24)])
def test_mixing_shares_are_exact(tiny_gpt2, tmp_path, ratio, expected_synthetic):
    cfg = validate(tiny_config(tiny_gpt2, [{"name": "a", "synthetic_ratio": ratio}], generations=1,
                               **{"eval.formats": ["cloze"], "eval.free_text": False}))
    out = run_experiment(cfg, tmp_path / "run")
    mix = read_jsonl(out / "arms/a/gen_1/synthetic.jsonl")
    assert len(mix) == 24 and sum(r["source"] == "synthetic" for r in mix) == expected_synthetic
    assert [r["source"] for r in mix] == sorted(r["source"] for r in mix)  # real first, then synthetic


def test_modes_replace_accumulate_real_only(tiny_gpt2, tmp_path):
    arms = [{"name": "rep", "synthetic_ratio": 0.5, "mode": "replace"},
            {"name": "acc", "synthetic_ratio": 0.5, "mode": "accumulate"},
            {"name": "real", "synthetic_ratio": 0.5, "mode": "real_only"}]
    cfg = validate(tiny_config(tiny_gpt2, arms, **{"eval.formats": ["cloze"], "eval.free_text": False,
                                                    "train.epochs": 1.0, "train.max_steps": None}))
    out = run_experiment(cfg, tmp_path / "run")
    df = metrics(out)
    texts = df[df.metric == "train_texts"].set_index(["arm", "generation"]).value
    assert texts[("rep", 1)] == texts[("rep", 2)] == 24
    assert texts[("acc", 1)] == 24 and texts[("acc", 2)] == 48  # all previous mixes too
    assert all(r["source"] == "real" for g in (1, 2) for r in read_jsonl(out / f"arms/real/gen_{g}/synthetic.jsonl"))
    # arms in one generation draw the same blocks: the real share of 'rep' is the head of 'real'
    rep, real = (read_jsonl(out / f"arms/{a}/gen_1/synthetic.jsonl") for a in ("rep", "real"))
    assert [r["text"] for r in rep if r["source"] == "real"] == [r["text"] for r in real][:12]


def test_accumulate_subsample_trains_on_a_fixed_size_sample_of_every_generation(tiny_gpt2, tmp_path):
    arms = [{"name": "sub", "synthetic_ratio": 0.5, "mode": "accumulate_subsample"}]
    cfg = validate(tiny_config(tiny_gpt2, arms, generations=3, keep_checkpoints="all",
                               **{"eval.formats": ["cloze"], "eval.free_text": False}))
    out = run_experiment(cfg, tmp_path / "run")
    texts = metrics(out).query("metric == 'train_texts'").set_index("generation").value
    assert list(texts) == [24, 24, 24]  # compute-matched: one generation's worth, however large the pool grows
    samples = {g: json.loads((out / f"arms/sub/gen_{g}/training_sample.json").read_text()) for g in (1, 2, 3)}
    assert [s["pool"] for s in samples.values()] == [24, 48, 72]
    for g, s in samples.items():
        assert {k for k, _ in s["rows"]} == set(range(1, g + 1))  # texts of every earlier generation are present
        assert len({tuple(r) for r in s["rows"]}) == 24  # drawn without replacement
    # deterministic and resumable: the last generation redone from scratch draws the same sample, same numbers
    before = stable(out)
    shutil.rmtree(out / "arms/sub/gen_3")
    run_experiment(cfg, out)
    assert json.loads((out / "arms/sub/gen_3/training_sample.json").read_text()) == samples[3]
    pd.testing.assert_frame_equal(stable(out), before)


def test_chat_template_and_system_prompt_are_used(tiny_gemma, tmp_path, monkeypatch):
    import kcollapse.synthesize as synth

    seen = []
    real_generate = synth.generate

    def spy(model, tokenizer, prompts, *a, **kw):
        seen.extend(prompts)
        return real_generate(model, tokenizer, prompts, *a, **kw)

    monkeypatch.setattr(synth, "generate", spy)
    cfg = validate(tiny_config(tiny_gemma, [{"name": "a", "synthetic_ratio": 1.0}], generations=1,
                               **{"eval.formats": ["short_answer"], "chat.system_prompt": "Continue plainly."}))
    run_experiment(cfg, tmp_path / "chat")
    assert seen and all(isinstance(p, str) and p.startswith("<bos><start_of_turn>user\nContinue plainly.") for p in seen)
    assert all(p.endswith("<start_of_turn>model\n") for p in seen)
    seen.clear()
    cfg = validate(tiny_config(tiny_gemma, [{"name": "a", "synthetic_ratio": 1.0}], generations=1,
                               **{"eval.formats": ["short_answer"], "chat.use_template": False}))
    run_experiment(cfg, tmp_path / "plain")
    assert seen and not any(isinstance(p, str) and "<start_of_turn>" in p for p in seen)


def test_lora_fine_tuning_merges_into_a_plain_checkpoint(tiny_gpt2, tmp_path):
    from safetensors.torch import load_file

    cfg = validate(tiny_config(tiny_gpt2, [{"name": "a", "synthetic_ratio": 0.5}], generations=1,
                               **{"train.method": "lora", "train.lr": 5e-2, "train.lora_r": 4,
                                  "eval.formats": ["cloze"], "eval.free_text": False}))
    out = run_experiment(cfg, tmp_path / "run")
    before = load_file(out / "gen_0/model/model.safetensors")
    after = load_file(out / "arms/a/gen_1/model/model.safetensors")
    assert before.keys() == after.keys() and not any("lora" in k for k in after)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_resume_after_interruption_gives_identical_metrics(tiny_gpt2, tmp_path, monkeypatch):
    arms = [{"name": "a", "synthetic_ratio": 0.5}, {"name": "b", "synthetic_ratio": 1.0}]
    cfg = validate(tiny_config(tiny_gpt2, arms, **{"eval.formats": ["multiple_choice", "cloze"]}))
    run_experiment(cfg, tmp_path / "full")
    interrupted(monkeypatch, 3, lambda: run_experiment(cfg, tmp_path / "resumed"))
    assert not (tmp_path / "resumed/arms/b/gen_1/model").exists()
    run_experiment(cfg, tmp_path / "resumed")
    pd.testing.assert_frame_equal(stable(tmp_path / "full"), stable(tmp_path / "resumed"))


def test_parallel_arms_resume_a_sequential_run_to_the_same_numbers(tiny_gpt2, tmp_path, monkeypatch):
    arms = [{"name": "a", "synthetic_ratio": 0.5}, {"name": "b", "synthetic_ratio": 1.0}, {"name": "c", "synthetic_ratio": 0.0}]
    base = tiny_config(tiny_gpt2, arms, threads=1, **{"eval.formats": ["multiple_choice", "cloze"]})
    run_experiment(validate(base), tmp_path / "sequential")
    interrupted(monkeypatch, 2, lambda: run_experiment(validate(base), tmp_path / "parallel"))
    run_experiment(validate({**base, "parallel_arms": 2}), tmp_path / "parallel")  # a runtime field: resume allowed
    report_after_run(tmp_path / "parallel")  # as `kcollapse run` does after the loop
    pd.testing.assert_frame_equal(stable(tmp_path / "sequential"), stable(tmp_path / "parallel"))
    assert json.loads((tmp_path / "parallel/state.json").read_text())["complete"] is True
    assert (tmp_path / "parallel/report.html").exists()


class _ArmsReached(Exception):
    pass


@pytest.mark.parametrize("threads, expected_gen0", [(None, 2), (1, 1)])
def test_generation_0_runs_on_every_core_unless_threads_is_set(tiny_gpt2, tmp_path, monkeypatch, threads, expected_gen0):
    """Generation 0 has no parallel arms to share the cores with: it gets them all; arm workers split them."""
    from kcollapse import loop, workers

    seen = {}

    def arms(cfg, out, parallel, progress, overall):
        seen["worker"] = cfg.threads or workers.threads_per_worker(parallel)
        raise _ArmsReached

    monkeypatch.setattr(loop.Runner, "evaluate_gen0", lambda self: seen.setdefault("gen0", torch.get_num_threads()))
    monkeypatch.setattr(loop, "run_arms_in_processes", arms)
    monkeypatch.setattr(workers, "threads_per_worker", lambda parallel: 2 // parallel)  # as on a 2-core machine
    arms_cfg = [{"name": "a", "synthetic_ratio": 0.5}, {"name": "b", "synthetic_ratio": 1.0}]
    torch.set_num_threads(2)
    try:
        with pytest.raises(_ArmsReached):
            run_experiment(validate(tiny_config(tiny_gpt2, arms_cfg, threads=threads, parallel_arms=2)), tmp_path / "run")
    finally:
        torch.set_num_threads(1)  # the suite's setting (conftest)
    assert seen == {"gen0": expected_gen0, "worker": 1}


def test_importing_kcollapse_bounds_openmp_spinning_unless_the_user_chose():
    import os
    import subprocess
    import sys

    probe = "import os, kcollapse; print(os.environ.get('GOMP_SPINCOUNT'))"
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    assert subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True).stdout.strip() == "1000"
    mine = subprocess.run([sys.executable, "-c", probe], env={**env, "OMP_WAIT_POLICY": "PASSIVE"}, capture_output=True,
                          text=True).stdout.strip()
    assert mine == "None"


def test_a_run_dir_from_another_config_is_refused(tiny_gpt2, tmp_path):
    base = tiny_config(tiny_gpt2, [{"name": "a", "synthetic_ratio": 0.5}], generations=1,
                       **{"eval.formats": ["cloze"], "eval.free_text": False})
    run_experiment(validate(base), tmp_path / "run")
    changed = validate({**base, "train": {**base["train"], "lr": 0.5}})
    with pytest.raises(UserError, match=r"different config \(train.lr differ\)"):
        run_experiment(changed, tmp_path / "run")


def test_more_generations_extend_a_finished_run_to_the_numbers_of_a_longer_run(tiny_gpt2, tmp_path):
    arms = [{"name": "a", "synthetic_ratio": 0.5}, {"name": "b", "synthetic_ratio": 1.0, "mode": "accumulate"}]
    base = tiny_config(tiny_gpt2, arms, **{"eval.formats": ["multiple_choice", "cloze"]})
    run_experiment(validate({**base, "generations": 3}), tmp_path / "long")
    run_experiment(validate({**base, "generations": 1}), tmp_path / "run")
    assert json.loads((tmp_path / "run/state.json").read_text())["complete"] is True
    run_experiment(validate({**base, "generations": 3}), tmp_path / "run")
    pd.testing.assert_frame_equal(stable(tmp_path / "long"), stable(tmp_path / "run"))
    assert sorted(metrics(tmp_path / "run").generation.unique()) == [0, 1, 2, 3]
    assert "generations: 3" in (tmp_path / "run/config.yaml").read_text()
    extended = json.loads((tmp_path / "run/run.json").read_text())["extended"]
    assert [(e["from_generations"], e["to_generations"]) for e in extended] == [(1, 3)]
    assert verify(tmp_path / "run") == []  # the recorded config hash is the extended run's
    with pytest.raises(UserError, match=r"has 3 generations; generations may grow .* not shrink to 2: use a new --out"):
        run_experiment(validate({**base, "generations": 2}), tmp_path / "run")
    with pytest.raises(UserError, match=r"different config \(generations, train.lr differ\)"):
        run_experiment(validate({**base, "generations": 4, "train": {**base["train"], "lr": 0.5}}), tmp_path / "run")


def test_missing_corpus_leaves_no_run_directory(tiny_gpt2, tmp_path):
    cfg = validate(tiny_config(tiny_gpt2, [{"name": "a", "synthetic_ratio": 0.5}], corpus=str(tmp_path / "none.txt")))
    with pytest.raises(UserError, match="does not exist"):
        run_experiment(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_synthetic_text_is_the_sequence_the_model_wrote(tiny_gpt2):
    """Prompt + continuation is the decoded sequence: a continuation decoded alone lost what joins it to the prompt
    (the organism's word-level decoder wrote "##." before a glued "."; a word's second half got a space)."""
    from kcollapse import synthesize
    from kcollapse.config import ArmConfig, ExperimentConfig, OrganismConfig
    from kcollapse.corpus import Block
    from kcollapse.lm import continuation_text
    from kcollapse.models import load_model
    from kcollapse.organism import gen0

    texts = ["Barbados is located in North America. In Barbados, people pay with the Dollar.",
             "Greece's capital is Athens; its currency is the Euro (since 2002)."]
    tok = gen0.build_tokenizer(texts, 128)
    model = gen0.build_model(OrganismConfig(n_embd=16, n_layer=1, n_head=1), tok)  # untrained: any word may follow
    blocks = [Block(ids[i : i + 6]) for ids in tok(texts, add_special_tokens=False)["input_ids"] for i in range(12)]
    cfg = ExperimentConfig(model="organism", prompt_tokens=5, new_tokens=4, sampling={"keep_prompt": True})
    records = synthesize.build_mix(model, tok, blocks, ArmConfig(name="a", synthetic_ratio=1.0), cfg, seed=0)
    assert len(records) == 24 and not any("#" in r["text"] for r in records)
    assert any(r["prompt"][:1] in ".,'" for r in records)  # blocks cut from a stream can open with a glued mark
    assert all(r["text"] == r["prompt"] + r["continuation"] for r in records)
    assert all(tok.decode(tok(r["text"])["input_ids"]) == r["text"] for r in records)  # re-encodes to the same words
    glued = [r for r in records if r["continuation"][:1] in gen0.GLUE_LEFT]
    assert glued and all(r["prompt"][-1] != " " for r in glued)  # the case that went wrong is here, and joins tight

    bpe = load_model(tiny_gpt2, device="cpu")[1]  # byte-level BPE: cut inside a word
    ids = bpe("The capital of France is Paris.", add_special_tokens=False)["input_ids"]
    cut = next(k for k in range(1, len(ids)) if not bpe.convert_ids_to_tokens(ids[k]).startswith("Ġ"))
    assert bpe.decode(ids[:cut]) + continuation_text(bpe, ids[:cut], ids[cut:]) == "The capital of France is Paris."
