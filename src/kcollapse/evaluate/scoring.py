"""Scoring multiple-choice options by likelihood: one batched engine, two definitions of an option's score.

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

The engine: questions are sorted by prompt length and batched (left padding, explicit position ids). One forward
of a batch of prompts gives every option's first token (letters are one token each, so that is all a letter
format needs); text formats then run the remaining continuation tokens of all options of the batch in one more
forward on the prompts' KV cache, repeated per option. The vocabulary projection (most of the cost of a small
model) is computed only at scored positions. `score_naive` is the plain one-forward-per-option baseline.
"""

from __future__ import annotations

import inspect
import math

import torch

from kcollapse.generate import common_prefix, encode, encode_prompts

LETTER, TEXT = "letter", "text"
encode_prompt = encode  # one prompt's ids, as the batch call gives them


def encode_continuations(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []


def encode_continuation(tokenizer, text: str) -> list[int]:
    return encode_continuations(tokenizer, [text])[0]


def continuation_text(target: str, scoring: str) -> str:
    return target if scoring == "reference" else " " + target


def max_positions(model) -> int | None:
    cfg = model.config
    return getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)


def fit(prompt_ids: list[int], room: int, bos_id: int | None) -> list[int]:
    """The last `room` prompt tokens (BOS kept in front when the prompt started with it)."""
    if len(prompt_ids) <= room:
        return prompt_ids
    if bos_id is not None and prompt_ids[0] == bos_id:
        return [bos_id] + prompt_ids[len(prompt_ids) - room + 1 :]
    return prompt_ids[len(prompt_ids) - room :]


def plan_batches(prompts: list[list[int]], batch_size: int, window: int | None = None) -> list[tuple[list[int], int]]:
    """Batches of prompt indices and the prefix length they share, from the cheaper of two orders.

    By length (least padding), or same-template prompts side by side (a long shared prefix, e.g. one subject's
    few-shot examples, is computed once per batch). A shared prefix is only used when at least 8 tokens long and,
    for sliding-window models, when the batch fits the window (padding after the prefix would shift the window).
    """
    def batches(order):
        out = []
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            shared = common_prefix([prompts[i] for i in rows], minimum=8)
            if window and max(len(prompts[i]) for i in rows) > window:
                shared = 0
            out.append((rows, shared))
        return out

    def cost(plan):
        return sum(shared + len(rows) * (max(len(prompts[i]) for i in rows) - shared) for rows, shared in plan)

    by_length = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    by_template = sorted(range(len(prompts)), key=lambda i: (prompts[i][:16], len(prompts[i])))
    return min(batches(by_length), batches(by_template), key=cost)


def _forward(model, *, keep: torch.Tensor, **kwargs):
    """Model forward that projects to the vocabulary only where `keep` (bool [B, T]) is set -> (logits [N, V], cache)."""
    params = inspect.signature(model.forward).parameters
    if "cache" in kwargs and "cache" not in params:  # models that still call it past_key_values
        kwargs["past_key_values"] = kwargs.pop("cache")
    if "logits_to_keep" in params:
        out = model(logits_to_keep=keep, **kwargs)
        logits = out.logits
    else:  # older or custom models: full logits, then select
        out = model(**kwargs)
        logits = out.logits[keep]
    cache = None
    if kwargs.get("use_cache"):
        cache = out["cache"] if "cache" in out else out.get("past_key_values")
    return logits.float().log_softmax(-1), cache


def token_logprobs(model, prompts: list[list[int]], continuations: list[list[list[int]]], *, batch_size: int = 32,
                   progress=None, task=None) -> list[list[tuple[list[float], list[bool]]]]:
    """For each prompt and each of its continuations: (log-prob of each continuation token, is it the argmax)."""
    device = next(model.parameters()).device
    pad = 0
    results: list = [None] * len(prompts)
    for rows, shared in plan_batches(prompts, batch_size, getattr(model.config, "sliding_window", None)):
        cache = None
        if shared:
            with torch.inference_mode():
                _, cache = _forward(model, input_ids=torch.tensor([prompts[rows[0]][:shared]], device=device),
                                    use_cache=True, keep=torch.zeros((1, shared), dtype=torch.bool, device=device))
            cache.batch_repeat_interleave(len(rows))
        width = max(len(prompts[i]) for i in rows) - shared
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), shared + width), dtype=torch.long)
        mask[:, :shared] = 1
        for r, i in enumerate(rows):
            suffix = prompts[i][shared:]
            ids[r, width - len(suffix) :] = torch.tensor(suffix)
            mask[r, shared + width - len(suffix) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
        keep = torch.zeros_like(ids, dtype=torch.bool)
        keep[:, -1] = True
        tails = [(r, j, c) for r, i in enumerate(rows) for j, c in enumerate(continuations[i]) if len(c) > 1]
        with torch.inference_mode():
            first, cache = _forward(model, input_ids=ids.to(device), attention_mask=mask.to(device), cache=cache,
                                    position_ids=positions.to(device), use_cache=bool(tails) or shared > 0, keep=keep.to(device))
            best_first = first.argmax(-1).tolist()
            out = {}
            for r, i in enumerate(rows):
                for j, c in enumerate(continuations[i]):
                    out[(r, j)] = ([first[r, c[0]].item()], [c[0] == best_first[r]]) if c else ([], [])
            if tails:  # the rest of each multi-token continuation, all options at once on the repeated prefix cache
                cache.batch_select_indices(torch.tensor([r for r, _, _ in tails], device=device))
                cont_width = max(len(c) - 1 for _, _, c in tails)
                cids = torch.full((len(tails), cont_width), pad, dtype=torch.long)
                cmask = torch.zeros((len(tails), cont_width), dtype=torch.long)
                for t, (_, _, c) in enumerate(tails):
                    cids[t, : len(c) - 1] = torch.tensor(c[:-1])
                    cmask[t, : len(c) - 1] = 1
                prefix_mask = mask[[r for r, _, _ in tails]]
                lengths = prefix_mask.sum(-1, keepdim=True)
                cpos = lengths + torch.arange(cont_width)[None, :]
                if max_positions(model):  # padding after a short continuation may run past the context: clamp it
                    cpos = cpos.clamp(max=max_positions(model) - 1)
                logp, _ = _forward(model, input_ids=cids.to(device), attention_mask=torch.cat([prefix_mask, cmask], 1).to(device),
                                   position_ids=cpos.to(device), cache=cache, use_cache=True, keep=cmask.bool().to(device))
                targets = torch.tensor([tok for _, _, c in tails for tok in c[1:]], device=device)
                picked = logp.gather(1, targets[:, None])[:, 0].tolist()
                greedy = (logp.argmax(-1) == targets).tolist()
                n = 0
                for r, j, c in tails:
                    lp, g = out[(r, j)]
                    out[(r, j)] = (lp + picked[n : n + len(c) - 1], g + greedy[n : n + len(c) - 1])
                    n += len(c) - 1
        for r, i in enumerate(rows):
            results[i] = [out[(r, j)] for j in range(len(continuations[i]))]
        if progress is not None and task is not None:
            progress.advance(task, len(rows))
    return results


def _encode_options(tokenizer, model, prompts: list[str], targets: list[list[str]], scoring: str, answer: str):
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
    prompt_ids, conts = _encode_options(tokenizer, model, prompts, targets, scoring, answer)
    task = progress.add_task(f"score ({answer})", total=len(prompts)) if progress is not None else None
    per_token = token_logprobs(model, prompt_ids, conts, batch_size=batch_size, progress=progress, task=task)
    if task is not None:
        progress.remove_task(task)
    return [combine(lp, ts, scoring, answer) for lp, ts in zip(per_token, targets)]


def score_naive(model, tokenizer, prompt: str, targets: list[str], *, scoring: str = "reference",
                answer: str = LETTER) -> dict:
    """The plain way, as the reference code does it: one unpadded forward with full logits per option."""
    (prompt_ids,), (conts,) = _encode_options(tokenizer, model, [prompt], [targets], scoring, answer)
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
