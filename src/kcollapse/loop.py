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
import shutil
import time
from pathlib import Path

import yaml

from kcollapse import corpus as corpus_mod
from kcollapse import provenance
from kcollapse.config import ExperimentConfig, differing_fields, validate
from kcollapse.errors import UserError
from kcollapse.io import RunLock, atomic_write_json, atomic_write_text, read_jsonl, remove_stale_temp, write_jsonl


def step_seed(seed: int, *parts) -> int:
    """A seed for one step, from the run seed and the step's identity only (so a resumed step draws the same)."""
    digest = hashlib.sha256(repr((seed,) + parts).encode()).hexdigest()
    return int(digest[:8], 16)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("kcollapse", "torch", "transformers", "datasets", "peft", "accelerate", "tokenizers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


class Run:
    """Paths and resources of one run directory."""

    def __init__(self, cfg: ExperimentConfig, out: Path):
        self.cfg, self.out = cfg, Path(out)

    def gen_dir(self, arm: str, g: int) -> Path:
        return self.out / "arms" / arm / f"gen_{g}"

    def model_dir(self, arm: str, g: int) -> Path:
        return self.out / "gen_0" / "model" if g == 0 else self.gen_dir(arm, g) / "model"


def check_run_dir(cfg: ExperimentConfig, out: Path) -> None:
    """Refuse a file, or a run directory made with another config (naming the fields that differ)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; expected a run directory")
    saved = out / "config.yaml"
    if saved.is_file():
        old = validate(yaml.safe_load(saved.read_text()) or {}, str(saved)).model_dump(mode="json")
        diff = differing_fields(old, cfg.model_dump(mode="json"))
        if diff:
            raise UserError(f"{out} was made with a different config ({', '.join(diff[:6])}{' ...' if len(diff) > 6 else ''} "
                            "differ); use a new --out or the same config")


def write_config(cfg: ExperimentConfig, out: Path, extra: dict) -> None:
    header = "# kcollapse run config: every field resolved. " + " ".join(f"{k}={v}" for k, v in _versions().items())
    atomic_write_text(out / "config.yaml", header + "\n" + yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    run_json = out / "run.json"
    if not run_json.exists():
        atomic_write_json(run_json, {"versions": _versions(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra})


def prepare(cfg: ExperimentConfig):
    """Everything a run needs before it writes a file: the gen-0 model path, texts, benchmark. Bad input fails here."""
    from kcollapse.evaluate import load_benchmark

    extra: dict = {}
    organism_corpus = organism_benchmark = None
    needs_world = cfg.model == "organism" or cfg.corpus.path == "organism" or cfg.eval.benchmark == "organism"
    if needs_world:
        from kcollapse import organism

        cache = Path(cfg.cache_dir) if cfg.cache_dir else organism.default_cache_dir()
        world = organism.build_world(cfg.organism, cache)
        organism_corpus, organism_benchmark = world.corpus_path, world.benchmark_path
        extra["organism_sources"] = world.sources
    for field in ("judge_model", "gibberish_model"):  # loaded only at evaluation: check before anything is written
        path = getattr(cfg.eval, field)
        if path and not Path(path).expanduser().is_dir():
            raise UserError(f"eval.{field}: {path} is not a local model directory")
    texts = corpus_mod.load_texts(cfg.corpus, organism_corpus)
    items = load_benchmark(cfg.eval, organism_benchmark)
    extra["inputs"] = provenance.hash_inputs(cfg, organism_corpus, organism_benchmark, texts, items)
    if cfg.model == "organism":
        model_path = organism.ensure_gen0(cfg.organism, cache, world)
    else:
        model_path = cfg.model
    return model_path, texts, items, extra


def _load(cfg: ExperimentConfig):
    """Model, tokenizer, texts and arm pools: what the parent and every arm worker build the same way."""
    model_path, texts, items, extra = prepare(cfg)
    from kcollapse.models import load_model

    model0, tokenizer = load_model(model_path, device=cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                                   tokenizer_path=cfg.tokenizer)
    train_texts, heldout = corpus_mod.split_heldout(texts, cfg.corpus, cfg.seed)
    blocks = corpus_mod.make_blocks(tokenizer, train_texts, cfg.block_tokens)
    pools = {a.name: corpus_mod.arm_pool(blocks, a, tokenizer, cfg.corpus, cfg.block_tokens) for a in cfg.arms}
    return model_path, model0, tokenizer, items, heldout, train_texts, pools, extra


def run_experiment(cfg: ExperimentConfig, out: str | Path) -> Path:
    from rich.console import Console
    from rich.markup import escape

    console = Console(stderr=True)
    out = Path(out)
    parallel = min(cfg.parallel_arms, len(cfg.arms))
    if cfg.threads:  # otherwise every core: generation 0 trains and evaluates here before the arm workers split them
        import torch

        torch.set_num_threads(cfg.threads)
    check_run_dir(cfg, out)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # e.g. "sequence longer than the model's maximum" while cutting blocks
    start = time.time()
    model_path, model0, tokenizer, items, heldout, train_texts, pools, extra = _load(cfg)
    inputs = extra.pop("inputs")
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out):
        remove_stale_temp(out)  # what a killed run left half-written
        if not (out / "run.json").exists():  # what the run is made of, as it starts (a resume keeps the record)
            extra["provenance"] = provenance.record(cfg, inputs, model_path, model0)
        for name in provenance.changed_inputs(out, inputs):  # resuming on other data mixes two experiments
            console.print(f"[yellow]warning[/]: {escape(name)} differs from the one this run started with "
                          f"(run.json); `kcollapse verify {escape(str(out))}` lists what changed")
        write_config(cfg, out, extra | {"model_path": str(model_path)})
        run = Run(cfg, out)
        ctx = Context(run, model0, tokenizer, items, [t.text for t in heldout], train_texts)
        ctx.ensure_gen0_checkpoint(model_path)
        from kcollapse.progress import make_progress

        with make_progress(console) as progress:
            ctx.progress = progress
            ctx.evaluate_gen0()
            overall = progress.add_task("generations", total=len(cfg.arms) * cfg.generations)
            if parallel > 1:
                _run_arms_in_processes(cfg, out, parallel, progress, overall)
            else:
                for arm in cfg.arms:
                    for g in range(1, cfg.generations + 1):
                        progress.update(overall, description=f"{arm.name} gen {g}/{cfg.generations}")
                        ctx.generation(arm, g, pools[arm.name])
                        progress.advance(overall)
        collect_metrics(run)
        _write_state(run, done=True)
        provenance.update_run_json(out, finished=provenance.now())
        from kcollapse.report import write_report

        try:
            write_report(out)
        except Exception as e:  # the run's results are complete and safe; a report can be redone
            console.print(f"[yellow]warning[/]: report not written ({type(e).__name__}: {escape(str(e))[:200]}); "
                          f"run `kcollapse report {escape(str(out))}`")
    from kcollapse.io import sanitize_terminal

    console.print(f"[bold green]done[/] in {time.time() - start:.0f} s: {escape(sanitize_terminal(str(out)))}/metrics.jsonl")
    return out


# -- arms in parallel processes ------------------------------------------------------------------------------
# On a small CPU, two single-threaded processes beat one two-threaded process (a tiny model's ops are too small
# to split well across threads). Arms are independent after generation 0, so `parallel_arms: N` hands them to N
# spawned worker processes, one arm at a time each. Every step is seeded from (seed, arm, generation) alone and
# written atomically, so what a worker computes does not depend on the scheduling, and resume works unchanged.

def _threads_per_worker(parallel: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // parallel)


def _die_with_parent() -> None:
    """Workers get SIGKILL when the parent dies (Linux), so a killed run leaves no orphan writing into RUN_DIR."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _arm_worker(cfg_data: dict, out: str, arm_name: str, threads: int) -> str:
    _die_with_parent()
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()
    cfg = ExperimentConfig.model_validate(cfg_data)
    _, model0, tokenizer, items, heldout, train_texts, pools, _ = _load(cfg)
    ctx = Context(Run(cfg, Path(out)), model0, tokenizer, items, [t.text for t in heldout], train_texts)
    ctx.collect_each_step = False  # the parent collects; workers would race each other rewriting metrics.jsonl
    arm = next(a for a in cfg.arms if a.name == arm_name)
    for g in range(1, cfg.generations + 1):
        ctx.generation(arm, g, pools[arm.name])
    return arm_name


def _run_arms_in_processes(cfg: ExperimentConfig, out: Path, parallel: int, progress, overall) -> None:
    import multiprocessing

    run = Run(cfg, out)
    threads = cfg.threads or _threads_per_worker(parallel)
    total, last = len(cfg.arms) * cfg.generations, -1
    progress.update(overall, description=f"{len(cfg.arms)} arms, {parallel} at once")
    pool = multiprocessing.get_context("spawn").Pool(parallel)
    try:
        jobs = [pool.apply_async(_arm_worker, (cfg.model_dump(mode="json"), str(out), a.name, threads)) for a in cfg.arms]
        while True:
            all_done = all(job.ready() for job in jobs)  # before counting files: a late finish is counted below
            for job in jobs:
                if job.ready():
                    job.get()  # a worker's error (e.g. a UserError) surfaces here, in the parent
            finished = sum(map(len, generations_done(run).values()))
            if finished != last:
                last = finished
                progress.update(overall, completed=finished)
                collect_metrics(run)
                _write_state(run, done=False)
            if all_done:
                break
            time.sleep(0.5)
        pool.close()
    finally:
        pool.terminate()  # on an error or Ctrl-C no worker goes on writing
        pool.join()
    if last != total:
        raise RuntimeError(f"arm workers finished {last} of {total} generations")


class Context:
    """What one run holds in memory across generations: the current model per arm, the tokenizer, eval data."""

    def __init__(self, run: Run, model0, tokenizer, items, heldout_texts, train_texts):
        self.run, self.cfg = run, run.cfg
        self.model0, self.tokenizer, self.items = model0, tokenizer, items
        self.heldout_texts = heldout_texts
        from kcollapse.evaluate.textstats import vocabulary

        self.reference_vocab = vocabulary([t.text for t in train_texts])  # fluency = share of words known at gen 0
        self.progress = None
        self.collect_each_step = True  # rebuild RUN_DIR/metrics.jsonl after every generation
        self.current: dict[str, tuple] = {}  # arm -> (generation, model) held in memory

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
            provenance.mark(gen0, "started")
            t0 = time.time()
            rows = self._evaluate(self.model0, gen0 / "answers", own=None)
            rows.append(_row("seconds_eval", time.time() - t0))
            write_jsonl(gen0 / "metrics.jsonl", rows)
            provenance.mark(gen0, "finished")
        for arm in self.cfg.arms:  # generation 0 appears in every arm's curves
            answers = self.run.gen_dir(arm.name, 0) / "answers"
            if not answers.exists() and (gen0 / "answers").exists():
                shutil.copytree(gen0 / "answers", answers.with_name(".answers.tmp"), dirs_exist_ok=True)
                os.replace(answers.with_name(".answers.tmp"), answers)

    # -- one generation of one arm -------------------------------------------------------------------------
    def generation(self, arm, g: int, pool) -> None:
        gdir = self.run.gen_dir(arm.name, g)
        if (gdir / "metrics.jsonl").exists():
            return
        provenance.mark(gdir, "started")
        timing_path = gdir / "step.json"  # per-step numbers that outlive a resume
        timing = json.loads(timing_path.read_text()) if timing_path.exists() else {}
        mix_path, model_dir = gdir / "synthetic.jsonl", self.run.model_dir(arm.name, g)
        if not mix_path.exists():
            t0 = time.time()
            prev = self.model_for(arm.name, g - 1)
            blocks = corpus_mod.draw(pool, self.cfg.samples_per_generation, step_seed(self.cfg.seed, _pool_key(arm), "draw", g))
            from kcollapse.synthesize import build_mix

            mix = build_mix(prev, self.tokenizer, blocks, arm, self.cfg, step_seed(self.cfg.seed, arm.name, "synth", g), self.progress)
            write_jsonl(mix_path, mix)
            timing["seconds_synthesize"] = time.time() - t0
            atomic_write_json(timing_path, timing)
        if not model_dir.exists():
            t0 = time.time()
            from kcollapse.models import save_model
            from kcollapse.train import finetune

            prev = self.model_for(arm.name, g - 1)
            if g == 1:  # training works in place; generation 0 stays the shared baseline and reference
                prev = copy.deepcopy(prev)
            texts = [r["text"] for r in self.training_mix(arm, g)]
            model = finetune(prev, self.tokenizer, texts, self.cfg.train, seed=step_seed(self.cfg.seed, arm.name, "train", g),
                             work_dir=gdir / ".trainer", progress=self.progress)
            shutil.rmtree(gdir / ".trainer", ignore_errors=True)
            save_model(model, self.tokenizer, model_dir)
            self.current = {arm.name: (g, model)}  # one arm's model in memory at a time
            timing["seconds_train"] = time.time() - t0
            atomic_write_json(timing_path, timing)
        if "train_texts" not in timing:  # counted once here, also after a kill between training and this point
            texts = [r["text"] for r in self.training_mix(arm, g)]
            timing["train_texts"] = len(texts)
            timing["train_tokens"] = sum(map(len, self.tokenizer(texts, add_special_tokens=False)["input_ids"]))
            atomic_write_json(timing_path, timing)
        t0 = time.time()
        model = self.model_for(arm.name, g)
        mix = read_jsonl(mix_path)
        rows = self._evaluate(model, gdir / "answers", own=[r["text"] for r in mix],
                              synthetic=[r["text"] for r in mix if r["source"] == "synthetic"])
        rows += [_row(k, v) for k, v in timing.items()] + [_row("seconds_eval", time.time() - t0)]
        write_jsonl(gdir / "metrics.jsonl", rows)
        provenance.mark(gdir, "finished")
        self._drop_old_checkpoint(arm.name, g)
        if self.collect_each_step:
            collect_metrics(self.run)
            _write_state(self.run, done=False)

    def training_mix(self, arm, g: int) -> list[dict]:
        """What generation g trains on: its own mix (replace, real_only), every mix so far (accumulate), or a
        seeded sample of every mix so far the size of one generation's (accumulate_subsample: compute-matched)."""
        if arm.mode not in ("accumulate", "accumulate_subsample"):
            return read_jsonl(self.run.gen_dir(arm.name, g) / "synthetic.jsonl")
        pooled = [{**r, "generation": k, "row": i} for k in range(1, g + 1)
                  for i, r in enumerate(read_jsonl(self.run.gen_dir(arm.name, k) / "synthetic.jsonl"))]
        if arm.mode == "accumulate":
            return pooled
        size = sum(1 for r in pooled if r["generation"] == g)
        sample = corpus_mod.draw(pooled, size, step_seed(self.cfg.seed, arm.name, "subsample", g))
        record = self.run.gen_dir(arm.name, g) / "training_sample.json"
        if not record.exists():  # which texts trained this generation: [generation, row of its synthetic.jsonl]
            atomic_write_json(record, {"mode": arm.mode, "pool": len(pooled),
                                       "rows": [[r["generation"], r["row"]] for r in sample]})
        return sample

    def model_for(self, arm: str, g: int):
        """Model of generation g for this arm: kept in memory from the last step, or loaded (after a resume)."""
        if g == 0:
            return self.model0
        held = self.current.get(arm)
        if held and held[0] == g:
            return held[1]
        from kcollapse.models import load_model

        model, _ = load_model(self.run.model_dir(arm, g), device=self.cfg.device, dtype=self.cfg.dtype,
                              trust_remote_code=self.cfg.trust_remote_code)
        self.current = {arm: (g, model)}
        return model

    def _drop_old_checkpoint(self, arm: str, g: int) -> None:
        if self.cfg.keep_checkpoints == "first_last" and g > 1:
            shutil.rmtree(self.run.model_dir(arm, g - 1), ignore_errors=True)

    def _evaluate(self, model, answers_dir: Path, own, synthetic=None) -> list[dict]:
        from kcollapse.evaluate import evaluate

        return evaluate(model, self.tokenizer, self.cfg.eval, self.items, heldout_texts=self.heldout_texts, own_texts=own,
                        synthetic_texts=synthetic, reference_model=self.model0, reference_tokenizer=self.tokenizer,
                        reference_vocab=self.reference_vocab, answers_dir=answers_dir,
                        use_chat_template=self.cfg.chat.use_template, progress=self.progress)


def _pool_key(arm) -> tuple:
    """Arms drawing from the same pool draw the same blocks in a generation (paired comparison across alphas)."""
    return (arm.domain, arm.domain_corpus, tuple(arm.domain_keywords or ()))


def _row(metric: str, value: float, fmt=None, subject=None) -> dict:
    return {"metric": metric, "value": float(value), "format": fmt, "subject": subject}


def collect_metrics(run: Run) -> None:
    """Rebuild RUN_DIR/metrics.jsonl from the per-generation files, in a fixed order (idempotent)."""
    rows = []
    gen0 = run.out / "gen_0" / "metrics.jsonl"
    base = read_jsonl(gen0) if gen0.exists() else []
    for arm in run.cfg.arms:
        rows += [{"arm": arm.name, "generation": 0, **r} for r in base]
        for g in range(1, run.cfg.generations + 1):
            path = run.gen_dir(arm.name, g) / "metrics.jsonl"
            if path.exists():
                rows += [{"arm": arm.name, "generation": g, **r} for r in read_jsonl(path)]
    write_jsonl(run.out / "metrics.jsonl", rows)
    provenance.update_run_json(run.out)


def generations_done(run: Run) -> dict[str, list[int]]:
    """arm -> the generations (1..N) whose evaluation is written: the run directory is the record of progress."""
    return {a.name: [g for g in range(1, run.cfg.generations + 1) if (run.gen_dir(a.name, g) / "metrics.jsonl").exists()]
            for a in run.cfg.arms}


def _write_state(run: Run, done: bool) -> None:
    finished = {arm: max(gens, default=0) for arm, gens in generations_done(run).items()}
    atomic_write_json(run.out / "state.json", {"complete": done, "generations_done": finished,
                                                "generations": run.cfg.generations})
