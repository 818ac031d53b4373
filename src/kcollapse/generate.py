"""Batched text generation: the model writing its own training data, and its free-text answers.

Prompts are sorted by length and batched (left padding, KV cache), so a batch wastes little on padding and each
row stops at its own end-of-sequence (or, with `stop_at_newline`, at its first line break). Sampling is seeded per
batch, so the same prompts, config and seed give the same texts on the same machine.

The decoding loop is our own rather than `model.generate`: a finished row leaves the batch (and the KV cache) at
once instead of being carried, padded, until the batch's longest row ends, and a step costs one forward plus a few
tensor ops. With a trained organism, whose rows end at different lengths, this made free-text answers and
synthesis about 2x faster than `model.generate` on the same batches (`kcollapse bench`). Prompts that open alike
(an instruction format's header, its few-shot block) are batched together and their common opening is run once
and shared through the KV cache: a free-text answer is short, so the prompt is most of its cost. The token choice is HF's:
repetition penalty, then temperature, top-k and top-p, sampled with `torch.multinomial`; greedy is the argmax.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch

from kcollapse.io import scrub_surrogates, test_pause


def encode_prompts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each prompt, one batched tokenizer call per kind (a call per text cost ~20% of scoring):
    special tokens are added unless the text already carries them (chat templates do); an empty prompt gets BOS,
    one position to predict from."""
    bos = tokenizer.bos_token
    has_bos = [bool(bos) and t.startswith(bos) for t in texts]
    out: list = [None] * len(texts)
    for flag in (False, True):
        rows = [i for i, f in enumerate(has_bos) if f == flag]
        if rows:
            for i, ids in zip(rows, tokenizer([texts[i] for i in rows], add_special_tokens=not flag)["input_ids"]):
                out[i] = ids
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return [ids or [start] for ids in out]


def encode(tokenizer, text: str) -> list[int]:
    return encode_prompts(tokenizer, [text])[0]


@lru_cache(maxsize=4)
def _newline_ids(tokenizer) -> tuple[int, ...]:
    pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return tuple(i for i, piece in enumerate(pieces) if "\n" in piece)


def generate(model, tokenizer, prompts: list[str] | list[list[int]], max_new_tokens: int, *, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
             batch_size: int = 32, seed: int = 0, stop_at_newline: bool = False, progress=None) -> list[str]:
    """Continuations (decoded, without the prompt) for each prompt, in the prompts' order."""
    texts = iter(encode_prompts(tokenizer, [p for p in prompts if isinstance(p, str)]))
    ids = [next(texts) if isinstance(p, str) else list(p) for p in prompts]
    max_positions = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if max_positions:  # keep the end of over-long prompts (the model continues from there) and fit the window
        max_new_tokens = min(max_new_tokens, max_positions - 1)
        keep = max_positions - max_new_tokens
        ids = [x[-keep:] if len(x) > keep else x for x in ids]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if stop_at_newline:
        stop_ids += list(_newline_ids(tokenizer))
    outputs: list[str] = [""] * len(ids)
    task = progress.add_task("generate", total=len(ids)) if progress is not None else None
    device = next(model.parameters()).device
    window = getattr(model.config.get_text_config(), "sliding_window", None)
    for b, rows in enumerate(batches(ids, batch_size)):
        longest = max(len(ids[i]) for i in rows)
        shared = common_prefix([ids[i] for i in rows])
        if window and longest + max_new_tokens > window:
            shared = 0  # a sliding window counts cache slots, and padding after a shared prefix would shift it
        width = longest - shared
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            input_ids[r, width - len(ids[i]) + shared :] = torch.tensor(ids[i][shared:])
            attention[r, width - len(ids[i]) + shared :] = 1
        prefix = torch.tensor([ids[rows[0]][:shared]], device=device) if shared else None
        torch.manual_seed(seed * 1_000_003 + b)
        with torch.inference_mode():
            new = decode(model, input_ids.to(device), attention.to(device), max_new_tokens, stop_ids, prefix=prefix,
                         min_new_tokens=0 if stop_at_newline else 1, do_sample=do_sample, temperature=temperature,
                         top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty)
        for r, i in enumerate(rows):
            text = tokenizer.decode(new[r], skip_special_tokens=True)
            outputs[i] = scrub_surrogates(text.split("\n", 1)[0] if stop_at_newline else text)
        if task is not None:
            progress.advance(task, len(rows))
        test_pause("sample" if do_sample else "greedy")  # no-op outside the kill tests
    if task is not None:
        progress.remove_task(task)
    return outputs


OPENING_TOKENS = 8  # prompts sharing this many first tokens are batched together
MIN_SHARED = 4  # a shorter common prefix is not worth a separate forward


def batches(ids: list[list[int]], batch_size: int) -> list[list[int]]:
    """Prompt indices in batches: prompts with the same opening together (so the batch shares a prefix), each
    group sorted by length (little padding); openings too rare to fill part of a batch are pooled by length."""
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(ids):
        groups.setdefault(tuple(x[:OPENING_TOKENS]), []).append(i)
    pooled = [i for g in groups.values() if len(g) < min(batch_size, 8) for i in g]
    out = []
    for group in [g for g in groups.values() if len(g) >= min(batch_size, 8)] + [pooled]:
        group = sorted(group, key=lambda i: len(ids[i]))
        out += [group[k : k + batch_size] for k in range(0, len(group), batch_size)]
    return [b for b in out if b]


def common_prefix(rows: list[list[int]], minimum: int = MIN_SHARED) -> int:
    """Length of the token prefix all rows share (each row keeps at least one token of its own); 0 when shorter
    than `minimum` or for a single row (nothing to share)."""
    n = min(len(r) for r in rows) - 1
    for k in range(max(n, 0)):
        first = rows[0][k]
        if any(r[k] != first for r in rows):
            n = k
            break
    return n if n >= minimum and len(rows) > 1 else 0


def choose(scores: torch.Tensor, seen: torch.Tensor | None, *, do_sample: bool, temperature: float, top_p: float,
           top_k: int, repetition_penalty: float) -> torch.Tensor:
    """Next token per row from last-position logits [B, V] (as HF's processors and warpers, in HF's order)."""
    if repetition_penalty != 1.0 and seen is not None:
        s = scores.gather(1, seen)
        scores = scores.scatter(1, seen, torch.where(s < 0, s * repetition_penalty, s / repetition_penalty))
    if not do_sample:
        return scores.argmax(-1)
    if temperature != 1.0:
        scores = scores / temperature
    if top_k:
        kth = scores.topk(min(top_k, scores.shape[-1])).values[:, -1:]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if top_p < 1.0:
        ordered, index = scores.sort(-1)
        drop = ordered.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[:, -1] = False
        scores = scores.masked_fill(drop.scatter(1, index, drop), -float("inf"))
    return torch.multinomial(scores.softmax(-1), 1)[:, 0]


def decode(model, input_ids: torch.Tensor, attention: torch.Tensor, max_new_tokens: int, stop_ids: list[int], *,
           min_new_tokens: int = 0, prefix: torch.Tensor | None = None, **how) -> list[list[int]]:
    """New token ids per row of a left-padded batch (each row's stop token included, as `generate` keeps it).

    One prefill forward, then one single-token forward per step on the KV cache; rows that stopped are dropped
    from the batch and the cache, so the remaining steps cost only what is still being written. `prefix` [1, P]:
    tokens every row starts with (before its padding), run once and copied into each row's cache."""
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    trim = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def step(ids, mask, positions, cache):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{cache_kw: cache}, **trim)
        next_cache = out["cache"] if "cache" in out else out.get("past_key_values")
        return out.logits[:, -1].float(), next_cache

    device = input_ids.device
    stops = torch.tensor(stop_ids, dtype=torch.long, device=device) if stop_ids else None
    penalise = how.get("repetition_penalty", 1.0) != 1.0
    seen = torch.where(attention.bool(), input_ids, input_ids[:, -1:]) if penalise else None  # pads: a real token
    cache, start = None, 0
    if prefix is not None:
        start = prefix.shape[1]
        _, cache = step(prefix, torch.ones_like(prefix), torch.arange(start, device=device)[None], None)
        cache.batch_repeat_interleave(input_ids.shape[0])
        attention = torch.cat([attention.new_ones((input_ids.shape[0], start)), attention], 1)
        seen = torch.cat([prefix.expand(input_ids.shape[0], -1), seen], 1) if penalise else None
    positions = (attention.cumsum(-1) - 1).clamp(min=0)[:, start:]
    scores, cache = step(input_ids, attention, positions, cache)
    rows = list(range(input_ids.shape[0]))
    new: list[list[int]] = [[] for _ in rows]
    for k in range(max_new_tokens):
        if stops is not None and k < min_new_tokens:
            scores[:, stops] = -float("inf")
        token = choose(scores, seen, **how)
        for r, t in zip(rows, token.tolist()):
            new[r].append(t)
        if k == max_new_tokens - 1:
            break
        if stops is not None:
            going = ~torch.isin(token, stops)
            if not going.all():
                if not going.any():
                    break
                keep = going.nonzero()[:, 0]
                cache.batch_select_indices(keep)
                rows = [rows[i] for i in keep.tolist()]
                attention, token = attention[keep], token[keep]
                seen = seen[keep] if seen is not None else None
        attention = torch.cat([attention, attention.new_ones((len(rows), 1))], 1)
        if seen is not None:
            seen = torch.cat([seen, token[:, None]], 1)
        scores, cache = step(token[:, None], attention, attention.sum(-1, keepdim=True) - 1, cache)
    return new
