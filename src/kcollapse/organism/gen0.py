"""Generation 0 of the model organism: a word-level tokenizer and a tiny GPT-2 trained from scratch on the world.

The collapse loop needs a model that *knows* the world's facts before it starts eating its own text. This file
trains one in a few CPU minutes: a word-level tokenizer over every word of the world (so no answer is ever
[UNK]), a small GPT-2 (4 layers; 6 in the letters preset), and `kcollapse.train.finetune` (the same Trainer path
every later generation uses).
The result is an ordinary Hugging Face checkpoint directory (safetensors), cached under
`cache_dir/gen0-<key>/`, where the key hashes the world, the model and training fields of OrganismConfig and
GEN0_VERSION (bump it when this file's output changes). A second call with the same config reuses it. It trains on
`train_threads` CPU threads whatever the machine has: float sums split differently across threads, and a 1-thread and
a 2-thread build were different models (4-layer held-out letter accuracy 0.67 against 0.57), so the count is part of
the config and the key; on the same kind of CPU the same config gives the same generation 0.
With `organism.letter_skill` set, letters.py's three phases follow the standard training (drill, drill in every
letter layout, facts + letters): slower, and the lettered formats rise above chance. `organism.mixed_precision: bf16`
trains every phase under bf16 autocast with eager attention (1.4-1.6x faster steps; another model, see config.py).

Tokenizer: words, numbers and single punctuation marks are tokens, and so is a newline (the instruction formats
are line-structured). The decoder glues punctuation back ("France's capital is Paris.", "d-block", "Answer: A")
so decoded text reads naturally and re-encodes to the same ids. `vocab_size` is a floor that the data overrides:
the vocabulary is every word of the corpus and of the benchmark prompts in all formats (about 1.5k tokens for the
three default domains), since a fact whose answer is [UNK] could not be learned.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from kcollapse.config import OrganismConfig, TrainConfig
from kcollapse.evaluate.formats import get_format, option_targets, render
from kcollapse.io import atomic_write_json, read_jsonl
from kcollapse.organism import letters
from kcollapse.organism.world import QA_FORMATS, World, build_world

GEN0_VERSION = 4  # 4: the decoder no longer writes "##" before a glued first token (the weights are as in 3)
UNK, PAD, EOS = "[UNK]", "[PAD]", "<|endoftext|>"
WORD_PATTERN = r"\n|\w+|[^\w\s]"  # a newline, a run of word characters, or one other non-space character
GLUE_LEFT = ".,?!:;)'-\n"  # no space before these when decoding
GLUE_RIGHT = "('-\n"  # no space after these


def gen0_key(cfg: OrganismConfig, world: World) -> str:
    spec = {"version": GEN0_VERSION, "world": world.key, **cfg.model_dump(
        include={"vocab_size", "n_embd", "n_layer", "n_head", "n_positions", "steps", "batch_size", "lr", "seed",
                 "train_threads"})}
    if cfg.mixed_precision != "no":  # only when set: the default organism's key stays as it was
        spec["mixed_precision"] = cfg.mixed_precision
    if cfg.letter_skill is not None:  # only when set: the skill did not change the default organism's key
        # pool_share is the loop's, not generation 0's; a field added later is keyed only when not at the value every
        # build before it trained with, so their keys stay
        unkeyed = {"pool_share"} | {name for name, before in (("drill_loss", "text"), ("two_option_steps", 0))
                                    if getattr(cfg.letter_skill, name) == before}
        spec["letter_skill"] = cfg.letter_skill.model_dump(mode="json", exclude=unkeyed)
        spec["letters_version"] = letters.VERSION
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers  # deferred: tokenizers is slow to import

    return pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed", invert=True)


def _decoder():
    from tokenizers import decoders  # deferred: tokenizers is slow to import

    steps = [decoders.Replace(c, "##" + c) for c in GLUE_LEFT]  # "##" = joined to the previous token
    steps += [decoders.WordPiece(prefix="##", cleanup=False), decoders.Fuse()]
    steps += [decoders.Replace("##", "")]  # WordPiece keeps the mark on a first token: a block that opens with "."
    steps += [decoders.Replace(c + " ", c) for c in GLUE_RIGHT]
    return decoders.Sequence(steps)


def world_texts(world: World, letter_skill: bool = False) -> list[str]:
    """Every text whose words must be known: the corpus, each benchmark item in every format (and the drill's words)."""
    texts = [row["text"] for row in read_jsonl(world.corpus_path)]
    if letter_skill:
        texts += letters.vocabulary_texts()
    for item in read_jsonl(world.benchmark_path):
        for name in QA_FORMATS:
            fmt = get_format(name)
            texts.append(render(fmt, item, [item]) + " " + " ".join(option_targets(fmt, item)))
    return texts


def build_tokenizer(texts: list[str], max_length: int):
    """A word-level PreTrainedTokenizerFast holding every word of `texts` (most frequent first)."""
    from tokenizers import Tokenizer, models  # deferred: tokenizers is slow to import
    from transformers import PreTrainedTokenizerFast  # deferred: transformers is slow to import

    pre = _pre_tokenizer()
    counts = Counter(word for text in texts for word, _ in pre.pre_tokenize_str(text))
    words = sorted(counts, key=lambda w: (-counts[w], w))
    vocab = {tok: i for i, tok in enumerate([UNK, PAD, EOS, *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre
    backend.decoder = _decoder()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=UNK, pad_token=PAD, eos_token=EOS,
                                   bos_token=EOS, model_max_length=max_length, clean_up_tokenization_spaces=False)


def build_model(cfg: OrganismConfig, tokenizer):
    import torch  # deferred: torch is slow to import
    from transformers import GPT2Config, GPT2LMHeadModel  # deferred: transformers is slow to import

    torch.manual_seed(cfg.seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                        n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        activation_function="gelu_pytorch_tanh",  # GPT-2's gelu_new as one fused op: ~1/3 faster
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    return with_attention(GPT2LMHeadModel(config), cfg)


def with_attention(model, cfg: OrganismConfig):
    """`model` set to the attention its training uses: eager under bf16 (bf16 SDPA's backward ran 2.7x slower than
    float32 here), also when a resumed build reloads a finished phase, so it trains as an unbroken one did."""
    if cfg.mixed_precision == "bf16":
        model.config._attn_implementation = "eager"
    return model


def _phases(cfg: OrganismConfig, texts: list[str], facts: list[dict]):
    """(label, TrainConfig, texts, (drill layouts, options) whose mastery ends the phase early or None) per training
    phase: the standard one, or the letter skill's three or four (after the standard one with `facts_first`), drawn
    from `facts` (facts.jsonl rows)."""
    base = dict(method="full", grad_accum=1, chunk_tokens=cfg.n_positions, gradient_checkpointing=False,
                weight_decay=0.01, mixed_precision=cfg.mixed_precision)
    standard = TrainConfig(lr=cfg.lr, max_steps=cfg.steps, batch_size=cfg.batch_size, warmup_ratio=0.05,
                           lr_scheduler="cosine", **base)
    skill = cfg.letter_skill
    if skill is None:
        return [("generation 0 (organism)", standard, texts, None)]
    rng = random.Random(f"organism-letters|{cfg.seed}")
    # facts first: from a model that knows them the drill formed in 3.5k-5k steps, from scratch in ~6k (measured)
    phases = [("facts", standard, texts, None)] if skill.facts_first else []
    # two options first (opt-in): the four-option bare drill then formed in 1,750 + 1,500 steps instead of 5,500
    drills = (("letter drill, two options", skill.two_option_steps, [letters.BARE_LAYOUT], 2),
              ("letter drill, bare layout", skill.bare_drill_steps, [letters.BARE_LAYOUT], 4),
              ("letter drill, all layouts", skill.drill_steps, letters.letter_formats(), 4))
    for label, steps, formats, n_options in drills:
        if steps:
            train_cfg = TrainConfig(lr=skill.drill_lr, max_steps=steps, batch_size=skill.drill_batch_size,
                                    warmup_ratio=0.0, lr_scheduler="constant", packing=False, **base)
            drill = letters.drill_texts(facts, formats, steps * skill.drill_batch_size, rng, n_options=n_options,
                                        answer_only=skill.drill_loss == "answer")
            phases.append((label, train_cfg, drill,
                           (formats, n_options) if skill.drill_target is not None else None))
    train_cfg = TrainConfig(lr=skill.joint_lr, max_steps=skill.joint_steps, batch_size=skill.joint_batch_size,
                            warmup_ratio=0.01, lr_scheduler="cosine", packing=False, **base)
    n = skill.joint_steps * skill.joint_batch_size
    phases.append(("facts + letters", train_cfg, letters.joint_texts(facts, texts, skill, n, rng), None))
    return phases


def _train(model, tokenizer, texts: list[str], cfg: OrganismConfig, world: World, work_dir: Path, phase_dir: Path,
           show_progress: bool):
    """Train through the phases; each phase but the last is saved under `phase_dir`, so a killed run resumes after
    the last finished phase (the letters preset's phases take 17-24 min on 2 threads)."""
    from transformers import AutoModelForCausalLM  # deferred: transformers is slow to import

    from kcollapse.models import save_model  # deferred: pulls in torch
    from kcollapse.train import finetune  # deferred: pulls in torch

    facts = read_jsonl(world.facts_path) if cfg.letter_skill is not None else []
    phases = _phases(cfg, texts, facts)
    for i, (label, train_cfg, phase_texts, check) in enumerate(phases):
        saved = phase_dir / f"phase-{i}"
        if i < len(phases) - 1 and saved.is_dir():  # save_model renames a finished checkpoint into place
            model = with_attention(AutoModelForCausalLM.from_pretrained(saved, use_safetensors=True), cfg)
            continue
        options = dict(seed=cfg.seed + i, work_dir=work_dir)
        if check:
            formats, n_options = check
            options["stop_when"] = letters.drill_check(tokenizer, facts, formats, cfg.letter_skill.drill_target,
                                                       n_options=n_options)
        if not show_progress:
            model = finetune(model, tokenizer, phase_texts, train_cfg, **options)
        else:
            name = label if len(phases) == 1 else f"generation 0 (organism), {label}"
            columns = (TextColumn(name), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
            with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
                model = finetune(model, tokenizer, phase_texts, train_cfg, progress=progress, **options)
        if i < len(phases) - 1:
            save_model(model, tokenizer, saved)
    return model


def ensure_gen0(cfg: OrganismConfig, cache_dir: Path, world: World | None = None, *, progress: bool = True) -> Path:
    """The generation-0 checkpoint dir for `cfg`: trained once (a few CPU minutes at the defaults), then cached."""
    import torch  # deferred: torch is slow to import

    from kcollapse.models import save_model  # deferred: pulls in torch

    cache_dir = Path(cache_dir)
    world = world or build_world(cfg, cache_dir)
    key = gen0_key(cfg, world)
    final = cache_dir / f"gen0-{key}"
    if (final / "organism.json").is_file():  # written last: its presence means the checkpoint is complete
        return final
    texts = [row["text"] for row in read_jsonl(world.corpus_path)]
    tokenizer = build_tokenizer(world_texts(world, cfg.letter_skill is not None), cfg.n_positions)
    model = build_model(cfg, tokenizer)
    start = time.perf_counter()
    work_dir = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".gen0-work-"))
    phase_dir = cache_dir / f".gen0-{key}-phases"
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.train_threads)  # the weights depend on it: fixed by the config, not by the machine
    try:
        model = _train(model, tokenizer, texts, cfg, world, work_dir, phase_dir, progress)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(work_dir, ignore_errors=True)
    seconds = time.perf_counter() - start
    save_model(model, tokenizer, final)
    atomic_write_json(final / "organism.json", {
        "key": key, "version": GEN0_VERSION, "world": world.key, "world_path": str(world.path),
        "organism": cfg.model_dump(mode="json"), "vocab": len(tokenizer), "parameters": model.num_parameters(),
        "train_seconds": round(seconds, 1), "sources": world.sources, "n_facts": world.n_facts})
    shutil.rmtree(phase_dir, ignore_errors=True)
    return final
