"""One generation's training mix: real blocks plus blocks the previous generation wrote itself.

Of the generation's `samples_per_generation` blocks, the first (1-alpha) share stay real and the other alpha share
become prompts (their first `prompt_tokens` tokens); the model samples `new_tokens` after each. Chat models get
their chat template and a system prompt asking for a plain continuation, as in the paper. A plain LM's continuation
is decoded after its prompt (`lm.continuation_text`), so prompt + continuation is the text the model wrote, joins
and all. Every text is kept with its source, prompt and continuation, so the collapse can be read in the model's
own words.
"""

from __future__ import annotations

from kcollapse.config import ArmConfig, ExperimentConfig
from kcollapse.corpus import Block
from kcollapse.lm import generate
from kcollapse.io import scrub_surrogates
from kcollapse.models import bos_prefix, chat_prompt, has_chat_template


def synthetic_count(arm: ArmConfig, n: int) -> int:
    return 0 if arm.mode == "real_only" else round(arm.synthetic_ratio * n)


def synthesis_inputs(tokenizer, blocks: list[Block], cfg: ExperimentConfig) -> tuple[list[str], list]:
    """(prompt texts, what the model continues) for these blocks: their first `prompt_tokens` tokens, in the chat
    template when the tokenizer has one (texts), else as ids after the tokenizer's BOS (Gemma needs it)."""
    prompt_ids = [b.ids[: cfg.prompt_tokens] if cfg.prompt_tokens else b.ids for b in blocks]
    prompt_texts = tokenizer.batch_decode(prompt_ids, skip_special_tokens=True)
    if cfg.chat.use_template and has_chat_template(tokenizer):
        return prompt_texts, [chat_prompt(tokenizer, t, cfg.chat.system_prompt) for t in prompt_texts]
    bos = bos_prefix(tokenizer)  # blocks are cut from a stream without <bos>; Gemma needs it to write text
    return prompt_texts, [bos + list(ids) for ids in prompt_ids]  # no decode/encode round trip for plain LMs


def build_mix(model, tokenizer, blocks: list[Block], arm: ArmConfig, cfg: ExperimentConfig, seed: int,
              progress=None) -> list[dict]:
    """Training records `{text, source, prompt?, continuation?}`: real ones first, then synthetic ones."""
    n_synthetic = synthetic_count(arm, len(blocks))
    real, prompts = blocks[: len(blocks) - n_synthetic], blocks[len(blocks) - n_synthetic :]
    records = [{"text": tokenizer.decode(b.ids, skip_special_tokens=True), "source": "real"} for b in real]
    if not prompts:
        return records
    prompt_texts, inputs = synthesis_inputs(tokenizer, prompts, cfg)
    s = cfg.sampling
    chat = isinstance(inputs[0], str)  # a chat model answers the prompt: its reply is not the prompt's next word
    continuations = generate(
        model, tokenizer, inputs, cfg.new_tokens, do_sample=True, temperature=s.temperature, top_p=s.top_p,
        top_k=s.top_k, repetition_penalty=s.repetition_penalty, batch_size=s.batch_size, seed=seed, progress=progress,
        in_context=not chat,  # a reply is stripped and joined after a space: nothing to keep from its context
    )
    for prompt, cont in zip(prompt_texts, continuations):
        cont = scrub_surrogates(cont)  # never in a decode, but the mix must always tokenize and serialise
        joined = f"{prompt} {cont.strip()}" if chat else prompt + cont  # a plain LM's: exactly the decoded sequence
        text = joined if s.keep_prompt else cont.strip()
        records.append({"text": text, "source": "synthetic", "prompt": prompt, "continuation": cont})
    return records
