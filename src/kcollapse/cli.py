"""The `kcollapse` command line: one subcommand per step of a study.

run -> (eval) -> stages -> report / compare; verify checks a run against its recorded hashes; import-reference
brings in the paper's own logs; sweep runs many configs and seeds on Ray; bench measures speed against the
reference implementation's way of working.
Every user mistake ends as one line on stderr and exit code 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import errno
import functools
import inspect
import signal
from importlib import resources
from pathlib import Path
from typing import List, Optional

import typer

from kcollapse.config import load_config
from kcollapse.errors import UserError, WorkerDied
from kcollapse.io import RunLock, atomic_write_text, sanitize_terminal
from kcollapse.provenance import verify_command

app = typer.Typer(
    help="Run, measure and explain knowledge collapse under recursive synthetic training.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DEBUG = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors.")


def friendly(func):
    """Turn UserError into one line + exit 2, Ctrl-C into a resume hint + exit 130, an OS error (disk full,
    permission denied) or a dead worker process into one line + exit 1. Printed text is sanitised: it may quote a
    model's or a user's text."""

    @functools.wraps(func)
    def wrapper(*args, debug: bool = False, **kwargs):
        try:
            return func(*args, **kwargs)
        except UserError as e:
            if debug:
                raise
            typer.echo(f"error: {sanitize_terminal(e)}", err=True)
            raise typer.Exit(2)
        except WorkerDied as e:
            if debug:
                raise
            hint = getattr(wrapper, "resume_hint", "")
            typer.echo(sanitize_terminal(f"error: {e}. {hint}".rstrip()), err=True)
            raise typer.Exit(1)
        except KeyboardInterrupt:
            hint = getattr(wrapper, "resume_hint", "")
            typer.echo(f"\ninterrupted. {sanitize_terminal(hint)}".rstrip(), err=True)
            raise typer.Exit(130)
        except OSError as e:
            if debug:
                raise
            where = f"{e.filename}: " if e.filename else ""
            mid_run = e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO)  # disk full: free space, then resume
            hint = getattr(wrapper, "resume_hint", "") if mid_run else ""
            msg = f"error: {where}{e.strerror or e} (use --debug for the traceback). {hint}".rstrip()
            typer.echo(sanitize_terminal(" ".join(msg.split())), err=True)
            raise typer.Exit(1)

    wrapper.__signature__ = _with_debug(func)
    return wrapper


class _sigterm_as_interrupt:
    """A scheduler's SIGTERM (job time limit, preemption) stops a run as cleanly as Ctrl-C, while the run lasts."""

    def __enter__(self):
        def handler(signum, frame):
            raise KeyboardInterrupt

        try:
            self.previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread: leave the default
            self.previous = None
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def _with_debug(func):
    sig = inspect.signature(func)
    params = list(sig.parameters.values()) + [
        inspect.Parameter("debug", inspect.Parameter.KEYWORD_ONLY, default=DEBUG, annotation=bool)
    ]
    return sig.replace(parameters=params)


@app.command()
@friendly
def run(
    config: Optional[Path] = typer.Argument(None, help="Experiment YAML. Omitted: the built-in model-organism experiment."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default: runs/<config name>)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a field: key.path=value (repeatable)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Built-in recipe instead of CONFIG: default, quick, collapse, paper, gemma3-270m, letters."),
):
    """Run the recursive synthetic-training loop; re-running on the same RUN_DIR resumes it."""
    from kcollapse.loop import run_experiment  # deferred, as in every command: torch, transformers
    from kcollapse.report import report_after_run  # deferred: pandas, matplotlib
    from kcollapse.rundir import check_out  # deferred: pandas

    cfg = load_config(config, set_ or [], preset)
    name = config.stem if config is not None else (preset or "default")
    out = out or Path("runs") / name
    check_out(out)
    if out.is_dir():
        RunLock(out).check()  # a live run here: refuse now, not after loading the model
    run.resume_hint = f"Run the same command again to resume from the last finished step in {out}."
    with _sigterm_as_interrupt():
        run_experiment(cfg, out)
    report_after_run(out)


@app.command()
@friendly
def init(path: Path = typer.Argument(Path("kcollapse.yaml"), help="Where to write the example config.")):
    """Write a commented example config (runs offline as written; point `model` at any local checkpoint)."""
    if path.exists():
        raise UserError(f"{path}: already exists; choose another path or delete it")
    text = (resources.files("kcollapse") / "recipes" / "example.yaml").read_text()
    atomic_write_text(path, text)
    typer.echo(f"wrote {path}; run it with: kcollapse run {path}")


@app.command("eval")
@friendly
def eval_(
    model: str = typer.Argument(..., help="Model: HF id, local checkpoint dir, a .gguf file, 'gemma3-270m' or 'organism'."),
    benchmark: str = typer.Option("organism", "--benchmark", help="organism | local .jsonl/.csv file or dir | hf:<dataset>"),
    format_: Optional[List[str]] = typer.Option(None, "--format", help="Instruction format (repeatable; default: all)."),
    subject: Optional[List[str]] = typer.Option(None, "--subject", help="Subject (repeatable; default: all)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Questions per subject."),
    scoring: str = typer.Option("reference", "--scoring", help="reference (the paper's) or loglik (lm-eval style)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory: metrics.jsonl and answers/."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override an eval field: key=value (e.g. free_text=false)."),
):
    """Evaluate one model: task-centric metrics per subject and format, per-question answers."""
    from kcollapse.evaluate.cli import eval_command  # deferred: pulls in torch

    eval_command(model, benchmark, format_ or [], subject or [], limit, scoring, out, set_ or [])


@app.command()
@friendly
def stages(
    run_dir: Path = typer.Argument(..., help="A run directory."),
    rules: Optional[Path] = typer.Option(None, "--rules", help="YAML of stage-rule thresholds (see `stages:` in the config)."),
):
    """Classify every arm x format x generation into stage A, B or C; writes RUN_DIR/stages.json."""
    from kcollapse.stages import stages_command  # deferred: pandas

    stages_command(run_dir, rules_file=rules)


@app.command()
@friendly
def report(run_dir: Path = typer.Argument(..., help="A run directory.")):
    """Write RUN_DIR/report.html (self-contained) and RUN_DIR/figures/; for a sweep directory, the sweep's report."""
    if (run_dir / "sweep.json").is_file():
        from kcollapse.sweep import report_sweep  # deferred: pandas, matplotlib

        report_sweep(run_dir)  # prints what it wrote
        return
    from kcollapse.report import report_command  # deferred: pandas, matplotlib

    report_command(run_dir)


@app.command()
@friendly
def verify(run_dir: Path = typer.Argument(..., help="A run directory.")):
    """Check a run directory against the hashes in its run.json: "ok", or one line per mismatch and exit 1."""
    code = verify_command(run_dir)
    if code:
        raise typer.Exit(code)


@app.command()
@friendly
def compare(
    run_dirs: List[Path] = typer.Argument(..., help="Run directories to overlay."),
    out: Path = typer.Option(Path("comparison"), "--out", "-o", help="Output directory."),
):
    """Overlay arms of several runs in one report and one CSV."""
    from kcollapse.report import compare_command  # deferred: pandas, matplotlib

    compare_command(run_dirs, out)


@app.command("import-reference")
@friendly
def import_reference(
    dir_: Path = typer.Argument(..., metavar="DIR", help="Log directory of the paper's code (ratio_<pct>_gen_<g>/...)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory to write."),
):
    """Convert the reference implementation's logs into a kcollapse run directory."""
    from kcollapse.reference import import_command  # deferred: pulls in torch

    import_command(dir_, out)


@app.command()
@friendly
def sweep(
    config: Path = typer.Argument(..., help="Base experiment YAML."),
    grid: Optional[List[str]] = typer.Option(None, "--grid", help="key.path=v1,v2,... (repeatable)."),
    seeds: int = typer.Option(1, "--seeds", help="Seeds per grid point (paired across points)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: start Ray locally)."),
    cpus_per_trial: int = typer.Option(1, "--cpus-per-trial", help="CPUs reserved per trial."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Sweep directory (default: sweeps/<config name>)."),
):
    """Run a grid x seeds of ordinary, resumable runs as Ray tasks; summarise retention and resistance."""
    from kcollapse.sweep import sweep_command  # deferred: pandas (ray and torch when trials run)

    sweep.resume_hint = "Run the same command again: finished trials are kept, unfinished ones resume."
    sweep_command(config, grid or [], seeds, address, cpus_per_trial, out or Path("sweeps") / config.stem)


@app.command()
@friendly
def bench(
    quick: bool = typer.Option(False, "--quick", help="Fewer repeats and inputs (the organism rows in under 3 minutes); no real model unless --model."),
    json_: Optional[Path] = typer.Option(None, "--json", help="Write the rows as JSON here."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Run whose seconds_* metrics give the phase table (default: runs/default)."),
    model: Optional[list[str]] = typer.Option(None, "--model", help="Also bench this real model (repeatable): a checkpoint dir, a .gguf file or gemma3-270m. Default: gemma3-270m when its weights package is installed, except with --quick."),
):
    """Measure scoring, free-text, synthesis and training speed against reference-style baselines."""
    from kcollapse.bench import bench_command  # deferred: pulls in torch

    bench_command(quick, json_, run_dir, model or None)


def main():  # pragma: no cover - entry point for `python -m kcollapse.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
