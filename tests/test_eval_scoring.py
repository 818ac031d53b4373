"""The batched scoring engine equals the naive one-forward-per-option computation, for both definitions."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import corpus_lines
from kcollapse.evaluate.formats import get_format, option_targets, render
from kcollapse.evaluate.scoring import score_naive, score_options
from kcollapse.lm import encode as encode_prompt, encode_continuations, plan_batches
from kcollapse.models import chat_prompt, load_model


def encode_continuation(tokenizer, text: str) -> list[int]:
    return encode_continuations(tokenizer, [text])[0]


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2):
    return load_model(tiny_gpt2, device="cpu")


@pytest.fixture(scope="module")
def gemma(tiny_gemma):
    return load_model(tiny_gemma, device="cpu")


def items(n=7):
    lines = corpus_lines()
    out = []
    for i in range(n):
        words = lines[(i + 3) % len(lines)].split()
        choices = [" ".join(words[k : k + 1 + (i + k) % 3]) for k in range(0, 4 + i % 2)]
        out.append({"id": str(i), "subject": ["geography", "global_facts"][i % 2], "question": lines[i][: 30 + 25 * i],
                    "choices": choices, "answer": i % len(choices), "statement": lines[i][:40]})
    return out


def prompts_for(tokenizer, fmt, qs, chat):
    return [chat_prompt(tokenizer, render(fmt, q, qs[:2]), use_template=chat) for q in qs]


@pytest.mark.parametrize("which", ["gpt2", "gemma"])
@pytest.mark.parametrize("scoring", ["reference", "loglik"])
@pytest.mark.parametrize("fmt_name", ["multiple_choice", "multiple_choice_few_shot", "short_answer", "cloze"])
def test_batched_equals_naive(request, which, scoring, fmt_name):
    model, tokenizer = request.getfixturevalue(which)
    fmt, qs = get_format(fmt_name), items()
    prompts = prompts_for(tokenizer, fmt, qs, chat=which == "gemma")
    targets = [option_targets(fmt, q) for q in qs]
    batched = score_options(model, tokenizer, prompts, targets, scoring=scoring, answer=fmt.answer, batch_size=3)
    for prompt, target, got in zip(prompts, targets, batched):
        want = score_naive(model, tokenizer, prompt, target, scoring=scoring, answer=fmt.answer)
        assert got["scores"] == pytest.approx(want["scores"], abs=1e-5, rel=1e-5)
        assert got["is_greedy"] == want["is_greedy"]
        assert got["predicted_index"] == want["predicted_index"]
        assert got["confidence"] == pytest.approx(want["confidence"], abs=1e-5)
        if scoring == "loglik":
            assert got["scores_norm"] == pytest.approx(want["scores_norm"], abs=1e-5)


def full_logprobs(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)


def test_naive_follows_the_definitions(gpt2):
    model, tokenizer = gpt2
    prompt = "The Nile is a major river in\nAnswer:"
    p = encode_prompt(tokenizer, prompt)
    letters = score_naive(model, tokenizer, prompt, ["A", "B", "C"], scoring="reference", answer="letter")
    last = full_logprobs(model, p)[-1]
    for k, letter in enumerate("ABC"):
        assert letters["scores"][k] == pytest.approx(last.softmax(-1)[encode_continuation(tokenizer, letter)[0]].item(), rel=1e-5)
    assert letters["confidence"] == pytest.approx(max(letters["scores"]) / sum(letters["scores"]))

    choices = ["Africa", "the Himalayas"]
    text = score_naive(model, tokenizer, prompt, choices, scoring="reference", answer="text")
    ll = score_naive(model, tokenizer, prompt, choices, scoring="loglik", answer="text")
    for k, choice in enumerate(choices):
        for cont, check in ((choice, "reference"), (" " + choice, "loglik")):
            c = encode_continuation(tokenizer, cont)
            logp = full_logprobs(model, p + c)
            token_lp = [logp[len(p) - 1 + t, tok].item() for t, tok in enumerate(c)]
            greedy = all(logp[len(p) - 1 + t].argmax().item() == tok for t, tok in enumerate(c))
            if check == "reference":
                assert text["scores"][k] == pytest.approx(math.exp(sum(token_lp) / len(token_lp)), rel=1e-5)
                assert text["is_greedy"][k] == greedy
            else:
                assert ll["scores"][k] == pytest.approx(sum(token_lp), rel=1e-5)
                assert ll["scores_norm"][k] == pytest.approx(sum(token_lp) / len(cont.encode()), rel=1e-5)
    probs = torch.tensor(ll["scores"]).softmax(-1)
    assert ll["confidence"] == pytest.approx(probs.max().item(), rel=1e-5)


def test_letter_formats_project_only_the_last_position(gpt2):
    model, tokenizer = gpt2
    fmt, qs = get_format("multiple_choice"), items(6)
    prompts = prompts_for(tokenizer, fmt, qs, chat=False)
    rows = []
    hook = model.lm_head.register_forward_hook(lambda m, inp, out: rows.append(inp[0].reshape(-1, inp[0].shape[-1]).shape[0]))
    try:
        score_options(model, tokenizer, prompts, [option_targets(fmt, q) for q in qs], batch_size=32)
    finally:
        hook.remove()
    assert sum(rows) == len(qs)  # one vocabulary projection per question, whatever the prompt length

    rows.clear()
    fmt = get_format("short_answer")
    targets = [option_targets(fmt, q) for q in qs]
    hook = model.lm_head.register_forward_hook(lambda m, inp, out: rows.append(inp[0].reshape(-1, inp[0].shape[-1]).shape[0]))
    try:
        score_options(model, tokenizer, prompts_for(tokenizer, fmt, qs, chat=False), targets, answer="text", batch_size=32)
    finally:
        hook.remove()
    n_tokens = sum(len(encode_continuation(tokenizer, t)) - 1 for ts in targets for t in ts)
    assert sum(rows) == len(qs) + n_tokens  # the prompt's last position + each continuation token after the first


def test_overlong_prompts_are_cut_from_the_left(gpt2):
    model, tokenizer = gpt2
    long_prompt = " ".join(corpus_lines()) + "\nAnswer:"  # far beyond the model's 256 positions
    assert len(encode_prompt(tokenizer, long_prompt)) > 256
    for answer, targets in (("letter", ["A", "B"]), ("text", ["the Nile river", "Everest"])):
        got = score_options(model, tokenizer, [long_prompt, "Short?"], [targets, targets], answer=answer)[0]
        want = score_naive(model, tokenizer, long_prompt, targets, answer=answer)
        assert got["scores"] == pytest.approx(want["scores"], rel=1e-5)



def test_batches_share_a_common_prefix_and_respect_sliding_windows():
    header = list(range(100, 130))
    prompts = [header + [n] * n for n in (5, 3, 9, 1)] + [[7] * 4, [7] * 6]
    plan = plan_batches(prompts, 4)
    assert sorted(i for rows, _ in plan for i in rows) == list(range(6))
    assert any(shared == 30 for _, shared in plan)
    assert all(shared == 0 for _, shared in plan_batches(prompts, 4, window=16))


def test_shared_prefix_path_equals_naive(gpt2):
    model, tokenizer = gpt2
    fmt, qs = get_format("multiple_choice_few_shot"), [dict(q, subject="geography") for q in items(6)]
    prompts = prompts_for(tokenizer, fmt, qs, chat=False)  # same subject, same two examples: a long shared prefix
    assert all(shared > 50 for _, shared in plan_batches([encode_prompt(tokenizer, p) for p in prompts], 3))
    for scoring in ("reference", "loglik"):
        for answer, targets in (("letter", [option_targets(fmt, q) for q in qs]), ("text", [q["choices"] for q in qs])):
            got = score_options(model, tokenizer, prompts, targets, scoring=scoring, answer=answer, batch_size=3)
            for p, t, g in zip(prompts, targets, got):
                assert g["scores"] == pytest.approx(score_naive(model, tokenizer, p, t, scoring=scoring, answer=answer)["scores"], abs=1e-5, rel=1e-5)


@pytest.mark.parametrize("which", ["tiny_gpt2", "tiny_gemma"])
def test_batched_prompt_encoding_equals_one_tokenizer_call_per_text(request, which):
    from kcollapse.lm import encode_prompts
    from kcollapse.models import load_tokenizer

    tokenizer = load_tokenizer(str(request.getfixturevalue(which)))
    bos = tokenizer.bos_token or ""
    texts = ["Question: What is the capital of France?\nAnswer:", bos + "already templated", "", " spaced  out ", bos]
    expected = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=not (bos and t.startswith(bos)))["input_ids"]
        expected.append(ids or [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id])
    assert encode_prompts(tokenizer, texts) == expected
    assert [encode_prompt(tokenizer, t) for t in texts] == expected
