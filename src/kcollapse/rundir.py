"""The run directory: where each file of a run lives, who may write into it, and how its results are read back.

    RUN_DIR/config.yaml, run.json, state.json, metrics.jsonl (every arm x generation), stages.json, report.html
    RUN_DIR/gen_0/model/ (or model_path.txt), gen_0/metrics.jsonl, gen_0/answers/
    RUN_DIR/arms/<arm>/gen_<g>/synthetic.jsonl   the training mix (real and synthetic texts, each with its source)
                              /model/ step.json metrics.jsonl answers/<subject>__<format>.jsonl

The loop writes these files; stages, resistance, report, sweep and bench only read them, through this module
(never through loop.py). A run directory belongs to one config: a run with another config is refused, except
one with more `generations`, which extends it (the last checkpoint of each arm is kept for that).
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import yaml

from kcollapse.config import ExperimentConfig, differing_fields, validate
from kcollapse.errors import UserError
from kcollapse.io import atomic_write_json, read_jsonl, write_jsonl

METRIC_COLUMNS = ["arm", "generation", "metric", "value", "format", "subject"]
MIX_FILE = "synthetic.jsonl"  # the generation's whole training mix (real texts too); the name is a user contract


class Run:
    """Paths of one run directory, for a config."""

    def __init__(self, cfg: ExperimentConfig, out: Path):
        self.cfg, self.out = cfg, Path(out)

    def gen_dir(self, arm: str, g: int) -> Path:
        return self.out / "arms" / arm / f"gen_{g}"

    def model_dir(self, arm: str, g: int) -> Path:
        return self.out / "gen_0" / "model" if g == 0 else self.gen_dir(arm, g) / "model"

    def mix_path(self, arm: str, g: int) -> Path:
        return self.gen_dir(arm, g) / MIX_FILE


# ------------------------------------------------------------------------------------------- checks

def check_out(out: Path, what: str = "run directory") -> None:
    """--out must be a directory or creatable as one: refuse a file (or a file on the way) before any work."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; expected a {what}")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"--out {out}: {parent} is a file; expected a directory path")
            break


def check_run_dir(cfg: ExperimentConfig, out: Path) -> int | None:
    """Refuse a file, or a run directory made with another config (naming the fields that differ). A config that
    differs only in more `generations` extends the run: the run's earlier generation count is returned, else None."""
    check_out(out)
    saved = Path(out) / "config.yaml"
    if saved.is_file():
        old = validate(yaml.safe_load(saved.read_text()) or {}, str(saved)).model_dump(mode="json")
        diff = differing_fields(old, cfg.model_dump(mode="json"))
        if diff == ["generations"] and cfg.generations > old["generations"]:
            return old["generations"]  # each step is seeded by its generation: as in a run that long from the start
        if diff == ["generations"]:
            raise UserError(f"{out} has {old['generations']} generations; generations may grow (extending the run), "
                            f"not shrink to {cfg.generations}: use a new --out")
        if diff:
            raise UserError(f"{out} was made with a different config ({', '.join(diff[:6])}{' ...' if len(diff) > 6 else ''} "
                            "differ); use a new --out or the same config")
    return None


# ------------------------------------------------------------------------------------------ progress

def generations_done(run: Run) -> dict[str, list[int]]:
    """arm -> the generations (1..N) whose evaluation is written: the run directory is the record of progress."""
    return {a.name: [g for g in range(1, run.cfg.generations + 1) if (run.gen_dir(a.name, g) / "metrics.jsonl").exists()]
            for a in run.cfg.arms}


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


def write_state(run: Run, done: bool) -> None:
    finished = {arm: max(gens, default=0) for arm, gens in generations_done(run).items()}
    atomic_write_json(run.out / "state.json", {"complete": done, "generations_done": finished,
                                                "generations": run.cfg.generations})


# ------------------------------------------------------------------------------------------- reading

def load_metrics(run_dir: Path) -> pd.DataFrame:
    """RUN_DIR/metrics.jsonl as a frame of METRIC_COLUMNS; a row written twice (a resumed run) counts once, the
    last one winning."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: not found; is {run_dir} a kcollapse run directory?")
    df = pd.DataFrame(read_jsonl(path))
    if df.empty:
        raise UserError(f"{path}: no metric rows")
    missing = [c for c in METRIC_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"{path}: rows lack field(s) {missing}; expected {METRIC_COLUMNS}")
    df = df[METRIC_COLUMNS].copy()
    df["generation"] = pd.to_numeric(df["generation"], errors="coerce")
    df["value"] = pd.to_numeric(df["value"], errors="coerce")
    if df["generation"].isna().any():
        raise UserError(f"{path}: a row has a non-integer generation")
    df["generation"] = df["generation"].astype(int)
    df["value"] = df["value"].astype(float)
    df["arm"] = df["arm"].astype(str)
    df = df.astype({"format": object, "subject": object})
    df[["format", "subject"]] = df[["format", "subject"]].where(df[["format", "subject"]].notna(), None)
    return df.drop_duplicates(["arm", "generation", "metric", "format", "subject"], keep="last").reset_index(drop=True)


def answer_files(run_dir: Path, subject: str = "*") -> dict[tuple[str, int, str], list[Path]]:
    """(arm, generation, format) -> its answers files (one per subject; or only `subject`'s)."""
    out: dict[tuple[str, int, str], list[Path]] = {}
    for path in sorted(Path(run_dir).glob(f"arms/*/gen_*/answers/{subject}__*.jsonl")):
        m = re.fullmatch(r"gen_(\d+)", path.parent.parent.name)
        if m:
            fmt = path.stem.rsplit("__", 1)[1]
            out.setdefault((path.parent.parent.parent.name, int(m.group(1)), fmt), []).append(path)
    return out

