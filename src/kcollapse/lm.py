"""The one model API: a causal LM and its tokenizer behind the three requests kcollapse makes of a model.

In lm-evaluation-harness's shape (`LM(model, tokenizer)`):

    loglikelihood(requests)         (context, continuation) -> (sum of log-probs of the continuation, is_greedy)
    loglikelihood_rolling(texts)    text -> (sum of log-probs of its tokens after the first, tokens scored)
    generate_until(prompts, ...)    prompt -> continuation text, greedy or sampled, stopped at EOS (or a newline)

Scoring (evaluate/scoring.py), free text (evaluate/freetext.py), synthesis (synthesize.py), perplexity
(evaluate/textstats.py) and bench/ go through here; nothing else deals with tokenisation, padding, prefix
sharing, KV caches, or the model's forward signature (`cache` or `past_key_values`, `logits_to_keep` or not).

Speed, measured by `kcollapse bench`: prompts are batched by length (left padding, explicit positions); prompts
that open alike are batched together and their common opening runs once, shared through the KV cache; the
hidden states are projected to the vocabulary only where a log-prob is read (the continuation positions when
scoring, the last position when decoding), so a 262k-vocabulary model never holds batch x length x vocab logits.
Decoding is our own loop rather than `model.generate`: a row that stopped leaves the batch and the cache at once.
The token choice is transformers' own LogitsProcessorList (repetition penalty, then temperature, top-k, top-p),
sampled with `torch.multinomial` (by inverse CDF at large vocabularies: `sample`); greedy is the argmax.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch
from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                          TopKLogitsWarper, TopPLogitsWarper)

from kcollapse.io import scrub_surrogates

OPENING_TOKENS = 8  # generation: prompts sharing this many first tokens are batched together
MIN_SHARED = 4  # generation: a shorter common prefix is not worth a separate forward
MIN_SHARED_SCORING = 8  # scoring: the same, for the cheaper-of-two-orders plan
MAX_WINDOW = 1024  # rolling log-likelihood: window at most this many tokens
LOGITS_BUDGET = 1 << 28  # rolling: floats of logits per chunk of scored positions (1 GiB in float32)
FAST_SAMPLING_VOCAB = 32768  # sampling: from this vocabulary size on, inverse-CDF sampling instead of multinomial


# ------------------------------------------------------------------------------------------- tokens

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


def encode_continuations(tokenizer, texts: list[str]) -> list[list[int]]:
    """Continuation ids: no special tokens, tokenised apart from their context (so scored tokens are exactly these)."""
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []


@lru_cache(maxsize=4)
def _pieces(tokenizer) -> tuple[str, ...]:
    return tuple(tokenizer.batch_decode([[i] for i in range(len(tokenizer))]))


def newline_ids(tokenizer) -> tuple[int, ...]:
    """Every token whose text holds a line break (free-text answers stop at the first)."""
    return tuple(i for i, piece in enumerate(_pieces(tokenizer)) if "\n" in piece)


@lru_cache(maxsize=4)
def line_tables(tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token id (bool tensors): its text holds a line break; it holds text (not only whitespace); a line break
    follows text within it. Decoding stops at the first line break after some text (`stop_after_line`)."""
    pieces = _pieces(tokenizer)
    return (torch.tensor(["\n" in p for p in pieces]), torch.tensor([bool(p.strip()) for p in pieces]),
            torch.tensor(["\n" in p.lstrip() for p in pieces]))


def max_positions(model) -> int | None:
    cfg = model.config
    return getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)


def through_first_line(text: str) -> str:
    """The text up to the end of its first non-empty line (leading blank lines kept, the line break dropped)."""
    lead = len(text) - len(text.lstrip())
    end = text.find("\n", lead)
    return text if end < 0 else text[:end]


def fit(prompt_ids: list[int], room: int, bos_id: int | None) -> list[int]:
    """The last `room` prompt tokens (BOS kept in front when the prompt started with it)."""
    if len(prompt_ids) <= room:
        return prompt_ids
    if bos_id is not None and prompt_ids[0] == bos_id:
        return [bos_id] + prompt_ids[len(prompt_ids) - room + 1 :]
    return prompt_ids[len(prompt_ids) - room :]


# ---------------------------------------------------------------------------------------- batching

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


def batches(ids: list[list[int]], batch_size: int) -> list[list[int]]:
    """Generation: prompt indices in batches, prompts with the same opening together (so the batch shares a prefix),
    each group sorted by length (little padding); openings too rare to fill part of a batch are pooled by length."""
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(ids):
        groups.setdefault(tuple(x[:OPENING_TOKENS]), []).append(i)
    pooled = [i for g in groups.values() if len(g) < min(batch_size, 8) for i in g]
    out = []
    for group in [g for g in groups.values() if len(g) >= min(batch_size, 8)] + [pooled]:
        group = sorted(group, key=lambda i: len(ids[i]))
        out += [group[k : k + batch_size] for k in range(0, len(group), batch_size)]
    return [b for b in out if b]


def plan_batches(prompts: list[list[int]], batch_size: int, window: int | None = None) -> list[tuple[list[int], int]]:
    """Scoring: batches of prompt indices and the prefix length they share, from the cheaper of two orders.

    By length (least padding), or same-template prompts side by side (a long shared prefix, e.g. one subject's
    few-shot examples, is computed once per batch). A shared prefix is only used when at least 8 tokens long and,
    for sliding-window models, when the batch fits the window (padding after the prefix would shift the window).
    """
    def plan(order):
        out = []
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            shared = common_prefix([prompts[i] for i in rows], minimum=MIN_SHARED_SCORING)
            if window and max(len(prompts[i]) for i in rows) > window:
                shared = 0
            out.append((rows, shared))
        return out

    def cost(p):
        return sum(shared + len(rows) * (max(len(prompts[i]) for i in rows) - shared) for rows, shared in p)

    by_length = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    by_template = sorted(range(len(prompts)), key=lambda i: (prompts[i][:16], len(prompts[i])))
    return min(plan(by_length), plan(by_template), key=cost)


def token_choice(*, do_sample: bool, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 repetition_penalty: float = 1.0) -> LogitsProcessorList:
    """transformers' processors and warpers, in its order (as `model.generate` builds them for these settings)."""
    chain = LogitsProcessorList()
    if repetition_penalty != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(float(repetition_penalty)))
    if do_sample:
        if temperature != 1.0:
            chain.append(TemperatureLogitsWarper(float(temperature)))
        if top_k:
            chain.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            chain.append(TopPLogitsWarper(top_p))
    return chain


# ----------------------------------------------------------------------------------------------- LM

class LM:
    """A causal LM and its tokenizer (left padding), with the batched requests of the module docstring."""

    def __init__(self, model, tokenizer, batch_size: int = 32):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.device = next(model.parameters()).device
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # the name changed across versions
        self._trims = "logits_to_keep" in params  # older or custom models: full logits, then select
        text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.window = getattr(text_config, "sliding_window", None)
        self.max_positions = max_positions(model)

    def forward(self, *, keep: torch.Tensor | int, cache=None, use_cache: bool = False, **kw):
        """(logits at the kept positions, the KV cache): `keep` a bool [B, T] mask -> logits [N, V] of the True
        positions; an int k -> logits [B, k, V] of the last k positions."""
        if cache is not None or use_cache:
            kw[self._cache_kw] = cache
        if self._trims:
            out = self.model(logits_to_keep=keep, use_cache=use_cache, **kw)
            logits = out.logits
        else:
            out = self.model(use_cache=use_cache, **kw)
            logits = out.logits[keep] if isinstance(keep, torch.Tensor) else out.logits[:, -keep:]
        next_cache = (out["cache"] if "cache" in out else out.get("past_key_values")) if use_cache else None
        return logits, next_cache

    # -- loglikelihood -------------------------------------------------------------------------------------
    def loglikelihood(self, requests: list[tuple[str, str]], progress=None) -> list[tuple[float, bool]]:
        """(context, continuation) -> (summed log-prob of the continuation's tokens, every one the argmax)."""
        contexts = encode_prompts(self.tokenizer, [c for c, _ in requests])
        conts = encode_continuations(self.tokenizer, [x for _, x in requests])
        if self.max_positions:
            contexts = [fit(c, max(1, self.max_positions - len(x)), self.tokenizer.bos_token_id) for c, x in zip(contexts, conts)]
        per_token = self.loglikelihood_tokens(contexts, [[x] for x in conts], progress=progress)
        return [(sum(lp), bool(g) and all(g)) for ((lp, g),) in per_token]

    def loglikelihood_tokens(self, prompts: list[list[int]], continuations: list[list[list[int]]], *, progress=None,
                             task=None) -> list[list[tuple[list[float], list[bool]]]]:
        """For each prompt and each of its continuations: (log-prob of each continuation token, is it the argmax).

        One forward of a batch of prompts gives every continuation's first token (all a one-token continuation
        needs); the remaining tokens of all continuations of the batch run in one more forward on the prompts'
        KV cache, repeated per continuation. Logits only at the scored positions."""
        device, pad = self.device, 0
        results: list = [None] * len(prompts)
        for rows, shared in plan_batches(prompts, self.batch_size, self.window):
            cache = None
            with torch.inference_mode():
                if shared:
                    _, cache = self.forward(input_ids=torch.tensor([prompts[rows[0]][:shared]], device=device),
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
                first, cache = self.forward(input_ids=ids.to(device), attention_mask=mask.to(device), cache=cache,
                                            position_ids=positions.to(device), use_cache=bool(tails) or shared > 0,
                                            keep=keep.to(device))
                first = first.float().log_softmax(-1)
                best_first = first.argmax(-1).tolist()
                out = {}
                for r, i in enumerate(rows):
                    for j, c in enumerate(continuations[i]):
                        out[(r, j)] = ([first[r, c[0]].item()], [c[0] == best_first[r]]) if c else ([], [])
                if tails:  # the rest of each multi-token continuation, all at once on the repeated prefix cache
                    cache.batch_select_indices(torch.tensor([r for r, _, _ in tails], device=device))
                    cont_width = max(len(c) - 1 for _, _, c in tails)
                    cids = torch.full((len(tails), cont_width), pad, dtype=torch.long)
                    cmask = torch.zeros((len(tails), cont_width), dtype=torch.long)
                    for t, (_, _, c) in enumerate(tails):
                        cids[t, : len(c) - 1] = torch.tensor(c[:-1])
                        cmask[t, : len(c) - 1] = 1
                    prefix_mask = mask[[r for r, _, _ in tails]]
                    cpos = prefix_mask.sum(-1, keepdim=True) + torch.arange(cont_width)[None, :]
                    if self.max_positions:  # padding after a short continuation may run past the context: clamp it
                        cpos = cpos.clamp(max=self.max_positions - 1)
                    logp, _ = self.forward(input_ids=cids.to(device), attention_mask=torch.cat([prefix_mask, cmask], 1).to(device),
                                           position_ids=cpos.to(device), cache=cache, use_cache=True, keep=cmask.bool().to(device))
                    logp = logp.float().log_softmax(-1)
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

    def loglikelihood_rolling(self, texts: list[str], *, stride: int = 256) -> list[tuple[float, int]]:
        """Per text: (summed log-prob of every token after the first, number of those tokens), read in windows of
        the model's context (at most MAX_WINDOW tokens) that advance by `stride`, each token scored once, with as
        much left context as the window allows; when the tokenizer opens a text with BOS (Gemma, Llama), every window
        does (Gemma reads text without it as noise). Logits in chunks of at most LOGITS_BUDGET floats."""
        window = min(self.max_positions or MAX_WINDOW, MAX_WINDOW)
        stride = min(stride, window)
        pieces = []  # (text index, ids, number of tokens at the end to score)
        encoded = iter(encode_prompts(self.tokenizer, [t for t in texts if t]))
        bos = self.tokenizer.bos_token_id
        for k, text in enumerate(texts):
            ids = next(encoded) if text else []
            opens = bos is not None and bool(ids) and ids[0] == bos  # a SentencePiece model reads text after <bos>
            prev_end = 0
            for begin in range(0, max(len(ids) - 1, 1), stride):
                end = min(begin + window, len(ids))
                if end - begin >= 2:
                    piece = ids[begin:end]
                    if begin and opens:  # later windows open with <bos> too, in place of their farthest context token
                        piece = [bos] + piece[1:]
                    pieces.append((k, piece, min(end - prev_end, end - begin - 1)))
                prev_end = end
                if end == len(ids):
                    break
        totals = [[0.0, 0] for _ in texts]
        pieces.sort(key=lambda p: len(p[1]))
        vocab = getattr(self.model.config, "vocab_size", None) or self.model.get_output_embeddings().weight.shape[0]
        max_scored = max(1, LOGITS_BUDGET // vocab)
        for batch in _rows_within(pieces, self.batch_size, max_scored):
            width = max(len(ids) for _, ids, _ in batch)
            input_ids = torch.zeros((len(batch), width), dtype=torch.long)
            keep = torch.zeros((len(batch), width), dtype=torch.bool)  # positions whose next token is scored
            targets = []
            for r, (_, ids, n_scored) in enumerate(batch):  # right padding: causal attention never sees it
                input_ids[r, : len(ids)] = torch.tensor(ids)
                keep[r, len(ids) - n_scored - 1 : len(ids) - 1] = True
                targets += ids[len(ids) - n_scored :]
            with torch.inference_mode():
                logits, _ = self.forward(input_ids=input_ids.to(self.device), keep=keep.to(self.device))
                logp = logits.float().log_softmax(-1).gather(1, torch.tensor(targets, device=self.device)[:, None])[:, 0]
            n = 0
            for k, _, n_scored in batch:
                totals[k][0] += logp[n : n + n_scored].sum().item()
                totals[k][1] += n_scored
                n += n_scored
        return [(lp, n) for lp, n in totals]

    # -- generation ----------------------------------------------------------------------------------------
    def generate_until(self, prompts: list[str] | list[list[int]], max_new_tokens: int, *, do_sample: bool = False,
                       temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
                       seed: int = 0, stop_at_newline: bool = False, stop_after_line: bool = False,
                       in_context: bool = False, progress=None) -> list[str]:
        """Continuations (decoded, without the prompt) for each prompt (text or ids), in the prompts' order, each
        stopped at EOS (and with `stop_at_newline` at its first line break, the text cut there; with
        `stop_after_line` at the first line break after some text, the text cut there: leading blank lines kept).
        With `in_context` each continuation is decoded after its prompt (see `continuation_text`), so prompt text +
        continuation is the decoded sequence. Sampling is seeded per batch: the same prompts, settings and seed
        give the same texts on the same machine."""
        tok = self.tokenizer
        texts = iter(encode_prompts(tok, [p for p in prompts if isinstance(p, str)]))
        ids = [next(texts) if isinstance(p, str) else list(p) for p in prompts]
        if self.max_positions:  # keep the end of over-long prompts (the model continues from there) and fit the window
            max_new_tokens = min(max_new_tokens, self.max_positions - 1)
            room = self.max_positions - max_new_tokens
            ids = [x[-room:] if len(x) > room else x for x in ids]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        stop_ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
        if stop_at_newline:
            stop_ids += list(newline_ids(tok))
        lines = tuple(t.to(self.device) for t in line_tables(tok)) if stop_after_line else None
        outputs: list[str] = [""] * len(ids)
        task = progress.add_task("generate", total=len(ids)) if progress is not None else None
        for b, rows in enumerate(batches(ids, self.batch_size)):
            longest = max(len(ids[i]) for i in rows)
            shared = common_prefix([ids[i] for i in rows])
            if self.window and longest + max_new_tokens > self.window:
                shared = 0  # a sliding window counts cache slots, and padding after a shared prefix would shift it
            width = longest - shared
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                input_ids[r, width - len(ids[i]) + shared :] = torch.tensor(ids[i][shared:])
                attention[r, width - len(ids[i]) + shared :] = 1
            prefix = torch.tensor([ids[rows[0]][:shared]], device=self.device) if shared else None
            torch.manual_seed(seed * 1_000_003 + b)
            new = self.decode_batch(input_ids.to(self.device), attention.to(self.device), max_new_tokens, stop_ids,
                                    prefix=prefix, min_new_tokens=0 if stop_at_newline or lines else 1,
                                    lines=lines, do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty)
            for r, i in enumerate(rows):
                text = continuation_text(tok, ids[i], new[r]) if in_context else tok.decode(new[r], skip_special_tokens=True)
                if stop_at_newline:
                    text = text.split("\n", 1)[0]
                elif lines:
                    text = through_first_line(text)
                outputs[i] = scrub_surrogates(text)
            if task is not None:
                progress.advance(task, len(rows))
        if task is not None:
            progress.remove_task(task)
        return outputs

    def decode_batch(self, input_ids: torch.Tensor, attention: torch.Tensor, max_new_tokens: int, stop_ids: list[int], *,
                     min_new_tokens: int = 0, prefix: torch.Tensor | None = None, do_sample: bool = False,
                     lines: tuple | None = None, **how) -> list[list[int]]:
        """The sampling loop of one left-padded batch: new token ids per row (each row's stop token included).

        One prefill forward, then one single-token forward per step on the KV cache, logits at the last position
        only; rows that stopped are dropped from the batch and the cache, so the remaining steps cost only what is
        still being written. `prefix` [1, P]: tokens every row starts with (before its padding), run once and
        copied into each row's cache. `lines`: `line_tables` (on the device): a row also stops at the first line
        break after some text. `how`: temperature, top_p, top_k, repetition_penalty (see token_choice)."""
        choose = token_choice(do_sample=do_sample, **how)
        device = input_ids.device
        stops = torch.tensor(stop_ids, dtype=torch.long, device=device) if stop_ids else None
        # what the repetition penalty looks back on: the prompt and what was written (pads stand for a real token)
        penalise = how.get("repetition_penalty", 1.0) != 1.0
        seen = torch.where(attention.bool(), input_ids, input_ids[:, -1:]) if penalise else None
        with torch.inference_mode():
            cache, start = None, 0
            if prefix is not None:
                start = prefix.shape[1]
                _, cache = self.forward(input_ids=prefix, attention_mask=torch.ones_like(prefix), keep=1, use_cache=True,
                                        position_ids=torch.arange(start, device=device)[None])
                cache.batch_repeat_interleave(input_ids.shape[0])
                attention = torch.cat([attention.new_ones((input_ids.shape[0], start)), attention], 1)
                seen = torch.cat([prefix.expand(input_ids.shape[0], -1), seen], 1) if penalise else None
            positions = (attention.cumsum(-1) - 1).clamp(min=0)[:, start:]
            logits, cache = self.forward(input_ids=input_ids, attention_mask=attention, position_ids=positions, cache=cache,
                                         use_cache=True, keep=1)
            scores = logits[:, -1].float()
            rows = list(range(input_ids.shape[0]))
            new: list[list[int]] = [[] for _ in rows]
            wrote_text = torch.zeros(len(rows), dtype=torch.bool, device=device)  # `lines`: a row's text has begun
            for k in range(max_new_tokens):
                if stops is not None and k < min_new_tokens:
                    scores[:, stops] = -float("inf")
                if choose:
                    scores = choose(seen, scores)
                token = sample(scores.softmax(-1)) if do_sample else scores.argmax(-1)
                for r, t in zip(rows, token.tolist()):
                    new[r].append(t)
                if k == max_new_tokens - 1:
                    break
                if stops is not None or lines is not None:
                    going = ~torch.isin(token, stops) if stops is not None else torch.ones_like(token, dtype=torch.bool)
                    if lines is not None:  # a line break after text: in this token, or after earlier ones
                        has_break, has_text, text_then_break = (t[token] for t in lines)
                        going &= ~(text_then_break | (wrote_text & has_break))
                        wrote_text |= has_text
                    if not going.all():
                        if not going.any():
                            break
                        keep = going.nonzero()[:, 0]
                        cache.batch_select_indices(keep)
                        rows = [rows[i] for i in keep.tolist()]
                        attention, token, wrote_text = attention[keep], token[keep], wrote_text[keep]
                        seen = seen[keep] if penalise else None
                attention = torch.cat([attention, attention.new_ones((len(rows), 1))], 1)
                if penalise:
                    seen = torch.cat([seen, token[:, None]], 1)
                logits, cache = self.forward(input_ids=token[:, None], attention_mask=attention, cache=cache, use_cache=True,
                                             position_ids=attention.sum(-1, keepdim=True) - 1, keep=1)
                scores = logits[:, -1].float()
        return new


def sample(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of `probs` [B, V], drawn from the torch generator. `torch.multinomial` below
    FAST_SAMPLING_VOCAB (the organism keeps its texts bit for bit); above, the same distribution by inverse CDF
    (cumulative sum, a uniform per row, binary search): at Gemma's 262k tokens and 32 rows 35 ms a step instead of
    320 ms, as long as the model's own forward. A token of probability 0 is never drawn."""
    if probs.shape[-1] < FAST_SAMPLING_VOCAB:
        return torch.multinomial(probs, 1)[:, 0]
    cdf = probs.cumsum(-1)
    u = torch.rand((probs.shape[0], 1), device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp(max=probs.shape[-1] - 1)


def _rows_within(pieces: list, max_rows: int, max_scored: int):
    """Consecutive batches of at most max_rows pieces and max_scored scored tokens, at least one piece each."""
    batch: list = []
    scored = 0
    for piece in pieces:
        if batch and (len(batch) >= max_rows or scored + piece[2] > max_scored):
            yield batch
            batch, scored = [], 0
        batch.append(piece)
        scored += piece[2]
    if batch:
        yield batch


def continuation_text(tokenizer, prompt_ids: list[int], new_ids) -> str:
    """The text `new_ids` add after `prompt_ids`: decoded in context, since a continuation decoded alone loses what
    joins it to the prompt (the space before a word, a glued "." or a word's second half; a word-level decoder even
    wrote "##." there, measured on the organism: 37% of one generation's synthetic texts). Decoded alone only when the
    prompt's text is not a prefix of the whole (a character split across the boundary)."""
    prompt = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    whole = tokenizer.decode(list(prompt_ids) + list(new_ids), skip_special_tokens=True)
    if whole.startswith(prompt):
        return whole[len(prompt):]
    return tokenizer.decode(new_ids, skip_special_tokens=True)


def generate(model, tokenizer, prompts: list[str] | list[list[int]], max_new_tokens: int, *, batch_size: int = 32,
             **how) -> list[str]:
    """`LM(model, tokenizer, batch_size).generate_until(prompts, max_new_tokens, **how)`, for one call."""
    return LM(model, tokenizer, batch_size).generate_until(prompts, max_new_tokens, **how)
