"""`kcollapse bench`: how much faster kcollapse does the same science, measured in one process on this machine.

Why: a knowledge-collapse study scores every generation in four formats and writes thousands of texts per
generation. The paper's code scores one question, one option, one full forward at a time (two forwards per option
in the letter formats); lm-evaluation-harness pads every (context, continuation) pair into batches. Both do the
same work; kcollapse does less (one prompt forward for all letters, a shared prompt for text continuations, the
vocabulary projection only where a token is scored), and batches generation with a KV cache.

What: on the organism model (the cached generation 0 if there is one, else its architecture with random weights:
speed does not depend on training) and on a wider local GPT-2 (6 layers, d=256), on organism benchmark items:
  scoring    reference-style / lm-eval-style vs `score_options`, per format, questions/s (scores must agree 1e-5)
  free_text  batch-1 greedy `generate` per question vs `generate_answers`, new tokens/s (answers compared)
  synthesis  the reference's `model.generate` on batches of 4, sampling, vs ours (`sampling.batch_size`), new tokens/s
  training   `finetune` (the Trainer path the loop ships), steady-state tokens/s vs a plain AdamW loop; and the
             achieved FLOP/s (6 x params x tokens / s) as a share of a large fp32 `torch.matmul` (utilisation); at
             one thread (each arm worker of the default experiment) and at every core (generation 0)
Every figure is the median of several repeats; compare ratios only within one run (shared machines are noisy).
Also printed: a run's wall time per phase (its `seconds_*` metrics) and this process's peak RSS.
"""

from __future__ import annotations

import copy
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from kcollapse import corpus as corpus_mod
from kcollapse import organism
from kcollapse.config import PAPER_FORMATS, CorpusConfig, EvalConfig, OrganismConfig, load_config
from kcollapse.evaluate import build_prompts, load_benchmark
from kcollapse.evaluate import benchmark as bmk
from kcollapse.evaluate.formats import get_format, option_targets
from kcollapse.evaluate.freetext import first_line, generate_answers, through_first_line
from kcollapse.evaluate.scoring import LETTER, combine, encode_options, score_options
from kcollapse.io import atomic_write_json
from kcollapse.lm import encode, generate, max_positions, newline_ids
from kcollapse.models import load_model
from kcollapse.organism.gen0 import build_model, build_tokenizer, gen0_key, world_texts
from kcollapse.train import finetune, pack

TARGETS = {("scoring", "reference", "letter"): 6.0, ("scoring", "reference", "text"): 3.0,
           ("scoring", "lm-eval", "letter"): 3.0, ("scoring", "lm-eval", "text"): 3.0,
           ("free_text", "reference", None): 5.0, ("synthesis", "reference", None): 4.0}
UTILISATION_TARGET = 50.0  # % of the matmul peak, on the organism


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
    full-vocabulary log-softmax at every position."""
    prompt_ids, conts = encode_options(tokenizer, model, prompts, targets, "reference", answer)
    reqs = [(q, k, prompt_ids[q], c) for q, cs in enumerate(conts) for k, c in enumerate(cs)]
    reqs.sort(key=lambda r: -(len(r[2]) + len(r[3])))
    got = {}
    for start in range(0, len(reqs), batch_size):
        batch = reqs[start : start + batch_size]
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


def plain_train_seconds(model, chunks, batch_size: int, steps: int, lr: float) -> float:
    """Seconds per step of a plain AdamW loop (forward, backward, clip, step) after one warm-up step; the fused
    AdamW kernel, as the Trainer uses, so the pair isolates what the Trainer adds."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, fused=True)
    model.train()
    for s in range(steps + 1):
        if s == 1:
            t0 = time.perf_counter()
        ids = torch.tensor([chunks[(s * batch_size + i) % len(chunks)] for i in range(batch_size)])
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / steps


# ------------------------------------------------------------------------------------------------ inputs
def _models(tiny: bool):
    """[(label, model, tokenizer)]: the organism (cached gen 0 if present) and a wider GPT-2, one tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel  # deferred: transformers is slow to import


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
    models = [(f"{label} {model.num_parameters() / 1e6:.1f}M", model, tok)]
    if not tiny:
        torch.manual_seed(1)
        wide = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=cfg.n_positions, n_embd=256, n_layer=6,
                                          n_head=8, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                          bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                                          pad_token_id=tok.pad_token_id)).eval()
        models.append((f"gpt2 6x256 {wide.num_parameters() / 1e6:.1f}M", wide, tok))
    return models, world


def _inputs(world, tokenizer, n_questions: int, n_prompts: int):
    """{format: prompts, targets} for n_questions organism questions; synthesis prompts as the default recipe's."""
    recipe = load_config(None, [], "default")
    ecfg = EvalConfig(**{**recipe.eval.model_dump(), "limit": max(1, n_questions // 3)})
    items = load_benchmark(ecfg, world.benchmark_path)
    questions = [q for q in items if bmk.is_question(q)][:n_questions]
    pool = bmk.few_shot_pool(items)
    scoring = {}
    for name in PAPER_FORMATS:  # the four the paper evaluates
        fmt = get_format(name)
        scoring[name] = (fmt.answer, build_prompts(fmt, questions, pool, ecfg, tokenizer, False),
                         [option_targets(fmt, q) for q in questions])
    texts = corpus_mod.load_texts(CorpusConfig(path="organism"), world.corpus_path)
    blocks = corpus_mod.make_blocks(tokenizer, texts[: n_prompts * 4], recipe.block_tokens)[:n_prompts]
    synth = [b.ids[: recipe.prompt_tokens] for b in blocks]
    train_texts = [t.text for t in texts[:2000]]
    return recipe, scoring, synth, train_texts


# ------------------------------------------------------------------------------------------------ the pairs
def _row(name, baseline, fmt, model, ours, theirs, unit, check, threads=None):
    ratio = ours / theirs if theirs else float("nan")
    return {"name": name, "baseline": baseline, "format": fmt, "model": model, "ours": ours, "theirs": theirs,
            "ratio": ratio, "unit": unit, "threads": threads or torch.get_num_threads(), "check": check}


def bench_scoring(label, model, tok, scoring, repeats, batch_size):
    rows = []
    for name, (answer, prompts, targets) in scoring.items():
        t_ours, ours = _median(lambda: score_options(model, tok, prompts, targets, scoring="reference",
                                                     answer=answer, batch_size=batch_size), repeats)
        for baseline, fn in (("reference", lambda: reference_scores(model, tok, prompts, targets, answer)),
                             ("lm-eval", lambda: lmeval_scores(model, tok, prompts, targets, answer))):
            t_theirs, theirs = _median(fn, repeats)
            diff = max(abs(a - b) for o, t in zip(ours, theirs) for a, b in zip(o["scores"], t["scores"]))
            same = all(o["is_greedy"] == t["is_greedy"] and o["predicted_index"] == t["predicted_index"]
                       for o, t in zip(ours, theirs))
            check = f"max|d|={diff:.0e}" + ("" if diff <= 1e-5 and same else " MISMATCH")
            rows.append(_row("scoring", baseline, name, label, len(prompts) / t_ours, len(prompts) / t_theirs,
                             "questions/s", check))
    return rows


def bench_free_text(label, model, tok, prompts, max_new, repeats, batch_size):
    t_theirs, (theirs, n_new) = _median(lambda: one_by_one_answers(model, tok, prompts, max_new), repeats)
    t_ours, ours = _median(lambda: generate_answers(model, tok, prompts, max_new, batch_size), repeats)
    same = sum(a == b for a, b in zip(ours, theirs))
    return [_row("free_text", "reference", None, label, n_new / t_ours, n_new / t_theirs, "new tokens/s",
                 f"{same}/{len(prompts)} answers equal")]


def reference_synthesis(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, sampling, do_sample=True,
                        batch_size: int = 4) -> list[str]:
    """The paper's way: `model.generate` on batches of 4 prompts (equal-length token prompts: no padding)."""
    texts = []
    for start in range(0, len(prompts), batch_size):
        ids = torch.tensor(prompts[start : start + batch_size])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=do_sample, temperature=sampling.temperature, top_p=sampling.top_p,
                                 top_k=sampling.top_k, repetition_penalty=sampling.repetition_penalty,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        texts += tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
    return texts


def bench_synthesis(label, model, tok, prompts, recipe, repeats):
    s = recipe.sampling

    def n_tokens(texts):
        return sum(map(len, tok(texts, add_special_tokens=False)["input_ids"]))

    def ours(sample=True, some=prompts):
        return generate(model, tok, some, recipe.new_tokens, do_sample=sample, temperature=s.temperature,
                        top_p=s.top_p, top_k=s.top_k, repetition_penalty=s.repetition_penalty, batch_size=s.batch_size)

    t_theirs, theirs = _median(lambda: reference_synthesis(model, tok, prompts, recipe.new_tokens, s), repeats)
    t_ours, texts = _median(lambda: ours(), repeats)
    n_theirs, n_ours = n_tokens(theirs), n_tokens(texts)
    few = prompts[:16]  # same numbers: greedy texts of the reference's way and of ours agree
    same = sum(a == b for a, b in zip(reference_synthesis(model, tok, few, recipe.new_tokens, s, do_sample=False),
                                      ours(False, few)))
    return [_row("synthesis", "reference", None, label, n_ours / t_ours, n_theirs / t_theirs, "new tokens/s",
                 f"greedy {same}/{len(few)} equal")]


def bench_training(label, model, tok, texts, recipe, steps, repeats, work_dir, peak_n: int = 2048, one_thread=True):
    """Steady-state finetune tokens/s and utilisation, at one thread (how each arm worker of the default experiment
    trains) and at every core (how generation 0 trains). Each repeat times two runs that differ only in max_steps
    (setup cost cancels) and the matmul peak right before and after them, so a noisy neighbour moves both sides of
    its ratio alike; the medians over repeats are reported."""
    tcfg = recipe.train
    tokens_per_step = tcfg.batch_size * tcfg.grad_accum * tcfg.chunk_tokens
    chunks = pack(tok, texts, tcfg.chunk_tokens)
    flop = 6 * model.num_parameters() * tokens_per_step
    short, long_ = max(1, steps // 4), steps
    a, b = torch.randn(peak_n, peak_n), torch.randn(peak_n, peak_n)

    def run(n):
        cfg = tcfg.model_copy(update={"max_steps": n})
        t0 = time.perf_counter()
        finetune(copy.deepcopy(model), tok, texts, cfg, seed=0, work_dir=Path(work_dir) / "trainer")
        return time.perf_counter() - t0

    def matmul():
        t0 = time.perf_counter()
        torch.matmul(a, b)
        return 2 * peak_n**3 / (time.perf_counter() - t0)

    rows, cores = [], torch.get_num_threads()
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
                plain = plain_train_seconds(copy.deepcopy(model), chunks, tcfg.batch_size * tcfg.grad_accum,
                                            long_ - short, tcfg.lr)
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
        role = "an arm worker" if threads == 1 and cores > 1 else "generation 0" if threads == cores else ""
        where = f"{threads} thread{'s' if threads > 1 else ''}" + (f" ({role})" if role else "")
        rows += [
            _row("training", "reference", None, label, tokens_per_step / per_step, tokens_per_step / plain,
                 "tokens/s", f"{where}; end-to-end {long_ * tokens_per_step / t_long:.0f} tok/s, setup {setup:.2f} s",
                 threads=threads),
            _row("training", "reference", None, label, util, util_plain, "% of fp32 matmul peak",
                 f"{where}; {flop / per_step / 1e9:.1f} of {peak / 1e9:.1f} GFLOP/s", threads=threads),
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


def bench_command(quick: bool, json_path: Path | None, run_dir: Path | None = None, *, _tiny: bool = False) -> list[dict]:
    from transformers.utils import logging as hf_logging  # deferred: transformers is slow to import

    hf_logging.set_verbosity_error()  # the baselines call model.generate/forward as the reference code does
    console = Console(width=max(Console().width, 150))
    size = (dict(questions=6, prompts=6, synth=8, repeats=1, steps=4) if _tiny else
            dict(questions=18, prompts=24, synth=32, repeats=3, steps=12) if quick else
            dict(questions=90, prompts=64, synth=128, repeats=5, steps=40))
    start = time.perf_counter()
    models, world = _models(_tiny)
    recipe, scoring, synth, train_texts = _inputs(world, models[0][2], size["questions"], size["synth"])
    free_prompts = scoring["multiple_choice"][1][: size["prompts"]]
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for label, model, tok in models:
            console.print(f"[dim]{label}: scoring, free text, synthesis, training ({torch.get_num_threads()} threads)[/]")
            rows += bench_scoring(label, model, tok, scoring, size["repeats"], recipe.eval.batch_size)
            rows += bench_free_text(label, model, tok, free_prompts, recipe.eval.free_text_tokens, size["repeats"],
                                    recipe.eval.batch_size)
            rows += bench_synthesis(label, model, tok, synth, recipe, size["repeats"])
            rows += bench_training(label, model, tok, train_texts, recipe, size["steps"], size["repeats"], work,
                                   512 if _tiny else 2048, one_thread=not quick or label.startswith("organism"))

    table = Table(title=f"kcollapse bench ({'quick' if quick else 'full'}; median of {size['repeats']}; "
                        f"{torch.get_num_threads()} threads; one run, one machine)")
    for col in ("pair", "model", "unit", "ours", "theirs", "ratio", "target", "check"):
        table.add_column(col, justify="right" if col in ("ours", "theirs", "ratio", "target") else "left")
    for r in rows:
        kind = "letter" if r["format"] and scoring[r["format"]][0] == "letter" else "text" if r["format"] else None
        target = TARGETS.get((r["name"], r["baseline"], kind))
        if r["unit"].startswith("%"):
            target = UTILISATION_TARGET if r["model"].startswith("organism") else None
            ok = r["ours"] >= target if target else None
            shown = f">= {target:.0f}%" if target else ""
        else:
            ok = r["ratio"] >= target if target else None
            shown = f">= {target:.0f}x" if target else ""
        colour = "" if ok is None else "green" if ok else "red"
        threads = f" ({r['threads']} thr)" if r["name"] == "training" else ""
        table.add_row(f"{r['name']}{' / ' + r['format'] if r['format'] else ''} vs {r['baseline']}{threads}", r["model"],
                      r["unit"], f"{r['ours']:.1f}", f"{r['theirs']:.1f}",
                      f"[{colour}]{r['ratio']:.2f}x[/]" if colour else f"{r['ratio']:.2f}x", shown, r["check"])
    console.print(table)

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
        atomic_write_json(Path(json_path), [{k: r[k] for k in ("name", "baseline", "format", "model", "ours", "theirs",
                                                               "ratio", "unit", "threads")} for r in rows])
    return rows
