"""The recursive loop: generation after generation, each arm trains on text its previous generation wrote.

    gen 0 model --evaluate--> baseline (shared by every arm)
    for each arm, for g = 1..N:
        synthesize  draw blocks; keep (1-alpha) real, let model g-1 continue the rest    -> synthetic.jsonl
        train       fine-tune model g-1 on this mix (replace), on all mixes (accumulate), on a sample of all
                    mixes the size of one (accumulate_subsample)                           -> model/
        evaluate    model-centric and task-centric metrics                               -> metrics.jsonl

Every step writes its result atomically and is skipped when its result exists, so re-running the same command
on a killed run resumes after the last finished step, with the same numbers (each step's randomness is seeded
from the config seed, the arm and the generation, never from what ran before in the process).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import random
import shutil
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.markup import escape
from transformers.utils import logging as hf_logging

from kcollapse import corpus as corpus_mod
from kcollapse import organism, provenance, train, workers
from kcollapse.organism import letters
from kcollapse.organism.factcheck import FactChecker
from kcollapse.config import ExperimentConfig
from kcollapse.errors import UserError
from kcollapse.evaluate import evaluate, load_benchmark
from kcollapse.evaluate.textstats import vocabulary
from kcollapse.io import RunLock, atomic_write_json, atomic_write_text, read_jsonl, remove_stale_temp, sanitize_terminal, write_jsonl
from kcollapse.models import load_model, save_model
from kcollapse.pretrained import resolve_model
from kcollapse.progress import make_progress
from kcollapse.rundir import Run, check_run_dir, collect_metrics, generations_done, write_state
from kcollapse.synthesize import build_mix


def step_seed(seed: int, *parts) -> int:
    """A seed for one step, from the run seed and the step's identity only (so a resumed step draws the same)."""
    digest = hashlib.sha256(repr((seed,) + parts).encode()).hexdigest()
    return int(digest[:8], 16)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("kcollapse", "torch", "transformers", "datasets", "peft", "accelerate", "tokenizers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def write_config(cfg: ExperimentConfig, out: Path, extra: dict) -> None:
    header = "# kcollapse run config: every field resolved. " + " ".join(f"{k}={v}" for k, v in _versions().items())
    atomic_write_text(out / "config.yaml", header + "\n" + yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    run_json = out / "run.json"
    if not run_json.exists():
        atomic_write_json(run_json, {"versions": _versions(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra})


def prepare(cfg: ExperimentConfig):
    """Everything a run needs before it writes a file: the gen-0 model path, texts, benchmark, run.json extras and the
    organism's world (None when the run does not use it). Bad input fails here."""
    extra: dict = {}
    organism_corpus = organism_benchmark = None
    cache, world = organism_world(cfg)
    if world is not None:
        organism_corpus, organism_benchmark = world.corpus_path, world.benchmark_path
        extra["organism_sources"] = world.sources
    for field in ("judge_model", "gibberish_model"):  # loaded only at evaluation: check before anything is written
        path = getattr(cfg.eval, field)
        if path and not Path(path).expanduser().is_dir():
            raise UserError(f"eval.{field}: {path} is not a local model directory")
    texts = corpus_mod.load_texts(cfg.corpus, organism_corpus)
    if cfg.model == "organism" and cfg.corpus.path == "organism" and cfg.organism.letter_skill is not None:
        texts += _letter_pool(cfg, world, len(texts))
    items = load_benchmark(cfg.eval, organism_benchmark)
    extra["inputs"] = provenance.hash_inputs(cfg, organism_corpus, organism_benchmark, texts, items)
    if cfg.model == "organism":
        model_path = organism.ensure_gen0(cfg.organism, cache, world)
    else:  # a .gguf file or a packaged model is converted once to a cached safetensors checkpoint
        model_path = resolve_model(cfg.model, cfg.cache_dir)
    return model_path, texts, items, extra, world


def organism_world(cfg: ExperimentConfig):
    """(cache dir, the organism's world) when the run uses the organism's model, corpus or benchmark, else (None, None)."""
    if not (cfg.model == "organism" or cfg.corpus.path == "organism" or cfg.eval.benchmark == "organism"):
        return None, None
    cache = Path(cfg.cache_dir) if cfg.cache_dir else organism.default_cache_dir()
    return cache, organism.build_world(cfg.organism, cache)  # built once, then read from the cache


def _letter_pool(cfg: ExperimentConfig, world, n_corpus: int) -> list[corpus_mod.Text]:
    """A letter-skilled generation 0 trained on the corpus plus letter texts: the real pool carries both, in its
    training proportions (organism/letters.py), or the control would drift away from generation 0."""
    rng = random.Random(f"organism-letter-pool|{cfg.organism.seed}")
    pairs = letters.real_pool_texts(read_jsonl(world.facts_path), n_corpus, cfg.organism.letter_skill, rng)
    return [corpus_mod.Text(text, domain, whole=True) for text, domain in pairs]


@dataclass
class Setup:
    """What the parent and every arm worker build the same way from the config, before any step runs."""

    model_path: str
    model0: object  # the generation-0 model: the shared baseline, and the reference for perplexity
    tokenizer: object
    items: list[dict]  # benchmark questions
    heldout: list[str]  # texts no generation trains on (perplexity_heldout)
    reference_vocab: set[str]  # the words of the generation-0 training texts (fluency)
    pools: dict  # arm name -> the blocks its generations draw from
    extra: dict  # for run.json
    fact_checker: FactChecker | None  # the synthetic text's claims against the world (an organism-corpus run)


def setup(cfg: ExperimentConfig) -> Setup:
    model_path, texts, items, extra, world = prepare(cfg)
    model0, tokenizer = load_model(model_path, device=cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                                   tokenizer_path=cfg.tokenizer)
    train_texts, heldout = corpus_mod.split_heldout(texts, cfg.corpus, cfg.seed)
    blocks = corpus_mod.make_blocks(tokenizer, train_texts, cfg.block_tokens, cfg.corpus.min_block_tokens)
    pools = {a.name: corpus_mod.arm_pool(blocks, a, tokenizer, cfg.corpus, cfg.block_tokens) for a in cfg.arms}
    checker = FactChecker(read_jsonl(world.facts_path)) if cfg.corpus.path == "organism" else None
    return Setup(str(model_path), model0, tokenizer, items, [t.text for t in heldout],
                 vocabulary([t.text for t in train_texts]), pools, extra, checker)


def run_experiment(cfg: ExperimentConfig, out: str | Path) -> Path:
    """Run (or resume) every arm's generations in OUT; the report is the caller's (`kcollapse run` writes it)."""
    console = Console(stderr=True)
    out = Path(out)
    if cfg.threads:  # otherwise every core: generation 0 trains and evaluates here before the arm workers split them
        torch.set_num_threads(cfg.threads)
    extends = check_run_dir(cfg, out)
    hf_logging.set_verbosity_error()  # e.g. "sequence longer than the model's maximum" while cutting blocks
    start = time.time()
    s = setup(cfg)
    inputs = s.extra.pop("inputs")
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out):
        remove_stale_temp(out)  # what a killed run left half-written
        if not (out / "run.json").exists():  # what the run is made of, as it starts (a resume keeps the record)
            s.extra["provenance"] = provenance.record(cfg, inputs, s.model_path, s.model0)
        for name in provenance.changed_inputs(out, inputs):  # resuming on other data mixes two experiments
            console.print(f"[yellow]warning[/]: {escape(name)} differs from the one this run started with "
                          f"(run.json); `kcollapse verify {escape(str(out))}` lists what changed")
        write_config(cfg, out, s.extra | {"model_path": s.model_path})
        if extends is not None:  # the record follows the config the run now has (`kcollapse verify` checks it)
            provenance.extend_record(out, cfg, extends)
        run = Run(cfg, out)
        runner = Runner(run, s)
        runner.ensure_gen0_checkpoint(s.model_path)
        with make_progress(console) as progress:
            runner.progress = progress
            runner.evaluate_gen0()
            overall = progress.add_task("generations", total=len(cfg.arms) * cfg.generations)
            parallel = min(cfg.parallel_arms, len(cfg.arms))
            if parallel > 1:
                run_arms_in_processes(cfg, out, parallel, progress, overall)
            else:
                for arm in cfg.arms:
                    for g in range(1, cfg.generations + 1):
                        progress.update(overall, description=f"{arm.name} gen {g}/{cfg.generations}")
                        runner.generation(arm, g)
                        progress.advance(overall)
        collect_metrics(run)
        write_state(run, done=True)
        provenance.update_run_json(out, finished=provenance.now())
    console.print(f"[bold green]done[/] in {time.time() - start:.0f} s: {escape(sanitize_terminal(str(out)))}/metrics.jsonl")
    return out


def arm_worker(cfg_data: dict, out: str, arm_name: str, threads: int) -> str:
    """One arm's generations in a worker process (workers.run_in_processes)."""
    torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()
    cfg = ExperimentConfig.model_validate(cfg_data)
    runner = Runner(Run(cfg, Path(out)), setup(cfg))
    runner.collect_each_step = False  # the parent collects; workers would race each other rewriting metrics.jsonl
    arm = next(a for a in cfg.arms if a.name == arm_name)
    for g in range(1, cfg.generations + 1):
        runner.generation(arm, g)
    return arm_name


def run_arms_in_processes(cfg: ExperimentConfig, out: Path, parallel: int, progress, overall) -> None:
    run = Run(cfg, out)
    threads = cfg.threads or workers.threads_per_worker(parallel)
    total, last = len(cfg.arms) * cfg.generations, [-1]
    progress.update(overall, description=f"{len(cfg.arms)} arms, {parallel} at once")

    def watch():
        finished = sum(map(len, generations_done(run).values()))
        if finished != last[0]:
            last[0] = finished
            progress.update(overall, completed=finished)
            collect_metrics(run)
            write_state(run, done=False)

    jobs = [(cfg.model_dump(mode="json"), str(out), a.name, threads) for a in cfg.arms]
    workers.run_in_processes(arm_worker, jobs, parallel, watch)
    if last[0] != total:
        raise RuntimeError(f"arm workers finished {last[0]} of {total} generations")


class StepLog:
    """A generation's steps: each is skipped when its output exists, else run and timed; the seconds (and other
    numbers) go to gen_<g>/step.json, which outlives a resume, and become the generation's metric rows."""

    def __init__(self, path: Path):
        self.path = path
        self.numbers: dict = json.loads(path.read_text()) if path.exists() else {}

    def run(self, name: str, output: Path, work) -> None:
        if output.exists():
            return
        t0 = time.time()
        work()  # writes `output` atomically
        self.numbers[f"seconds_{name}"] = time.time() - t0
        atomic_write_json(self.path, self.numbers)


class Runner:
    """What one run holds in memory across generations: the setup, and the current model of the arm in hand."""

    def __init__(self, run: Run, s: Setup):
        self.run, self.cfg, self.s = run, run.cfg, s
        self.tokenizer = s.tokenizer
        self.progress = None
        self.collect_each_step = True  # rebuild RUN_DIR/metrics.jsonl after every generation
        self.current: dict[str, tuple] = {}  # arm -> (generation, model) held in memory
        self._mixes: tuple = (None, [])  # ((arm, generation), its training mixes) once read

    # -- generation 0 --------------------------------------------------------------------------------------
    def ensure_gen0_checkpoint(self, model_path) -> None:
        """A local gen-0 checkpoint is copied into the run so the run directory is self-contained."""
        target = self.run.model_dir("-", 0)
        if target.exists():
            return
        src = Path(str(model_path))
        if src.is_dir() and sum(f.stat().st_size for f in src.rglob("*") if f.is_file()) < 200e6:
            tmp = target.with_name(".model.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp)
            os.replace(tmp, target)
        else:  # a hub model or a big local one: refer to it instead of copying gigabytes
            atomic_write_text(target.with_name("model_path.txt"), str(model_path) + "\n")

    def evaluate_gen0(self) -> None:
        gen0 = self.run.out / "gen_0"
        if not (gen0 / "metrics.jsonl").exists():
            mark_time(gen0, "started")
            t0 = time.time()
            rows = self._evaluate(self.s.model0, gen0 / "answers", own=None)
            rows.append(_row("seconds_eval", time.time() - t0))
            write_jsonl(gen0 / "metrics.jsonl", rows)
            mark_time(gen0, "finished")
        for arm in self.cfg.arms:  # generation 0 appears in every arm's curves
            answers = self.run.gen_dir(arm.name, 0) / "answers"
            if not answers.exists() and (gen0 / "answers").exists():
                shutil.copytree(gen0 / "answers", answers.with_name(".answers.tmp"), dirs_exist_ok=True)
                os.replace(answers.with_name(".answers.tmp"), answers)

    # -- one generation of one arm -------------------------------------------------------------------------
    def generation(self, arm, g: int) -> None:
        """synthesize -> train -> evaluate, each step skipped when its output exists (a resumed run)."""
        gdir = self.run.gen_dir(arm.name, g)
        if (gdir / "metrics.jsonl").exists():
            return
        mark_time(gdir, "started")
        steps = StepLog(gdir / "step.json")
        steps.run("synthesize", self.run.mix_path(arm.name, g), lambda: self.synthesize(arm, g))
        steps.run("train", self.run.model_dir(arm.name, g), lambda: self.train(arm, g))
        self.evaluate(arm, g, steps.numbers)
        mark_time(gdir, "finished")
        self._drop_old_checkpoint(arm.name, g)
        if self.collect_each_step:
            collect_metrics(self.run)
            write_state(self.run, done=False)

    def synthesize(self, arm, g: int) -> None:
        """Draw the generation's blocks; model g-1 continues the synthetic share -> the training mix."""
        blocks = corpus_mod.draw(self.s.pools[arm.name], self.cfg.samples_per_generation,
                                 step_seed(self.cfg.seed, _pool_key(arm), "draw", g))
        mix = build_mix(self.model_for(arm.name, g - 1), self.tokenizer, blocks, arm, self.cfg,
                        step_seed(self.cfg.seed, arm.name, "synth", g), self.progress)
        write_jsonl(self.run.mix_path(arm.name, g), mix)

    def train(self, arm, g: int) -> None:
        """Fine-tune model g-1 on its training texts (training_texts) -> model/."""
        prev = self.model_for(arm.name, g - 1)
        if g == 1:  # training works in place; generation 0 stays the shared baseline and reference
            prev = copy.deepcopy(prev)
        texts = self.training_texts(arm, g)
        work_dir = self.run.gen_dir(arm.name, g) / ".trainer"
        model = train.finetune(prev, self.tokenizer, texts, self.cfg.train, seed=step_seed(self.cfg.seed, arm.name, "train", g),
                               work_dir=work_dir, progress=self.progress)
        shutil.rmtree(work_dir, ignore_errors=True)
        save_model(model, self.tokenizer, self.run.model_dir(arm.name, g))
        self.current = {arm.name: (g, model)}  # one arm's model in memory at a time

    def evaluate(self, arm, g: int, numbers: dict) -> None:
        """Model g's metrics -> gen_<g>/metrics.jsonl (the generation's done-marker), with the steps' numbers."""
        t0 = time.time()
        mixes = self.training_mixes(arm, g)
        texts = self.training_texts(arm, g)
        numbers = {**numbers, "train_texts": len(texts),
                   "train_tokens": sum(map(len, self.tokenizer(texts, add_special_tokens=False)["input_ids"]))}
        rows = self._evaluate(self.model_for(arm.name, g), self.run.gen_dir(arm.name, g) / "answers",
                              own=[r["text"] for r in mixes[-1]],
                              synthetic=[r["text"] for r in mixes[-1] if r["source"] == "synthetic"])
        if self.s.fact_checker is not None and any(r["source"] == "synthetic" for r in mixes[-1]):
            rows += self.s.fact_checker.check(mixes[-1]).rows()
        rows += [_row(k, v) for k, v in numbers.items()] + [_row("seconds_eval", time.time() - t0)]
        write_jsonl(self.run.gen_dir(arm.name, g) / "metrics.jsonl", rows)

    def training_mixes(self, arm, g: int) -> list[list[dict]]:
        """The mixes model g draws its training texts from: its own (replace), or those of generations 1..g
        (accumulate, accumulate_subsample); read once for training and evaluation."""
        if self._mixes[0] != (arm.name, g):
            gens = range(1, g + 1) if arm.mode in ("accumulate", "accumulate_subsample") else [g]
            self._mixes = ((arm.name, g), [read_jsonl(self.run.mix_path(arm.name, k)) for k in gens])
        return self._mixes[1]

    def training_texts(self, arm, g: int) -> list[str]:
        """Every text of the training mixes; for accumulate_subsample a seeded sample of them the size of one
        generation's mix (accumulate at the compute of replace), recorded as [generation, row] pairs in
        gen_<g>/training_sample.json."""
        mixes = self.training_mixes(arm, g)
        if arm.mode != "accumulate_subsample":
            return [r["text"] for mix in mixes for r in mix]
        pooled = [(k, i) for k, mix in enumerate(mixes, 1) for i in range(len(mix))]
        sample = corpus_mod.draw(pooled, len(mixes[-1]), step_seed(self.cfg.seed, arm.name, "subsample", g))
        record = self.run.gen_dir(arm.name, g) / "training_sample.json"
        if not record.exists():
            atomic_write_json(record, {"mode": arm.mode, "pool": len(pooled), "rows": [list(pair) for pair in sample]})
        return [mixes[k - 1][i]["text"] for k, i in sample]

    def model_for(self, arm: str, g: int):
        """Model of generation g for this arm: kept in memory from the last step, or loaded (after a resume)."""
        if g == 0:
            return self.s.model0
        held = self.current.get(arm)
        if held and held[0] == g:
            return held[1]
        model, _ = load_model(self.run.model_dir(arm, g), device=self.cfg.device, dtype=self.cfg.dtype,
                              trust_remote_code=self.cfg.trust_remote_code)
        self.current = {arm: (g, model)}
        return model

    def _drop_old_checkpoint(self, arm: str, g: int) -> None:
        if self.cfg.keep_checkpoints == "first_last" and g > 1:
            shutil.rmtree(self.run.model_dir(arm, g - 1), ignore_errors=True)

    def _evaluate(self, model, answers_dir: Path, own, synthetic=None) -> list[dict]:
        return evaluate(model, self.tokenizer, self.cfg.eval, self.s.items, heldout_texts=self.s.heldout, own_texts=own,
                        synthetic_texts=synthetic, reference_model=self.s.model0, reference_tokenizer=self.tokenizer,
                        reference_vocab=self.s.reference_vocab, answers_dir=answers_dir,
                        use_chat_template=self.cfg.chat.use_template, progress=self.progress)


def _row(metric: str, value: float, fmt=None, subject=None) -> dict:
    return {"metric": metric, "value": float(value), "format": fmt, "subject": subject}


def mark_time(gen_dir: Path, event: str) -> None:
    """Note in GEN_DIR/times.json when a generation started (the first time only: a resume keeps it) or finished;
    provenance.generation_times gathers them into run.json."""
    path = Path(gen_dir) / "times.json"
    times = json.loads(path.read_text()) if path.is_file() else {}
    if event == "started" and "started" in times:
        return
    times[event] = provenance.now()
    atomic_write_json(path, times)


def _pool_key(arm) -> tuple:
    """Arms drawing from the same pool draw the same blocks in a generation (paired comparison across alphas)."""
    return (arm.domain, arm.domain_corpus, tuple(arm.domain_keywords or ()))


