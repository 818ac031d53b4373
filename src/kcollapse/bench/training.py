"""The training pair of `kcollapse bench`: the loop's `finetune` against a plain AdamW loop, in tokens/s and as a
share of the machine's fp32 matmul peak, on each workload a model is trained with (`training_configs`).
"""

from __future__ import annotations

import copy
import gc
import statistics
import time
from pathlib import Path

import torch

from kcollapse import lmloss
from kcollapse.bench.baselines import plain_train_seconds
from kcollapse.bench.subjects import Subject, row
from kcollapse.config import TrainConfig, load_config
from kcollapse.lm import max_positions
from kcollapse.train import finetune, pack


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
                row(subject, "training", "reference", None, tokens_per_step / per_step, tokens_per_step / plain,
                     "tokens/s", f"{where}; end-to-end {long_ * tokens_per_step / t_long:.0f} tok/s, setup {setup:.2f} s",
                     threads=threads, train_config=label, precision=precision),
                row(subject, "training", "reference", None, util, util_plain, "% of fp32 matmul peak",
                     f"{where}; 6 x {n_params / 1e6:.0f}M params x {tokens_per_step} tokens/step: "
                     f"{flop / per_step / 1e9:.1f} of {peak / 1e9:.1f} GFLOP/s", threads=threads,
                     train_config=label, held=held, precision=precision),
            ]
    return rows

