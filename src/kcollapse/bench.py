"""`kcollapse bench`: how much faster kcollapse does the same science, measured in one process on this machine.

Why: a knowledge-collapse study scores every generation in four formats and writes thousands of texts per
generation. The paper's code scores one question, one option, one full forward at a time (two forwards per option
in the letter formats); lm-evaluation-harness pads every (context, continuation) pair into batches. Both do the
same work; kcollapse does less (one prompt forward for all letters, a shared prompt for text continuations, the
vocabulary projection only where a token is scored), and batches generation with a KV cache.

What: on the organism model (the cached generation 0 if there is one, else its architecture with random weights:
speed does not depend on training), on a wider local GPT-2 (6 layers, d=256), and on real pretrained models
(`--model SPEC`, any spec `model:` accepts; by default, on a full bench, Gemma 3 270M when its weights package is
installed), float32 on the CPU, each on organism benchmark items and corpus text as the loop and the evaluator
would give THAT model (its tokenizer, BOS, chat template, its recipe: a packaged model's preset, else the default):
  scoring    reference-style / lm-eval-style vs `score_options`, per format, questions/s (scores agree to 1e-4
             relative, same predictions and greedy flags)
  free_text  batch-1 greedy `generate` per question vs `generate_answers`, new tokens/s (answers compared)
  synthesis  the reference's `model.generate` on batches of 4, sampling, vs ours (`sampling.batch_size`), new tokens/s
             (greedy texts compared)
  training   `finetune` (the Trainer path the loop ships), steady-state tokens/s vs a plain AdamW loop; and the
             achieved FLOP/s (6 x params x tokens / s) as a share of a large fp32 `torch.matmul` (utilisation); at
             one thread (each arm worker of the default experiment) and at every core (generation 0; real models);
             a real model on three workloads (`training_configs`: its recipe's step, the paper's 2,048-token step
             in float32 and under bf16 autocast)
Targets: TARGETS / UTILISATION_TARGET on the organism, REAL_TARGETS / REAL_UTILISATION_TARGET on a real model.
Every organism figure is the median of several repeats, a real model's of one (its baselines are slow); compare
ratios only within one run (shared machines are noisy).
Also printed: a run's wall time per phase (its `seconds_*` metrics) and this process's peak RSS.
"""

from __future__ import annotations

import copy
import gc
import importlib.util
import json
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from kcollapse import corpus as corpus_mod
from kcollapse import organism
from kcollapse.config import (PAPER_FORMATS, CorpusConfig, EvalConfig, ExperimentConfig, OrganismConfig, TrainConfig,
                              load_config)
from kcollapse.evaluate import build_prompts, load_benchmark
from kcollapse.evaluate import benchmark as bmk
from kcollapse.evaluate.formats import get_format, option_targets
from kcollapse.evaluate.freetext import first_line, generate_answers
from kcollapse.evaluate.scoring import LETTER, combine, encode_options, score_options
from kcollapse.io import atomic_write_json
from kcollapse.lm import encode, encode_prompts, generate, max_positions, newline_ids, through_first_line
from kcollapse.models import load_model
from kcollapse.organism.gen0 import build_model, build_tokenizer, gen0_key, world_texts
from kcollapse.pretrained import PACKAGED, resolve_model
from kcollapse.synthesize import synthesis_inputs
from kcollapse.train import finetune, pack

TARGETS = {("scoring", "reference", "letter"): 6.0, ("scoring", "reference", "text"): 3.0,
           ("scoring", "lm-eval", "letter"): 3.0, ("scoring", "lm-eval", "text"): 3.0,
           ("free_text", "reference", None): 5.0, ("synthesis", "reference", None): 4.0}
UTILISATION_TARGET = 50.0  # % of the matmul peak, on the organism
REAL_TARGETS = {("scoring", "reference", "letter"): 5.0, ("scoring", "reference", "text"): 5.0,
                ("free_text", "reference", None): 4.0, ("synthesis", "reference", None): 3.0}
REAL_UTILISATION_TARGET = 60.0  # % of the fp32 matmul peak, on a real pretrained model
SAME_SCORES = 1e-4  # option scores of ours and of a baseline agree to this relative difference
LMEVAL_LOGITS = 1 << 28  # the lm-eval baseline's batch holds at most this many floats of logits (1 GiB)


def _median(fn, repeats: int):
    """(median seconds over `repeats` calls, the last call's result)."""
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


# ------------------------------------------------------------------------------------------------ the baselines
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


# ------------------------------------------------------------------------------------------------ inputs
@dataclass
class Subject:
    """A model under test, the recipe the loop would run it with, and the targets its rows are held to."""

    label: str
    model: object
    tokenizer: object
    recipe: ExperimentConfig
    targets: dict
    utilisation_target: float | None
    pretrained: bool = False  # a real model: its own (smaller) input counts

    @property
    def precision(self) -> str:
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")


@dataclass
class Inputs:
    """What the loop and the evaluator would give this model, built with its own tokenizer and recipe."""

    scoring: dict  # format -> (answer kind, prompts, option targets)
    free_prompts: list[str]
    synth: list  # synthesis inputs as build_mix makes them: ids after BOS, or chat-template texts
    train_texts: list[str]


def _organisms(tiny: bool) -> tuple[list[Subject], object]:
    """The organism (cached gen 0 if present) and a wider GPT-2 on its tokenizer, both on the default recipe."""
    from transformers import GPT2Config, GPT2LMHeadModel  # deferred: transformers is slow to import

    recipe = load_config(None, [], "default")
    cfg = OrganismConfig()
    world = organism.build_world(cfg, organism.default_cache_dir())
    cached = organism.default_cache_dir() / f"gen0-{gen0_key(cfg, world)}"
    if (cached / "organism.json").is_file() and not tiny:
        model, tok = load_model(cached, device="cpu")
        label = "organism (gen 0)"
    else:
        tok = build_tokenizer(world_texts(world), cfg.n_positions)
        tok.padding_side = "left"
        if tiny:
            cfg = cfg.model_copy(update=dict(n_embd=32, n_layer=2, n_head=2))
        model = build_model(cfg, tok).eval()
        label = "organism (tiny)" if tiny else "organism (random init)"
    subjects = [Subject(f"{label} {model.num_parameters() / 1e6:.1f}M", model, tok, recipe, TARGETS, UTILISATION_TARGET)]
    if not tiny:
        torch.manual_seed(1)
        wide = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=cfg.n_positions, n_embd=256, n_layer=6,
                                          n_head=8, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                          bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                                          pad_token_id=tok.pad_token_id)).eval()
        subjects.append(Subject(f"gpt2 6x256 {wide.num_parameters() / 1e6:.1f}M", wide, tok, recipe, TARGETS, None))
    return subjects, world


def pretrained_subject(spec: str) -> Subject:
    """A real model from any spec `model:` accepts (checkpoint dir, `.gguf` file, `gemma3-270m`), float32 on the
    CPU, with the recipe the loop would run it with: a packaged model's own preset, else the default recipe. A spec
    that does not load is the loader's one-line UserError."""
    recipe = load_config(None, [], spec if spec in PACKAGED else "default").model_copy(update={"model": spec})
    model, tok = load_model(resolve_model(spec, recipe.cache_dir), device="cpu", dtype="float32",
                            tokenizer_path=recipe.tokenizer)
    return Subject(f"{spec} {model.num_parameters() / 1e6:.0f}M", model, tok, recipe, REAL_TARGETS,
                   REAL_UTILISATION_TARGET, pretrained=True)


def default_real_models() -> list[str]:
    """The packaged real models whose weights package is installed (a full bench adds their rows)."""
    return [name for name, package in PACKAGED.items() if importlib.util.find_spec(package) is not None]


def build_inputs(subject: Subject, world, n_questions: int, n_prompts: int, n_synth: int) -> Inputs:
    """Inputs as the loop and the evaluator build them for this model: prompts by `build_prompts` (its chat template
    when it has one and the recipe uses it), tokenised by the engine (its BOS); synthesis prompts cut from the
    organism corpus with its tokenizer by `make_blocks` and wrapped by `synthesis_inputs` (BOS or chat template)."""
    recipe, tok = subject.recipe, subject.tokenizer
    ecfg = EvalConfig(**{**recipe.eval.model_dump(), "limit": -(-max(n_questions, n_prompts) // 3)})  # 3 subjects
    items = load_benchmark(ecfg, world.benchmark_path)
    questions = [q for q in items if bmk.is_question(q)][: max(n_questions, n_prompts)]
    pool = bmk.few_shot_pool(items)
    scoring = {}
    for name in PAPER_FORMATS:  # the four the paper evaluates
        fmt = get_format(name)
        scoring[name] = (fmt.answer, build_prompts(fmt, questions, pool, ecfg, tok, recipe.chat.use_template),
                         [option_targets(fmt, q) for q in questions])
    free_prompts = scoring["multiple_choice"][1][:n_prompts]
    scoring = {name: (answer, prompts[:n_questions], targets[:n_questions])
               for name, (answer, prompts, targets) in scoring.items()}
    texts = corpus_mod.load_texts(CorpusConfig(path="organism"), world.corpus_path)
    blocks = corpus_mod.make_blocks(tok, texts[: n_synth * 4], recipe.block_tokens)
    # whole prompts only: equal lengths, so the reference's batches of 4 need no padding (the paper's did not)
    blocks = [b for b in blocks if len(b.ids) >= recipe.prompt_tokens][:n_synth]
    _, synth = synthesis_inputs(tok, blocks, recipe)
    return Inputs(scoring, free_prompts, synth, [t.text for t in texts[:2000]])


# ------------------------------------------------------------------------------------------------ the pairs
def _row(subject: Subject, name, baseline, fmt, ours, theirs, unit, check, threads=None, train_config=None,
         held=True, precision=None):
    ratio = ours / theirs if theirs else float("nan")
    if unit.startswith("%"):
        target = subject.utilisation_target if held else None
        passed = ours >= target if target else None
    else:
        target = subject.targets.get((name, baseline, get_format(fmt).answer if fmt else None))
        passed = ratio >= target if target else None
    return {"name": name, "baseline": baseline, "format": fmt, "model": subject.label, "ours": ours, "theirs": theirs,
            "ratio": ratio, "unit": unit, "threads": threads or torch.get_num_threads(),
            "precision": precision or subject.precision,
            "target": target, "passed": passed, "train_config": train_config, "check": check}


def _relative_gap(ours: list[dict], theirs: list[dict]) -> float:
    """Largest |a - b| / max(|a|, |b|) over every option score (scores are probabilities: positive or 0)."""
    return max((abs(a - b) / max(abs(a), abs(b)) if a != b else 0.0)
               for o, t in zip(ours, theirs) for a, b in zip(o["scores"], t["scores"]))


def bench_scoring(subject: Subject, scoring, repeats):
    model, tok, batch_size = subject.model, subject.tokenizer, subject.recipe.eval.batch_size
    rows = []
    for name, (answer, prompts, targets) in scoring.items():
        t_ours, ours = _median(lambda: score_options(model, tok, prompts, targets, scoring="reference",
                                                     answer=answer, batch_size=batch_size), repeats)
        for baseline, fn in (("reference", lambda: reference_scores(model, tok, prompts, targets, answer)),
                             ("lm-eval", lambda: lmeval_scores(model, tok, prompts, targets, answer))):
            t_theirs, theirs = _median(fn, repeats)
            gap = _relative_gap(ours, theirs)
            same = all(o["is_greedy"] == t["is_greedy"] and o["predicted_index"] == t["predicted_index"]
                       for o, t in zip(ours, theirs))
            check = f"max rel d={gap:.0e}" + ("" if gap <= SAME_SCORES and same else " MISMATCH")
            rows.append(_row(subject, "scoring", baseline, name, len(prompts) / t_ours, len(prompts) / t_theirs,
                             "questions/s", check))
    return rows


def bench_free_text(subject: Subject, prompts, repeats):
    model, tok, ecfg = subject.model, subject.tokenizer, subject.recipe.eval
    max_new = ecfg.free_text_tokens
    t_theirs, (theirs, n_new) = _median(lambda: one_by_one_answers(model, tok, prompts, max_new), repeats)
    t_ours, ours = _median(lambda: generate_answers(model, tok, prompts, max_new, ecfg.batch_size), repeats)
    same = sum(a == b for a, b in zip(ours, theirs))
    return [_row(subject, "free_text", "reference", None, n_new / t_ours, n_new / t_theirs, "new tokens/s",
                 f"{same}/{len(prompts)} answers equal" + ("" if same == len(prompts) else " MISMATCH"))]


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


def bench_synthesis(subject: Subject, prompts, repeats, n_greedy: int, n_reference: int | None = None):
    """New tokens/s sampling as the loop does vs the reference's way; the reference's rate may be read on the first
    `n_reference` prompts only (its batches of 4 are alike, so its rate does not depend on how many it runs), ours on
    all of them (at least one full batch of `sampling.batch_size`)."""
    model, tok, recipe = subject.model, subject.tokenizer, subject.recipe
    s = recipe.sampling

    def n_tokens(texts):
        return sum(map(len, tok(texts, add_special_tokens=False)["input_ids"]))

    def ours(sample=True, some=prompts):
        return generate(model, tok, some, recipe.new_tokens, do_sample=sample, temperature=s.temperature,
                        top_p=s.top_p, top_k=s.top_k, repetition_penalty=s.repetition_penalty, batch_size=s.batch_size)

    some = prompts[:n_reference] if n_reference else prompts
    t_theirs, theirs = _median(lambda: reference_synthesis(model, tok, some, recipe.new_tokens, s), repeats)
    t_ours, texts = _median(lambda: ours(), repeats)
    n_theirs, n_ours = n_tokens(theirs), n_tokens(texts)
    few = prompts[:n_greedy]  # same numbers: greedy texts of the reference's way and of ours agree
    same = sum(a == b for a, b in zip(reference_synthesis(model, tok, few, recipe.new_tokens, s, do_sample=False),
                                      ours(False, few)))
    return [_row(subject, "synthesis", "reference", None, n_ours / t_ours, n_theirs / t_theirs, "new tokens/s",
                 f"greedy {same}/{len(few)} equal" + ("" if same == len(few) else " MISMATCH"))]


def training_configs(subject: Subject) -> list[tuple[str, TrainConfig, bool]]:
    """(label, TrainConfig, carries the utilisation target) for each training workload measured on `subject`.
    The organism: its recipe. A real model: its recipe (the preset's steps are tiny: 2 x 128 tokens, so the
    per-step optimizer pass over every weight weighs as much as the matmuls) and the paper's fine-tuning step
    (512-token chunks, batch 1 x grad_accum 4 = 2,048 tokens an optimizer step), the workload a study of a real
    model runs and the one its utilisation target is held to; gradient checkpointing off (a 270M model fits in
    CPU memory, and recomputation is not counted in 6 x params x tokens), in float32 and with bf16 autocast (what
    the brief calls the biggest lever on these CPUs: a 256 x 640 by 640 x 32k matmul runs ~4x faster in bf16, and
    the vocabulary projection is most of a small model's work). The target is held to the mixed-precision row, whose
    agreement with float32 (`mixed_precision_agreement`) is printed next to it."""
    recipe = subject.recipe.train
    if not subject.pretrained:
        return [("recipe", recipe, True)]
    paper = load_config(None, [], "paper").train.model_copy(update={"gradient_checkpointing": False})
    context = max_positions(subject.model) or paper.chunk_tokens
    paper = paper.model_copy(update={"chunk_tokens": min(paper.chunk_tokens, context)})
    return [("recipe", recipe, False), ("paper", paper, False),
            ("paper-bf16", paper.model_copy(update={"mixed_precision": "bf16"}), True)]


def describe(label: str, tcfg: TrainConfig) -> str:
    return (f"{label}: {tcfg.batch_size} x {tcfg.chunk_tokens} tokens"
            + (f" x grad_accum {tcfg.grad_accum}" if tcfg.grad_accum > 1 else "") + " a step")


def mixed_precision_agreement(model, chunk: list[int]) -> tuple[float, float]:
    """(relative loss difference, gradient cosine) of bf16 autocast against float32, at the same weights on one
    chunk, through the loss the Trainer uses (lmloss where the head allows it)."""
    from kcollapse import lmloss  # deferred: only the bench needs it here

    ids = torch.tensor([chunk])
    losses, grads = [], []
    for enabled in (False, True):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            if lmloss.supports_chunked_loss(model):
                loss = lmloss.causal_lm_loss(model, ids, ids)
            else:
                loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
        model.zero_grad(set_to_none=True)
    # sums in float64 tensor by tensor: 268M float32 products summed in float32 drift past a cosine of 1
    dot = n32 = n16 = 0.0
    for name, g32 in grads[0].items():
        g32, g16 = g32.double(), grads[1][name].double()
        dot += float(g32.flatten() @ g16.flatten())
        n32, n16 = n32 + float(g32.square().sum()), n16 + float(g16.square().sum())
    return abs(losses[1] - losses[0]) / abs(losses[0]), dot / (n32 * n16) ** 0.5


def bench_training(subject: Subject, texts, steps, repeats, work_dir, peak_n: int = 2048, one_thread=True,
                   settle: float = 2.0):
    """Steady-state finetune tokens/s and utilisation for each of `training_configs(subject)`, at one thread (how
    each arm worker of the default experiment trains) and at every core (how generation 0 and real models train).
    Each repeat times two runs that differ only in max_steps (setup cost cancels) and the matmul peak right before
    and after them, so a noisy neighbour moves both sides of its ratio alike; the medians over repeats are reported.
    FLOPs are 6 x parameters x tokens, a tied embedding counted once (`num_parameters`): as the output projection it
    costs 6 FLOPs per token per weight like any other matrix, its input lookup none; attention's own FLOPs are not
    counted (the figure is a lower bound)."""
    model, tok = subject.model, subject.tokenizer
    n_params = model.num_parameters()
    short, long_ = max(1, steps // 4), steps
    a, b = torch.randn(peak_n, peak_n), torch.randn(peak_n, peak_n)

    def matmul():
        """The fp32 peak: the best of three (one ~0.1 s matmul is too short to trust on a shared machine), after a
        2 s pause, since right after bf16 work these CPUs run an fp32 matmul at 128-134 GFLOP/s against 155-170
        before it and 164 two seconds later (measured): read at once, that depressed peak inflated the bf16 row's
        utilisation (77.5% of 132 GFLOP/s, where the float32 rows of the same run read a 178-189 peak)."""
        time.sleep(settle)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            torch.matmul(a, b)
            best = min(best, time.perf_counter() - t0)
        return 2 * peak_n**3 / best

    rows, cores = [], torch.get_num_threads()
    for label, tcfg, held in training_configs(subject):
        tokens_per_step = tcfg.batch_size * tcfg.grad_accum * tcfg.chunk_tokens
        chunks = pack(tok, texts, tcfg.chunk_tokens)
        flop = 6 * n_params * tokens_per_step

        def run(n, tcfg=tcfg):
            t0 = time.perf_counter()
            finetune(copy.deepcopy(model), tok, texts, tcfg.model_copy(update={"max_steps": n}), seed=0,
                     work_dir=Path(work_dir) / "trainer")
            seconds = time.perf_counter() - t0
            gc.collect()  # the Trainer's reference cycles would keep a 1 GB copy of a real model alive
            return seconds

        for threads in sorted({1, cores} if one_thread else {cores}):
            torch.set_num_threads(threads)
            try:
                matmul(), run(short)  # warm-up
                steps_s, plain_s, utils, peaks, longs, shorts = [], [], [], [], [], []
                for _ in range(repeats):
                    before = matmul()
                    longs.append(run(long_))
                    shorts.append(run(short))
                    step = max(longs[-1] - shorts[-1], 1e-9) / (long_ - short)
                    plain = plain_train_seconds(copy.deepcopy(model), chunks, tcfg.batch_size, tcfg.grad_accum,
                                                long_ - short, tcfg.lr, tcfg.mixed_precision == "bf16")
                    gc.collect()
                    peak = max(before, matmul())
                    steps_s.append(step), plain_s.append(plain), peaks.append(peak)
                    utils.append((100 * flop / step / peak, 100 * flop / plain / peak))
            finally:
                torch.set_num_threads(cores)
            per_step, plain, peak = map(statistics.median, (steps_s, plain_s, peaks))
            util = statistics.median(u for u, _ in utils)
            util_plain = statistics.median(u for _, u in utils)
            t_long = statistics.median(longs)
            setup = max(statistics.median(shorts) - short * per_step, 0.0)
            role = ("an arm worker" if threads == 1 and cores > 1 else "generation 0" if threads == cores else "") \
                if not subject.pretrained else ""
            where = (f"{threads} thread{'s' if threads > 1 else ''}" + (f" ({role})" if role else "")
                     + f"; {describe(label, tcfg)}; {long_ - short} steps x {repeats}")
            if tcfg.mixed_precision == "bf16":
                loss_gap, cosine = mixed_precision_agreement(model, chunks[0])
                where += f"; vs float32: loss {loss_gap:.1e} rel., gradient cosine {cosine:.4f}"
            precision = subject.precision + (" + bf16 autocast" if tcfg.mixed_precision == "bf16" else "")
            rows += [
                _row(subject, "training", "reference", None, tokens_per_step / per_step, tokens_per_step / plain,
                     "tokens/s", f"{where}; end-to-end {long_ * tokens_per_step / t_long:.0f} tok/s, setup {setup:.2f} s",
                     threads=threads, train_config=label, precision=precision),
                _row(subject, "training", "reference", None, util, util_plain, "% of fp32 matmul peak",
                     f"{where}; 6 x {n_params / 1e6:.0f}M params x {tokens_per_step} tokens/step: "
                     f"{flop / per_step / 1e9:.1f} of {peak / 1e9:.1f} GFLOP/s", threads=threads,
                     train_config=label, held=held, precision=precision),
            ]
    return rows


# ------------------------------------------------------------------------------------------------ the command
def run_phases(run_dir: Path | None) -> tuple[str, list[tuple[str, float]]]:
    """(source, [(phase, seconds)]) summed over a run's `seconds_*` metrics (generation 0 counted once)."""
    candidates = [run_dir] if run_dir else [Path("runs/default")]
    for d in candidates:
        path = Path(d) / "metrics.jsonl"
        if path.is_file():
            totals: dict[str, float] = {}
            first_arm = None
            for line in path.read_text().splitlines():
                r = json.loads(line)
                first_arm = first_arm or r.get("arm")
                if not str(r.get("metric", "")).startswith("seconds_"):
                    continue
                if r.get("generation") == 0 and r.get("arm") != first_arm:  # gen 0 is repeated for every arm
                    continue
                phase = r["metric"].removeprefix("seconds_") + (" (gen 0)" if r.get("generation") == 0 else "")
                totals[phase] = totals.get(phase, 0.0) + float(r["value"])
            return str(path), sorted(totals.items(), key=lambda kv: -kv[1])
    return f"no run found ({candidates[0]}/metrics.jsonl); run `kcollapse run` or pass --run-dir", []


def results_table(rows: list[dict], mode: str) -> Table:
    table = Table(title=f"kcollapse bench ({mode}; organism: median of {ORGANISM_SIZE[mode]['repeats']}, real models: "
                        f"median of {REAL_SIZE[mode]['repeats']}; one run, one machine)")
    for col in ("pair", "model", "precision, threads", "unit", "ours", "theirs", "ratio", "target", "check"):
        table.add_column(col, justify="right" if col in ("ours", "theirs", "ratio", "target") else "left")
    for r in rows:
        shown = ""
        if r["target"]:
            shown = f">= {r['target']:.0f}{'%' if r['unit'].startswith('%') else 'x'} {'PASS' if r['passed'] else 'FAIL'}"
            shown = f"[{'green' if r['passed'] else 'red'}]{shown}[/]"
        table.add_row(f"{r['name']}{' / ' + r['format'] if r['format'] else ''} vs {r['baseline']}", r["model"],
                      f"{r['precision']}, {r['threads']} thr", r["unit"], f"{r['ours']:.1f}", f"{r['theirs']:.1f}",
                      f"{r['ratio']:.2f}x", shown, r["check"])
    return table


ORGANISM_SIZE = {"tiny": dict(questions=6, prompts=6, synth=8, synth_reference=8, greedy=8, repeats=1, steps=4),
                 "quick": dict(questions=18, prompts=24, synth=32, synth_reference=32, greedy=16, repeats=3, steps=12),
                 "full": dict(questions=90, prompts=64, synth=128, synth_reference=128, greedy=16, repeats=5, steps=40)}
# a real model: the reference's way runs 4-8 full-vocabulary forwards per question, about a second each at 262k
# tokens on 2 cores, so fewer inputs, one repeat (the same in --quick and full); free text and synthesis fill one of
# our batches (the preset's 32), and the reference's synthesis rate is read on 8 prompts (two of its batches).
# Training: two repeats of 3 - 1 = 2 timed optimizer steps per workload (3 steps x 1 repeat moved by a third
# between two idle runs; the paper's 2,048-token step takes ~20 s, so 40 s are timed per repeat)
REAL_SIZE = dict.fromkeys(("quick", "full"), dict(questions=6, prompts=32, synth=32, synth_reference=8, greedy=4,
                                                  repeats=1, train_repeats=2, steps=3)) | {"tiny": ORGANISM_SIZE["tiny"]}


def bench_command(quick: bool, json_path: Path | None, run_dir: Path | None = None, models: list[str] | None = None,
                  *, _tiny: bool = False) -> list[dict]:
    """The bench: organism rows, then rows for each real model (`models`; by default, on a full bench, the packaged
    models whose weights are installed). A model spec that does not load ends the command before anything runs."""
    from transformers.utils import logging as hf_logging  # deferred: transformers is slow to import

    hf_logging.set_verbosity_error()  # the baselines call model.generate/forward as the reference code does
    console = Console(width=max(Console().width, 150))
    mode = "tiny" if _tiny else "quick" if quick else "full"
    start = time.perf_counter()
    specs = list(models) if models else [] if quick or _tiny else default_real_models()
    real = [pretrained_subject(spec) for spec in specs]  # a bad spec: one error line, nothing measured
    subjects, world = _organisms(_tiny)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for subject in subjects + real:
            size = (REAL_SIZE if subject.pretrained else ORGANISM_SIZE)[mode]
            began = time.perf_counter()
            console.print(f"[dim]{subject.label}: scoring, free text, synthesis, training "
                          f"({torch.get_num_threads()} threads, {subject.precision})[/]")
            inputs = build_inputs(subject, world, size["questions"], size["prompts"], size["synth"])
            rows += bench_scoring(subject, inputs.scoring, size["repeats"])
            rows += bench_free_text(subject, inputs.free_prompts, size["repeats"])
            rows += bench_synthesis(subject, inputs.synth, size["repeats"], size["greedy"], size["synth_reference"])
            rows += bench_training(subject, inputs.train_texts, size["steps"], size.get("train_repeats", size["repeats"]), work,
                                   512 if _tiny else 2048, one_thread=not (quick or subject.pretrained)
                                   or subject.label.startswith("organism"), settle=0.0 if _tiny else 2.0)
            console.print(f"[dim]{subject.label}: {time.perf_counter() - began:.0f} s[/]")

    console.print(results_table(rows, mode))
    judged = [r for r in rows if r["passed"] is not None and r["model"] in {s.label for s in real}]
    if judged:
        console.print(f"real-model targets: {sum(r['passed'] for r in judged)}/{len(judged)} PASS")

    source, phases = run_phases(run_dir)
    ptable = Table(title=f"default experiment wall time by phase: {source}")
    ptable.add_column("phase")
    ptable.add_column("seconds", justify="right")
    ptable.add_column("share", justify="right")
    total = sum(s for _, s in phases)
    for phase, s in phases:
        ptable.add_row(phase, f"{s:.0f}", f"{100 * s / total:.0f}%")
    if not phases:
        ptable.add_row("(none)", "-", "-")
    console.print(ptable)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 1024**2)
    console.print(f"peak memory (RSS) of this bench: {rss:.0f} MiB; wall time {time.perf_counter() - start:.0f} s")
    if json_path is not None:
        atomic_write_json(Path(json_path), [{k: v for k, v in r.items() if k != "check"} for r in rows])
    return rows
