"""kcollapse bench: its baselines compute the same numbers as the batched engine; its JSON rows keep the contract.
Speed itself is not tested (shared machines are noisy)."""

from __future__ import annotations

import json
import re

import pytest

from kcollapse.bench import bench_command, lmeval_scores, one_by_one_answers, reference_scores
from kcollapse.evaluate.formats import get_format, option_targets, render
from kcollapse.evaluate.freetext import generate_answers
from kcollapse.evaluate.scoring import score_options
from kcollapse.models import load_model
from test_eval_scoring import items

ROW_KEYS = {"name", "baseline", "format", "model", "ours", "theirs", "ratio", "unit", "threads", "precision", "target",
            "passed", "train_config"}


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2):
    return load_model(tiny_gpt2, device="cpu")


@pytest.mark.parametrize("fmt_name", ["multiple_choice", "multiple_choice_few_shot", "short_answer", "no_instruction"])
def test_reference_lmeval_and_ours_agree(gpt2, fmt_name):
    model, tokenizer = gpt2
    fmt, qs = get_format(fmt_name), items()
    prompts = [render(fmt, q, qs[:2]) for q in qs]
    targets = [option_targets(fmt, q) for q in qs]
    ours = score_options(model, tokenizer, prompts, targets, scoring="reference", answer=fmt.answer, batch_size=3)
    for theirs in (reference_scores(model, tokenizer, prompts, targets, fmt.answer),
                   lmeval_scores(model, tokenizer, prompts, targets, fmt.answer, batch_size=5)):
        for o, t in zip(ours, theirs):
            assert o["scores"] == pytest.approx(t["scores"], abs=1e-5)
            assert o["is_greedy"] == t["is_greedy"]
            assert o["predicted_index"] == t["predicted_index"]


def test_one_by_one_answers_equal_batched(gpt2):
    model, tokenizer = gpt2
    prompts = [render(get_format("short_answer"), q) for q in items()]
    theirs, n_new = one_by_one_answers(model, tokenizer, prompts, 6)
    assert theirs == generate_answers(model, tokenizer, prompts, 6, batch_size=4)
    assert 0 < n_new <= 6 * len(prompts)


def test_reference_synthesis_equals_ours_greedy(gpt2):
    """The synthesis baseline (`model.generate`, batches of 4) writes what our decoding loop writes."""
    from kcollapse.bench import reference_synthesis
    from kcollapse.config import SamplingConfig
    from kcollapse.lm import generate

    model, tokenizer = gpt2
    texts = [render(get_format("short_answer"), q) for q in items()]
    prompts = [ids[:6] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    theirs = reference_synthesis(model, tokenizer, prompts, 10, SamplingConfig(), do_sample=False)
    assert len(theirs) == len(prompts) and any(theirs)
    assert theirs == generate(model, tokenizer, prompts, 10, batch_size=16)


def test_bench_command_writes_contract_rows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/default here: the phase table says so
    out = tmp_path / "bench.json"
    returned = bench_command(True, out, _tiny=True)
    assert not [r for r in returned if "MISMATCH" in r["check"]]  # both sides of every pair gave the same numbers
    rows = json.loads(out.read_text())
    assert {r["name"] for r in rows} == {"scoring", "free_text", "synthesis", "training"}
    for r in rows:
        assert set(r) == ROW_KEYS
        assert r["baseline"] in ("reference", "lm-eval")
        assert (r["format"] is not None) == (r["name"] == "scoring")
        assert r["ours"] > 0 and r["theirs"] > 0 and r["ratio"] == pytest.approx(r["ours"] / r["theirs"])
        assert isinstance(r["threads"], int) and r["threads"] >= 1
        assert r["precision"] == "float32"
        assert r["passed"] is None if r["target"] is None else r["passed"] == (
            (r["ours"] if r["unit"].startswith("%") else r["ratio"]) >= r["target"])
    assert {r["baseline"] for r in rows if r["name"] == "scoring"} == {"reference", "lm-eval"}
    assert {r["model"] for r in rows} == {"organism (tiny) 0.1M"}  # --quick: no real model unless asked for


def test_real_model_rows_use_each_models_own_inputs(tmp_path, monkeypatch, tiny_gguf, tiny_gemma):
    """`--model`: a SentencePiece Gemma from a GGUF file (BOS, its own vocabulary) and a Gemma checkpoint with a
    chat template get their own rows, built from inputs made with their own tokenizer as the loop and evaluator
    make them; every pair computes the same numbers on both sides (scores 1e-4 relative, equal greedy texts)."""
    from kcollapse.bench import REAL_TARGETS, build_inputs, pretrained_subject
    from kcollapse.lm import encode_prompts
    from kcollapse.organism import build_world, default_cache_dir
    from kcollapse.config import OrganismConfig

    monkeypatch.setenv("KCOLLAPSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    world = build_world(OrganismConfig(), default_cache_dir())
    sp = pretrained_subject(str(tiny_gguf))
    tok = sp.tokenizer
    inputs = build_inputs(sp, world, 4, 4, 4)
    prompt_tokens = sp.recipe.prompt_tokens
    for ids in inputs.synth:  # as build_mix: the block's first tokens in Gemma's vocabulary, after its <bos>
        assert ids[0] == tok.bos_token_id == 2 and len(ids) == prompt_tokens + 1 and 2 not in ids[1:]
        assert tok.decode(ids[1:]).strip() and tok.decode(ids[1:]) in " ".join(t for t in inputs.train_texts)
    for answer, prompts, targets in inputs.scoring.values():
        assert all(ids[0] == 2 and ids.count(2) == 1 for ids in encode_prompts(tok, prompts))
        assert len(prompts) == len(targets) == 4
    chat = build_inputs(pretrained_subject(str(tiny_gemma)), world, 4, 4, 4)
    assert all(p.startswith("<bos><start_of_turn>user\n") and p.endswith("<start_of_turn>model\n")
               for p in chat.free_prompts + chat.synth)  # its chat template, for questions and synthesis alike

    out = tmp_path / "bench.json"
    returned = bench_command(True, out, models=[str(tiny_gguf), str(tiny_gemma)], _tiny=True)
    assert not [r for r in returned if "MISMATCH" in r["check"]], [r["check"] for r in returned]
    rows = json.loads(out.read_text())
    for spec in (tiny_gguf, tiny_gemma):
        mine = [r for r in rows if r["model"].startswith(str(spec))]
        assert {r["name"] for r in mine} == {"scoring", "free_text", "synthesis", "training"}
        # training: the recipe's step and the paper's (512-token chunks clamped to the model's context, batch 1 x
        # grad_accum 4), the paper's also with bf16 autocast; the utilisation target is held to that one, whose
        # agreement with float32 is printed next to it
        assert {(r["train_config"], r["unit"]) for r in mine if r["name"] == "training"} == {
            (c, u) for c in ("recipe", "paper", "paper-bf16") for u in ("tokens/s", "% of fp32 matmul peak")}
        assert all(r["precision"] == ("float32 + bf16 autocast" if r["train_config"] == "paper-bf16" else "float32")
                   for r in mine)
        agreement = [r["check"] for r in returned if r["model"].startswith(str(spec)) and r["train_config"] == "paper-bf16"]
        assert agreement and all(float(re.search(r"vs float32: loss \S+ rel\., gradient cosine ([\d.]+)", c)[1]) >= 0.99
                                 for c in agreement), agreement
        assert all(r["train_config"] is None for r in mine if r["name"] != "training")
        paper_step = [r for r in returned if r["model"].startswith(str(spec)) and r["train_config"] == "paper"][0]
        assert "1 x 256 tokens x grad_accum 4" in paper_step["check"]  # the tiny models' context is 256
        for r in mine:
            if r["unit"].startswith("%"):
                assert r["target"] == (60.0 if r["train_config"] == "paper-bf16" else None)
            elif r["baseline"] == "reference" and r["name"] != "training":
                kind = {"multiple_choice": "letter", "multiple_choice_few_shot": "letter", "no_instruction": "letter",
                        "short_answer": "text", None: None}[r["format"]]
                assert r["target"] == REAL_TARGETS[r["name"], "reference", kind]


@pytest.mark.parametrize("spec", ["missing-dir/", "empty.gguf"])
def test_a_bad_model_spec_is_one_clean_line(tmp_path, monkeypatch, spec):
    from test_bad_input import assert_one_clean_line, run_cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KCOLLAPSE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "empty.gguf").write_bytes(b"")
    line = assert_one_clean_line(run_cli(["bench", "--quick", "--model", spec]), None, "model: ")
    assert spec.rstrip("/") in line


@pytest.mark.parametrize("which", ["tiny_gpt2", "tiny_gemma"])
def test_decode_equals_hf_generate_greedy(request, which):
    """Our decoding loop (finished rows leave the batch) writes what `model.generate` writes, greedy."""
    import torch

    from kcollapse.lm import LM

    model, tokenizer = load_model(request.getfixturevalue(which), device="cpu")
    prompts = [q["question"] for q in items()]
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    stop = [tokenizer.eos_token_id, *tokenizer(" the", add_special_tokens=False)["input_ids"][:1]]  # rows end early
    for penalty in (1.0, 1.3):
        ids, mask = (enc["input_ids"], enc["attention_mask"]) if penalty == 1.0 else (enc["input_ids"][-1:], enc["attention_mask"][-1:])
        with torch.inference_mode():
            ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=stop,
                                 pad_token_id=tokenizer.pad_token_id, repetition_penalty=penalty)[:, ids.shape[1]:]
            ours = LM(model, tokenizer).decode_batch(ids, mask, 12, stop, do_sample=False, temperature=1.0, top_p=1.0,
                                                     top_k=0, repetition_penalty=penalty)
        for r, row in zip(ref.tolist(), ours):
            assert [t for t in r if t != tokenizer.pad_token_id] == row  # HF pads a row after its stop token


@pytest.mark.parametrize("which", ["tiny_gpt2", "tiny_gemma"])
def test_shared_prefix_batches_write_what_one_by_one_generate_writes(request, which):
    """Prompts opening alike share their prefix through the KV cache; the texts are `model.generate`'s, one by one."""
    import torch

    from kcollapse.lm import batches, common_prefix, encode, generate

    model, tokenizer = load_model(request.getfixturevalue(which), device="cpu")
    qs = items()
    long = [render(get_format("multiple_choice"), q) for q in qs]  # past Gemma's sliding window: no sharing there
    short = ["Say it: " + q["question"][:12] for q in qs]  # inside the window: shared on both models
    for prompts in (long, short):
        ids = [encode(tokenizer, p) for p in prompts]
        assert all(common_prefix([ids[i] for i in b]) >= 4 for b in batches(ids, 4) if len(b) > 1)
        for penalty in (1.0, 1.3):
            ours = generate(model, tokenizer, prompts, 8, batch_size=4, repetition_penalty=penalty)
            for prompt_ids, text in zip(ids, ours):
                x = torch.tensor([prompt_ids])
                with torch.inference_mode():
                    ref = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False,
                                         min_new_tokens=1, repetition_penalty=penalty,  # as ours: never an empty text
                                         pad_token_id=tokenizer.pad_token_id)[0, x.shape[1]:]
                assert tokenizer.decode(ref, skip_special_tokens=True) == text
    assert max(len(encode(tokenizer, p)) for p in short) + 8 <= 64


def test_sampling_is_seeded_and_top_k_1_is_greedy(gpt2):
    from kcollapse.lm import generate

    model, tokenizer = gpt2
    prompts = [q["question"] for q in items()]
    a = generate(model, tokenizer, prompts, 10, do_sample=True, top_p=0.9, temperature=0.8, batch_size=3, seed=4)
    assert a == generate(model, tokenizer, prompts, 10, do_sample=True, top_p=0.9, temperature=0.8, batch_size=3, seed=4)
    assert generate(model, tokenizer, prompts, 10, do_sample=True, top_k=1, batch_size=3) == \
        generate(model, tokenizer, prompts, 10, do_sample=False, batch_size=3)
