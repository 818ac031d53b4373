"""kcollapse bench: its baselines compute the same numbers as the batched engine; its JSON rows keep the contract.
Speed itself is not tested (shared machines are noisy)."""

from __future__ import annotations

import json

import pytest

from kcollapse.bench import bench_command, lmeval_scores, one_by_one_answers, reference_scores
from kcollapse.evaluate.formats import get_format, option_targets, render
from kcollapse.evaluate.freetext import generate_answers
from kcollapse.evaluate.scoring import score_options
from kcollapse.models import load_model
from test_eval_scoring import items

ROW_KEYS = {"name", "baseline", "format", "model", "ours", "theirs", "ratio", "unit", "threads"}


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
    assert {r["baseline"] for r in rows if r["name"] == "scoring"} == {"reference", "lm-eval"}


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
