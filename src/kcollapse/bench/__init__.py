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
Here: the inference pairs and the command; `baselines.py` the other ways of working, `subjects.py` the models and
their inputs, `training.py` the training pair.
"""

from __future__ import annotations

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

from kcollapse.bench.baselines import lmeval_scores, one_by_one_answers, reference_scores, reference_synthesis
from kcollapse.bench.subjects import (REAL_TARGETS, Subject, build_inputs, default_real_models, organisms,
                                      pretrained_subject, row)
from kcollapse.bench.training import bench_training
from kcollapse.evaluate.freetext import generate_answers
from kcollapse.evaluate.scoring import score_options
from kcollapse.io import atomic_write_json
from kcollapse.lm import generate

__all__ = ["REAL_TARGETS", "bench_command", "build_inputs", "lmeval_scores", "one_by_one_answers",
           "pretrained_subject", "reference_scores", "reference_synthesis"]

SAME_SCORES = 1e-4  # option scores of ours and of a baseline agree to this relative difference


def _median(fn, repeats: int):
    """(median seconds over `repeats` calls, the last call's result)."""
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


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
            rows.append(row(subject, "scoring", baseline, name, len(prompts) / t_ours, len(prompts) / t_theirs,
                             "questions/s", check))
    return rows


def bench_free_text(subject: Subject, prompts, repeats):
    model, tok, ecfg = subject.model, subject.tokenizer, subject.recipe.eval
    max_new = ecfg.free_text_tokens
    t_theirs, (theirs, n_new) = _median(lambda: one_by_one_answers(model, tok, prompts, max_new), repeats)
    t_ours, ours = _median(lambda: generate_answers(model, tok, prompts, max_new, ecfg.batch_size), repeats)
    same = sum(a == b for a, b in zip(ours, theirs))
    return [row(subject, "free_text", "reference", None, n_new / t_ours, n_new / t_theirs, "new tokens/s",
                 f"{same}/{len(prompts)} answers equal" + ("" if same == len(prompts) else " MISMATCH"))]


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
    return [row(subject, "synthesis", "reference", None, n_ours / t_ours, n_theirs / t_theirs, "new tokens/s",
                 f"greedy {same}/{len(few)} equal" + ("" if same == len(few) else " MISMATCH"))]



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
    subjects, world = organisms(_tiny)
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

