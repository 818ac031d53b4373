"""The other ways to do the same work, as `kcollapse bench` times them against kcollapse's own.

The paper's code scores one question, one option, one full-vocabulary forward at a time and samples with
`model.generate` on batches of 4; lm-evaluation-harness pads every (context, continuation) pair into batches; a
plain AdamW loop trains without the Trainer. Each returns the same numbers as the engine it is compared with (the
bench checks it), so the pair measures only how the work is done.
"""

from __future__ import annotations

import time

import torch

from kcollapse.evaluate.freetext import first_line
from kcollapse.evaluate.scoring import LETTER, combine, encode_options
from kcollapse.lm import encode, encode_prompts, max_positions, newline_ids, through_first_line

LMEVAL_LOGITS = 1 << 28  # the lm-eval baseline's batch holds at most this many floats of logits (1 GiB)


def reference_scores(model, tokenizer, prompts, targets, answer):
    """The paper's way: per question, per option, unbatched full-logit forwards; a letter option pays two (the
    prompt, for the letter's probability, and prompt + letter, for its greedy check), a text option one."""
    out = []
    for prompt, ts in zip(prompts, targets):
        (p,), (conts,) = encode_options(tokenizer, model, [prompt], [ts], "reference", answer)
        per_option = []
        for c in conts:
            with torch.inference_mode():
                if answer == LETTER:
                    first = model(input_ids=torch.tensor([p])).logits[0, -1].float().log_softmax(-1)
                    again = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1]
                    per_option.append(([first[c[0]].item()], [again.argmax().item() == c[0]]))
                else:
                    rows = model(input_ids=torch.tensor([p + c[:-1]])).logits[0, len(p) - 1 :].float().log_softmax(-1)
                    per_option.append(([rows[t, tok].item() for t, tok in enumerate(c)],
                                       [rows[t].argmax().item() == tok for t, tok in enumerate(c)]))
        out.append(combine(per_option, ts, "reference", answer))
    return out


def lmeval_scores(model, tokenizer, prompts, targets, answer, batch_size: int = 32):
    """lm-evaluation-harness style: every (context, continuation) pair a row, longest first, right-padded batches,
    full-vocabulary log-softmax at every position; a batch holds at most LMEVAL_LOGITS floats of logits (as lm-eval's
    `batch_size auto` shrinks its batch to fit memory)."""
    prompt_ids, conts = encode_options(tokenizer, model, prompts, targets, "reference", answer)
    reqs = [(q, k, prompt_ids[q], c) for q, cs in enumerate(conts) for k, c in enumerate(cs)]
    reqs.sort(key=lambda r: -(len(r[2]) + len(r[3])))
    vocab = model.get_output_embeddings().weight.shape[0]
    got, start = {}, 0
    while start < len(reqs):  # longest first: a batch is as wide as its first row; a 262k vocabulary shrinks it
        rows_fit = LMEVAL_LOGITS // (vocab * max(1, len(reqs[start][2]) + len(reqs[start][3]) - 1))
        batch = reqs[start : start + max(1, min(batch_size, rows_fit))]
        start += len(batch)
        rows = [(p + c)[:-1] for _, _, p, c in batch]
        width = max(map(len, rows))
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = torch.tensor(row)
        with torch.inference_mode():
            logp = model(input_ids=ids).logits.float().log_softmax(-1)
        for r, (q, k, p, c) in enumerate(batch):
            span = logp[r, len(p) - 1 : len(p) - 1 + len(c)]
            tgt = torch.tensor(c)
            got[q, k] = (span.gather(1, tgt[:, None])[:, 0].tolist(), (span.argmax(-1) == tgt).tolist())
    return [combine([got[q, k] for k in range(len(ts))], ts, "reference", answer) for q, ts in enumerate(targets)]


def one_by_one_answers(model, tokenizer, prompts, max_new_tokens: int):
    """Batch-1 greedy `generate` per question, stopped at EOS or a line break; an answer that is still blank there
    goes on past its leading blank lines to the end of its first non-empty line (as `generate_answers`)
    -> (answers, new tokens)."""
    stop = [tokenizer.eos_token_id, *newline_ids(tokenizer)]
    keep = (max_positions(model) or 1 << 30) - max_new_tokens
    answers, n_new = [], 0
    for p in prompts:
        ids = torch.tensor([encode(tokenizer, p)[-keep:]])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)
            new = out[0, ids.shape[1] :]
            text = tokenizer.decode(new, skip_special_tokens=True).split("\n", 1)[0]
            if not text.strip() and len(new) and int(new[0]) != tokenizer.eos_token_id:  # a blank line first
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id)
                new = out[0, ids.shape[1] :]
                text = through_first_line(tokenizer.decode(new, skip_special_tokens=True))
        n_new += len(new)
        answers.append(first_line(text))
    return answers, n_new


def reference_synthesis(model, tokenizer, prompts: list, max_new_tokens: int, sampling, do_sample=True,
                        batch_size: int = 4) -> list[str]:
    """The paper's way: `model.generate` on batches of 4 prompts (token ids, or texts tokenised as the engine does;
    unequal lengths left-padded with an attention mask)."""
    texts = iter(encode_prompts(tokenizer, [p for p in prompts if isinstance(p, str)]))
    ids_list = [next(texts) if isinstance(p, str) else list(p) for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out_texts = []
    for start in range(0, len(ids_list), batch_size):
        batch = ids_list[start : start + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(x)) + x for x in batch])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=do_sample, temperature=sampling.temperature, top_p=sampling.top_p,
                                 top_k=sampling.top_k, repetition_penalty=sampling.repetition_penalty,
                                 pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        out_texts += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return out_texts


def plain_train_seconds(model, chunks, batch_size: int, grad_accum: int, steps: int, lr: float,
                        bf16: bool = False) -> float:
    """Seconds per optimizer step of a plain AdamW loop (`grad_accum` forward/backward passes of `batch_size`
    chunks, clip, step) after one warm-up step; the fused AdamW kernel, as the Trainer uses, so the pair isolates
    what the Trainer adds. `bf16`: forward under bf16 autocast, as `train.mixed_precision: bf16`."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, fused=True)
    model.train()
    i = 0
    for s in range(steps + 1):
        if s == 1:
            t0 = time.perf_counter()
        for _ in range(grad_accum):
            ids = torch.tensor([chunks[(i + k) % len(chunks)] for k in range(batch_size)])
            i += batch_size
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=ids, labels=ids).loss
            (loss / grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / steps

