"""`kcollapse eval MODEL --benchmark SPEC ... --out DIR`: the run loop's evaluation, for one model.

Writes DIR/metrics.jsonl (the run schema: arm "eval", generation 0) and DIR/answers/<subject>__<format>.jsonl.
Eval settings come from EvalConfig defaults, then the command's options, then `--set key=value` overrides.
MODEL or SPEC `organism` means the default model organism (generation 0, built and cached on first use); MODEL may
also be a `.gguf` file or `gemma3-270m` (converted once to a cached safetensors checkpoint, see kcollapse.pretrained).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError
from rich.progress import Progress

from kcollapse import organism
from kcollapse.config import EvalConfig, OrganismConfig, apply_overrides, format_validation_error
from kcollapse.errors import UserError
from kcollapse.evaluate import evaluate, load_benchmark
from kcollapse.evaluate.formats import get_format
from kcollapse.io import write_jsonl
from kcollapse.models import load_model
from kcollapse.pretrained import resolve_model


def eval_config(benchmark: str, formats: list[str], subjects: list[str], limit: int | None, scoring: str,
                overrides: list[str]):
    data = EvalConfig().model_dump(mode="json")
    data.update(benchmark=benchmark, scoring=scoring)
    if formats:
        data["formats"] = list(formats)
    if subjects:
        data["subjects"] = list(subjects)
    if limit is not None:
        data["limit"] = limit
    data = apply_overrides(data, [o.removeprefix("eval.") for o in overrides])
    try:
        cfg = EvalConfig.model_validate(data)
    except ValidationError as err:
        raise UserError(format_validation_error(err, "eval options")) from None

    for name in cfg.formats:
        get_format(name, cfg.formats_file)  # unknown format: one line, before any model is loaded
    return cfg


def _organism(model: str, benchmark: str) -> tuple[str, Path | None]:
    """The default organism's generation-0 checkpoint and/or benchmark file (built and cached on first use)."""
    if "organism" not in (model, benchmark):
        return resolve_model(model), None
    cfg, cache = OrganismConfig(), organism.default_cache_dir()
    world = organism.build_world(cfg, cache)
    if model == "organism":
        model = str(organism.ensure_gen0(cfg, cache, world))
    else:
        model = resolve_model(model, cache)
    return model, world.benchmark_path


def eval_command(model: str, benchmark: str, formats: list[str], subjects: list[str], limit: int | None, scoring: str,
                 out: Path, overrides: list[str]) -> list[dict]:
    cfg = eval_config(benchmark, formats, subjects, limit, scoring, overrides)
    model, organism_benchmark = _organism(model, benchmark)
    items = load_benchmark(cfg, organism_benchmark)
    lm, tokenizer = load_model(model)
    out = Path(out)
    with Progress(transient=True) as progress:
        rows = evaluate(lm, tokenizer, cfg, items, answers_dir=out / "answers", progress=progress)
    rows = [{"arm": "eval", "generation": 0, **r} for r in rows]
    write_jsonl(out / "metrics.jsonl", rows)
    for r in rows:
        if r["metric"] == "accuracy" and r["subject"] is None:
            print(f"{r['format']:<28} accuracy {r['value']:.3f}")
    print(f"wrote {out / 'metrics.jsonl'} and {out / 'answers'}/")
    return rows
