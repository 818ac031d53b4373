"""Scoring multiple-choice options by likelihood: two definitions of an option's score on one batched engine.

`reference` is the paper's code, so numbers compare: a letter format scores option k by the softmax probability
of the first token of the bare letter ("A", no leading space) right after the prompt; a text format by the
geometric mean of the probabilities of the bare choice text's tokens right after the prompt (no space).
`loglik` is lm-evaluation-harness style: the summed log-probability of " " + continuation, and that sum divided
by the continuation's UTF-8 byte length (`scores_norm`). `option_probs`: the scores as probabilities over the
options (reference: normalised by their sum; loglik: softmax), what confidence and the Brier score read. `is_greedy[k]`: every scored token of option k is the
argmax at its position.

Tokenisation: the prompt and the continuation are tokenised separately and their ids concatenated, so the scored
tokens are exactly the continuation's own tokens even where a tokenizer would merge across the boundary. Prompts
longer than the model's context lose tokens from the left (BOS kept).

The engine is `kcollapse.lm.LM.loglikelihood_tokens`: one forward of a batch of prompts gives every option's first
token (letters are one token each, so that is all a letter format needs); text formats then run the remaining
continuation tokens of all options of the batch in one more forward on the prompts' KV cache. `score_naive` is the
plain one-forward-per-option baseline (full logits, no batching), kept to check the engine against.
"""

from __future__ import annotations

import math

import torch

from kcollapse.lm import LM, encode_continuations, encode_prompts, fit, max_positions

LETTER, TEXT = "letter", "text"


def continuation_text(target: str, scoring: str) -> str:
    return target if scoring == "reference" else " " + target


def encode_options(tokenizer, model, prompts: list[str], targets: list[list[str]], scoring: str, answer: str):
    flat = iter(encode_continuations(tokenizer, [continuation_text(t, scoring) for ts in targets for t in ts]))
    conts = [[next(flat) for _ in ts] for ts in targets]
    if scoring == "reference" and answer == LETTER:
        conts = [[c[:1] for c in cs] for cs in conts]  # the paper reads the letter's first token only
    room_total = max_positions(model)
    encoded = []
    for ids, cs in zip(encode_prompts(tokenizer, prompts), conts):
        if room_total:
            ids = fit(ids, max(1, room_total - max((len(c) for c in cs), default=0)), tokenizer.bos_token_id)
        encoded.append(ids)
    return encoded, conts


def combine(option_logprobs: list[tuple[list[float], list[bool]]], targets: list[str], scoring: str, answer: str) -> dict:
    """Per-option token log-probs -> the question's scores, prediction and confidence under one definition."""
    greedy = [bool(g) and all(g) for _, g in option_logprobs]
    if scoring == "reference":
        if answer == LETTER:
            scores = [math.exp(lp[0]) if lp else 0.0 for lp, _ in option_logprobs]
        else:
            scores = [math.exp(sum(lp) / len(lp)) if lp else 0.0 for lp, _ in option_logprobs]
        total = sum(scores)
        predicted = max(range(len(scores)), key=lambda k: scores[k])
        confidence = scores[predicted] / total if total > 0 else 0.0
        probs = [v / total for v in scores] if total > 0 else [1.0 / len(scores)] * len(scores)
        return {"scores": scores, "option_probs": probs, "is_greedy": greedy, "predicted_index": predicted,
                "confidence": confidence}
    scores = [sum(lp) if lp else -math.inf for lp, _ in option_logprobs]
    norm = [s / max(1, len(continuation_text(t, scoring).encode("utf-8"))) for s, t in zip(scores, targets)]
    predicted = max(range(len(scores)), key=lambda k: scores[k])
    probs = torch.tensor(scores, dtype=torch.float64).softmax(-1)
    return {"scores": scores, "scores_norm": norm, "option_probs": probs.tolist(), "is_greedy": greedy, "predicted_index": predicted,
            "predicted_index_norm": max(range(len(norm)), key=lambda k: norm[k]),
            "confidence": float(probs[predicted]) if math.isfinite(scores[predicted]) else 0.0}


def score_options(model, tokenizer, prompts: list[str], targets: list[list[str]], *, scoring: str = "reference",
                  answer: str = LETTER, batch_size: int = 32, progress=None) -> list[dict]:
    """Batched scores for every question: {scores, is_greedy, predicted_index, confidence (, scores_norm, ...)}."""
    if scoring not in ("reference", "loglik"):
        raise ValueError(f"unknown scoring definition {scoring!r}")
    prompt_ids, conts = encode_options(tokenizer, model, prompts, targets, scoring, answer)
    task = progress.add_task(f"score ({answer})", total=len(prompts)) if progress is not None else None
    per_token = LM(model, tokenizer, batch_size).loglikelihood_tokens(prompt_ids, conts, progress=progress, task=task)
    if task is not None:
        progress.remove_task(task)
    return [combine(lp, ts, scoring, answer) for lp, ts in zip(per_token, targets)]


def score_naive(model, tokenizer, prompt: str, targets: list[str], *, scoring: str = "reference",
                answer: str = LETTER) -> dict:
    """The plain way, as the reference code does it: one unpadded forward with full logits per option."""
    (prompt_ids,), (conts,) = encode_options(tokenizer, model, [prompt], [targets], scoring, answer)
    device = next(model.parameters()).device
    option_logprobs = []
    for cont in conts:
        ids = torch.tensor([prompt_ids + cont[:-1] if cont else prompt_ids], device=device)
        with torch.inference_mode():
            logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
        rows = logp[len(prompt_ids) - 1 :]
        option_logprobs.append(([rows[t, tok].item() for t, tok in enumerate(cont)],
                                [rows[t].argmax().item() == tok for t, tok in enumerate(cont)]))
    return combine(option_logprobs, targets, scoring, answer)
