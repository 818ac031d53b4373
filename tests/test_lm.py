"""The model API (kcollapse.lm.LM): its three requests equal plain full-logit forwards, and it projects hidden states
to the vocabulary only where a log-prob is read (what keeps a 262k-vocabulary model within memory)."""

from __future__ import annotations

import pytest
import torch

from conftest import corpus_lines
from kcollapse.lm import LM, encode, encode_continuations
from kcollapse.models import load_model


@pytest.fixture(scope="module", params=["tiny_gpt2", "tiny_gemma"])
def lm(request):
    model, tokenizer = load_model(request.getfixturevalue(request.param), device="cpu")
    return LM(model, tokenizer, batch_size=3)


def full_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)


def test_loglikelihood_equals_a_full_forward(lm):
    lines = corpus_lines()
    requests = [(lines[i][:40 + 9 * i], " " + " ".join(lines[i + 5].split()[: 1 + i % 4])) for i in range(7)]
    got = lm.loglikelihood(requests)
    for (context, continuation), (logprob, greedy) in zip(requests, got):
        ctx, cont = encode(lm.tokenizer, context), encode_continuations(lm.tokenizer, [continuation])[0]
        rows = full_logprobs(lm.model, ctx + cont)[len(ctx) - 1 : -1]
        assert logprob == pytest.approx(sum(rows[t, tok].item() for t, tok in enumerate(cont)), abs=1e-5, rel=1e-5)
        assert greedy == all(rows[t].argmax().item() == tok for t, tok in enumerate(cont))


def test_loglikelihood_rolling_scores_every_token_after_the_first_once(lm):
    texts = corpus_lines()[:4] + ["", "word"]
    got = lm.loglikelihood_rolling(texts, stride=7)
    for text, (logprob, n) in zip(texts[:4], got):
        ids = encode(lm.tokenizer, text)
        assert len(ids) < 256 and n == len(ids) - 1  # within one window: the plain forward is the reference
        rows = full_logprobs(lm.model, ids)
        assert logprob == pytest.approx(sum(rows[t, tok].item() for t, tok in enumerate(ids[1:])), rel=1e-5)
    assert got[4] == (0.0, 0)


def projected_rows(lm, fn) -> list[int]:
    rows = []
    head = lm.model.get_output_embeddings()
    hook = head.register_forward_hook(lambda m, inp, out: rows.append(inp[0].reshape(-1, inp[0].shape[-1]).shape[0]))
    try:
        fn()
    finally:
        hook.remove()
    return rows


def test_logits_only_where_they_are_read(lm):
    texts = corpus_lines()[:5]
    scored = sum(n for _, n in lm.loglikelihood_rolling(texts))
    assert sum(projected_rows(lm, lambda: lm.loglikelihood_rolling(texts))) == scored

    prompts = [t[:30] for t in texts]
    ids = [encode(lm.tokenizer, p) for p in prompts]
    lm_small = LM(lm.model, lm.tokenizer, batch_size=len(prompts))
    longest = max(map(len, ids))
    mask = torch.tensor([[0] * (longest - len(x)) + [1] * len(x) for x in ids])
    batch = torch.tensor([[0] * (longest - len(x)) + x for x in ids])
    steps = projected_rows(lm_small, lambda: lm_small.decode_batch(batch, mask, 6, [], do_sample=False))
    assert steps == [len(prompts)] * 6  # prefill and every step: one row per sequence, its last position
