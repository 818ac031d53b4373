"""Batched text generation: the model writing its own training data, and its free-text answers.

Prompts are sorted by length and batched (left padding, KV cache), so a batch wastes little on padding and each
row stops at its own end-of-sequence (or, with `stop_at_newline`, at its first line break). Sampling is seeded per
batch, so the same prompts, config and seed give the same texts on the same machine.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from kcollapse.io import scrub_surrogates, test_pause


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt; special tokens are added unless the text already carries them (chat templates do)."""
    bos = tokenizer.bos_token
    add_special = not (bos and text.startswith(bos))
    return tokenizer(text, add_special_tokens=add_special)["input_ids"]


@lru_cache(maxsize=4)
def _newline_ids(tokenizer) -> tuple[int, ...]:
    pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return tuple(i for i, piece in enumerate(pieces) if "\n" in piece)


def generate(model, tokenizer, prompts: list[str] | list[list[int]], max_new_tokens: int, *, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
             batch_size: int = 32, seed: int = 0, stop_at_newline: bool = False, progress=None) -> list[str]:
    """Continuations (decoded, without the prompt) for each prompt, in the prompts' order."""
    ids = [encode(tokenizer, p) if isinstance(p, str) else list(p) for p in prompts]
    max_positions = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if max_positions:  # keep the end of over-long prompts (the model continues from there) and fit the window
        max_new_tokens = min(max_new_tokens, max_positions - 1)
        keep = max_positions - max_new_tokens
        ids = [x[-keep:] if len(x) > keep else x for x in ids]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if stop_at_newline:
        stop_ids += list(_newline_ids(tokenizer))
    outputs: list[str] = [""] * len(ids)
    task = progress.add_task("generate", total=len(ids)) if progress is not None else None
    device = next(model.parameters()).device
    for b, start in enumerate(range(0, len(order), batch_size)):
        rows = order[start : start + batch_size]
        width = max(len(ids[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            input_ids[r, width - len(ids[i]) :] = torch.tensor(ids[i])
            attention[r, width - len(ids[i]) :] = 1
        sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k) if do_sample else {}
        torch.manual_seed(seed * 1_000_003 + b)
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention.to(device), max_new_tokens=max_new_tokens,
                min_new_tokens=1 if not stop_at_newline else None, do_sample=do_sample,
                repetition_penalty=repetition_penalty, eos_token_id=stop_ids or None, pad_token_id=pad, **sampling,
            )
        for r, i in enumerate(rows):
            text = tokenizer.decode(out[r, width:], skip_special_tokens=True)
            outputs[i] = scrub_surrogates(text.split("\n", 1)[0] if stop_at_newline else text)
        if task is not None:
            progress.advance(task, len(rows))
        test_pause("sample" if do_sample else "greedy")  # no-op outside the kill tests
    if task is not None:
        progress.remove_task(task)
    return outputs
