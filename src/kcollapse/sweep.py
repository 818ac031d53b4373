"""`kcollapse sweep`: a grid of configs x seeds, each an ordinary resumable run, as Ray tasks; then the summary.

    kcollapse sweep CONFIG --grid arms.0.synthetic_ratio=0.5,1.0 --seeds 3 [--address ADDR] [--cpus-per-trial K]

Every grid point x seed is a run directory SWEEP/trials/<point>__seed<k>/ (the point named from its grid values,
as Ray Tune names trials: `synthetic_ratio=0.5,lr=0.001`), made by `run_experiment` from
`load_config(CONFIG, overrides=[grid values..., seed=k, threads=K])`. Ray schedules the tasks (locally by default,
all cores; `--address` joins a cluster); there is no scheduler here. The whole grid is validated before anything
starts: a bad value is one error line and nothing is written. Re-running the command keeps finished trials
(state.json says complete) and lets the others resume by themselves. Then SWEEP/summary.csv (one row per trial,
arm and generation), SWEEP/resistance.json (resistance.py per grid point, seeds paired) and SWEEP/report.html.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from kcollapse import figures, resistance
from kcollapse.config import ExperimentConfig, apply_overrides, load_config, validate
from kcollapse.errors import UserError
from kcollapse.io import atomic_write_json, atomic_write_text
from kcollapse.pages import img, page, render
from kcollapse.report import report_after_run, resistance_section
from kcollapse.rundir import check_out, check_run_dir, load_metrics
from kcollapse.tables import resistance_lines


@dataclass
class Trial:
    name: str
    point: str
    values: dict  # grid key -> value as given
    seed: int
    cfg: ExperimentConfig = field(repr=False)
    dir: Path
    overrides: list[str] = field(default_factory=list)


def parse_grid(grid: list[str]) -> list[tuple[str, list[str]]]:
    """['key.path=v1,v2', ...] -> [(key, [v1, v2])]; commas inside [] or {} belong to the value."""
    out = []
    for item in grid:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--grid {item}: expected key.path=v1,v2,...")
        values, depth, cur = [], 0, ""
        for ch in raw:
            depth += (ch in "[{") - (ch in "]}")
            if ch == "," and depth == 0:
                values.append(cur.strip())
                cur = ""
            else:
                cur += ch
        values.append(cur.strip())
        if any(v == "" for v in values):
            raise UserError(f"--grid {item}: an empty value; expected key.path=v1,v2,...")
        if key in [k for k, _ in out]:
            raise UserError(f"--grid {key}: given twice; put all its values in one --grid")
        if key == "seed":
            raise UserError("--grid seed: use --seeds N (seeds are paired across grid points)")
        out.append((key, values))
    return out


def _point_name(values: dict) -> str:
    if not values:
        return "base"
    leaves = [k.rsplit(".", 1)[-1] for k in values]
    labels = [leaf if leaves.count(leaf) == 1 else k for leaf, k in zip(leaves, values)]
    return ",".join(f"{label}={re.sub(r'[^A-Za-z0-9._-]+', '_', str(v)).strip('_') or '_'}"
                    for label, v in zip(labels, values.values()))


def plan(config: Path, grid: list[str], seeds: int, cpus_per_trial: int, out: Path) -> list[Trial]:
    """Every trial's config, validated; nothing is written."""
    if seeds < 1:
        raise UserError(f"--seeds {seeds}: expected 1 or more")
    if cpus_per_trial < 1:
        raise UserError(f"--cpus-per-trial {cpus_per_trial}: expected 1 or more")
    check_out(out, "sweep directory")
    axes = parse_grid(grid)
    load_config(config)  # the base config's own errors first, named as such
    trials, names = [], {}
    for combo in itertools.product(*[values for _, values in axes]):
        values = {k: v for (k, _), v in zip(axes, combo)}
        point = _point_name(values)
        if names.setdefault(point, combo) != combo:
            raise UserError(f"--grid: values {names[point]} and {combo} give the same trial name '{point}'")
        for k in range(seeds):
            overrides = [f"{key}={v}" for key, v in values.items()] + [f"seed={k}", f"threads={cpus_per_trial}",
                                                                  "parallel_arms=1"]  # Ray owns the CPUs
            try:
                cfg = load_config(config, overrides=overrides)
            except UserError as e:
                raise UserError(f"--grid {point}: {str(e).removeprefix('--set').lstrip(': ')}") from None
            trial = Trial(f"{point}__seed{k}", point, values, k, cfg, out / "trials" / f"{point}__seed{k}", overrides)
            try:
                check_run_dir(cfg, trial.dir)
            except UserError as e:
                raise UserError(f"trial {trial.name}: {e}") from None
            trials.append(trial)
    return trials


def finished(trial_dir: Path, generations: int | None = None) -> bool:
    """The trial's run is complete (with `generations`: that many, so a sweep asked for more extends it)."""
    try:
        state = json.loads((Path(trial_dir) / "state.json").read_text())
    except (OSError, ValueError):
        return False
    return state.get("complete") is True and (generations is None or state.get("generations", 0) >= generations)


def run_trial(cfg: ExperimentConfig, trial_dir: str, cwd: str) -> str:
    """One Ray task: an ordinary run (resumes by itself), from the driver's working directory."""
    import torch  # deferred (with the loop): a sweep's planning and summary need neither

    from kcollapse.loop import run_experiment  # deferred: pulls in torch

    if os.path.isdir(cwd):  # relative paths in the config mean what they mean for the user
        os.chdir(cwd)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_experiment(cfg, trial_dir)
    report_after_run(trial_dir)
    return trial_dir


def warm_organism(cfg: ExperimentConfig, threads: int) -> str:
    """One Ray task per organism config before the trials: the world and its gen-0 model are built once, not by
    every trial at the same time into the same cache."""
    import torch  # deferred: torch is slow to import

    from kcollapse import organism  # deferred: pulls in torch
    from kcollapse.loop import organism_world  # deferred: pulls in torch

    torch.set_num_threads(threads)

    cache, world = organism_world(cfg)
    return str(organism.ensure_gen0(cfg.organism, cache, world))


def run_on_ray(trials: list[Trial], address: str | None, cpus_per_trial: int, before_start=None) -> list[tuple[Trial, str]]:
    """Submit the unfinished trials as Ray tasks and wait; (trial, error line) of those that failed."""
    try:
        import ray  # deferred: ray is slow to import
    except ImportError:
        raise UserError("kcollapse sweep needs Ray: pip install 'kcollapse[sweep]'") from None
    started = not ray.is_initialized()
    if started:
        if not address:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
        else:
            try:
                ray.init(address=address)
            except Exception as e:  # unreachable, malformed, version mismatch: all the user's to fix
                first = (str(e).strip().splitlines() or [""])[0][:120]
                raise UserError(f"--address {address}: cannot join a Ray cluster ({type(e).__name__}: {first})") from None
    pending, failures = {}, []
    try:
        cpus = ray.cluster_resources().get("CPU", 0)
        node_cpus = max([n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")] or [0])
        if cpus_per_trial > node_cpus:  # a task must fit on one node, or it waits forever
            raise UserError(f"--cpus-per-trial {cpus_per_trial}: the largest Ray node has {node_cpus:g} CPUs")
        gpus = ray.cluster_resources().get("GPU", 0)
        if before_start:
            before_start(cpus)
        warm = {(t.cfg.organism.model_dump_json(), t.cfg.cache_dir): t.cfg for t in trials if t.cfg.model == "organism"}
        try:
            n = max(cpus_per_trial, int(min(node_cpus, cpus // max(1, len(warm)))))
            ray.get([ray.remote(warm_organism).options(num_cpus=n).remote(c, n) for c in warm.values()])
        except ray.exceptions.RayTaskError as e:
            raise (e.cause if isinstance(e.cause, UserError) else e) from None
        task = ray.remote(run_trial)
        for t in trials:
            opts = {"num_cpus": cpus_per_trial, "num_gpus": 1 if gpus and t.cfg.device != "cpu" else 0}
            pending[task.options(**opts).remote(t.cfg, str(t.dir.resolve()), os.getcwd())] = t
        n = len(pending)
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            t = pending.pop(ref)
            try:
                ray.get(ref)
                print(f"trial {t.name}: done ({n - len(pending)}/{n})", flush=True)
            except ray.exceptions.RayError as e:
                cause = getattr(e, "cause", None) or e
                line = (str(cause).strip().splitlines() or [""])[0][:300]
                line = line if isinstance(cause, UserError) else f"{type(cause).__name__}: {line}"
                failures.append((t, line))
                print(f"trial {t.name}: FAILED: {line[:300]}", flush=True)
    finally:
        for ref in pending:  # interrupted: stop what still runs (the runs resume next time)
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()
    return failures


# ------------------------------------------------------------------------------------------------ summary

MODEL_METRICS = ["perplexity_heldout", "entropy", "distinct_1", "distinct_2", "repetition_rate",
                 "synthetic_fact_error", "synthetic_letter_mismatch", "train_tokens"]  # fact check: organism corpus


def summary_frame(trials: list[Trial]) -> pd.DataFrame:
    """One row per trial x arm x generation: grid values, seed, accuracy per format (all questions, held-out split,
    each arm domain's subject) and the model-centric metrics."""
    frames = []
    for t in trials:
        if not (t.dir / "metrics.jsonl").is_file():
            continue
        try:
            m = load_metrics(t.dir)
        except UserError:  # a trial killed before its first row: nothing to summarise yet
            continue
        domains = sorted({a.domain for a in t.cfg.arms if a.domain})
        acc = m[(m.metric == "accuracy") & m.format.notna()]
        cols = [(acc.subject.isna(), "accuracy/"), (acc.subject == "split:heldout", "accuracy_heldout/")]
        cols += [(acc.subject == d, f"accuracy_{d}/") for d in domains]
        parts = [acc[sel].assign(column=prefix + acc[sel].format) for sel, prefix in cols]
        model = m[m.metric.isin(MODEL_METRICS) & m.format.isna() & m.subject.isna()]
        parts.append(model.assign(column=model.metric))
        wide = pd.concat(parts).pivot_table(index=["arm", "generation"], columns="column", values="value", aggfunc="last")
        wide = wide.reset_index()
        arms = {a.name: a for a in t.cfg.arms}
        head = {"trial": t.name, **{k: yaml.safe_load(v) for k, v in t.values.items()}, "seed": t.seed,
                "complete": finished(t.dir, t.cfg.generations)}
        wide.insert(1, "domain", [arms[a].domain if a in arms else None for a in wide.arm])
        wide.insert(1, "synthetic_ratio", [arms[a].synthetic_ratio if a in arms else None for a in wide.arm])
        for i, (k, v) in enumerate(head.items()):
            wide.insert(i, k, [v] * len(wide))
        frames.append(wide)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["trial", "seed", "arm", "generation"])


def resistance_by_point(trials: list[Trial], **kw) -> dict:
    """resistance.summarise over each grid point's seeds (paired: each trial holds both arms)."""
    points: dict[str, list[Trial]] = {}
    for t in trials:
        if (t.dir / "metrics.jsonl").is_file():
            points.setdefault(t.point, []).append(t)
    out = {}
    for point, ts in points.items():
        summary = resistance.summarise_runs([t.dir for t in ts], seeds=[t.seed for t in ts], **kw)
        out[point] = {"values": ts[0].values, "trials": [t.name for t in ts], **summary}
    return out


def dose_response(points: dict) -> list[dict]:
    """Retention at the last generation (mean over formats) against each arm's synthetic ratio."""
    rows = []
    for point, p in points.items():
        others = {k: v for k, v in p["values"].items() if not k.endswith("synthetic_ratio")}
        tag = "".join(f", {k.rsplit('.', 1)[-1]}={v}" for k, v in others.items())
        for arm, fmts in p["regimes"].items():
            a = p["arms"].get(arm, {})
            if "all" in fmts:
                rows.append({"point": point, "arm": arm, "series": ("general" if not a.get("domain") else f"domain {a['domain']}")
                             + " arm, all subjects" + tag, "synthetic_ratio": a.get("synthetic_ratio"), **fmts["all"]})
        for c in p["comparisons"]:
            for arm in (c["domain_arm"], c["general_arm"]):
                r = c["regimes"][arm].get("all")
                if r:
                    kind = "domain" if arm == c["domain_arm"] else "general"
                    rows.append({"point": point, "arm": arm, "series": f"{kind} arm on {c['domain']}{tag}",
                                 "synthetic_ratio": p["arms"][arm]["synthetic_ratio"], **r})
    return rows


def sweep_command(config: Path, grid: list[str], seeds: int, address: str | None, cpus_per_trial: int, out: Path) -> dict:
    config, out = Path(config), Path(out)
    trials = plan(config, grid, seeds, cpus_per_trial, out)
    todo = [t for t in trials if not finished(t.dir, t.cfg.generations)]

    def write_plan(cpus=None):
        where = f" on Ray ({cpus:g} CPUs, {cpus_per_trial} per trial)" if cpus is not None else ""
        print(f"sweep: {len(trials)} trial(s), {len(trials) - len(todo)} finished, {len(todo)} to run{where} -> {out}",
              flush=True)
        atomic_write_json(out / "sweep.json", {
            "config": str(config.resolve()), "config_text": config.read_text(encoding="utf-8"), "grid": parse_grid(grid),
            "seeds": seeds, "cpus_per_trial": cpus_per_trial,
            "trials": [{"name": t.name, "point": t.point, "values": t.values, "seed": t.seed, "overrides": t.overrides}
                       for t in trials]})

    failures = run_on_ray(todo, address, cpus_per_trial, before_start=write_plan) if todo else []
    if not todo:
        write_plan()
    result = summarise(trials, out)
    if failures:
        t, line = failures[0]
        raise UserError(f"{len(failures)} of {len(todo)} trial(s) failed (first: {t.name}: {line}); the others are "
                        f"summarised in {out}; run the same command again to resume the failed ones")
    return result


def load_trials(sweep_dir: Path) -> list[Trial]:
    """The trials of SWEEP/sweep.json, their configs rebuilt from the config text saved there."""
    path = Path(sweep_dir) / "sweep.json"
    if not path.is_file():
        raise UserError(f"{path}: not found; is {sweep_dir} a kcollapse sweep directory?")
    spec = json.loads(path.read_text(encoding="utf-8"))
    base = validate(yaml.safe_load(spec["config_text"]) or {}, spec["config"]).model_dump(mode="json")
    return [Trial(t["name"], t["point"], t["values"], t["seed"], validate(apply_overrides(base, t["overrides"]), str(path)),
                  Path(sweep_dir) / "trials" / t["name"], t["overrides"]) for t in spec["trials"]]


def report_sweep(sweep_dir: Path) -> dict:
    """Summary, resistance.json and report.html of a sweep directory again, without running anything."""
    return summarise(load_trials(sweep_dir), Path(sweep_dir))


def summarise(trials: list[Trial], out: Path) -> dict:
    """Write summary.csv, resistance.json and report.html for the trials that have metrics; print the factors."""
    atomic_write_text(out / "summary.csv", summary_frame(trials).to_csv(index=False))
    points = resistance_by_point(trials)
    result = {"points": points, "dose_response": dose_response(points)}
    atomic_write_json(out / "resistance.json", result)
    for point, p in points.items():
        for line in resistance_lines(p, f"[{point}] " if len(points) > 1 else ""):
            print(line)
    path = write_report(out, trials, result)
    print(f"wrote {out / 'summary.csv'}, {out / 'resistance.json'} and {path}")
    return result


def write_report(out: Path, trials: list[Trial], result: dict) -> Path:
    """SWEEP/report.html (templates/sweep.html): self-contained (figures base64), every text escaped."""
    sections = {point: resistance_section(p, f"{point}: ") for point, p in result["points"].items()}
    dose = img(figures.dose_figure(result["dose_response"]), "dose-response") if result["dose_response"] else None
    body = render("sweep.html", name=out.resolve().name, trials=trials, finished={t.name: finished(t.dir, t.cfg.generations) for t in trials},
                  points=list(dict.fromkeys(t.point for t in trials)), seeds=len({t.seed for t in trials}),
                  sections=sections, dose=dose, rows=result["dose_response"],
                  reports={t.name: str(t.dir.relative_to(out)) + "/report.html" for t in trials})
    path = out / "report.html"
    atomic_write_text(path, page(f"kcollapse sweep · {out.resolve().name}", body))
    return path
