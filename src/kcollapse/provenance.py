"""Provenance: what exactly a run was made from, recorded in RUN_DIR/run.json and checkable later.

A collapse curve is only as good as the ability to redo it. Every run records, when it starts:

- `config_sha256`: the resolved config (fields that only change speed, config.RUNTIME_FIELDS, left out, since a
  resumed run may change them);
- `inputs`: sha256 of the corpus and the benchmark as read (a file's bytes; a directory's files by relative
  path; a `datasets` corpus or `hf:` benchmark: the loaded content, which cannot be re-checked offline), of extra
  input files (domain corpora, formats and few-shot files), and of generation 0's weights (its safetensors files);
- `kcollapse`: version, and the git commit (with a dirty flag) when it runs from a checkout;
- `host`: CPU and GPU model, cores, torch threads, device and dtype.

A run extended to more generations (`kcollapse run` again with a larger `generations`) records the new config's
hash and, under `extended`, when and from how many generations.
Each generation directory keeps `times.json` (started, finished; UTC), gathered into run.json's
`generation_times`. `kcollapse verify RUN_DIR` re-hashes the config, the local inputs and generation 0's weights:
"ok", or one line per mismatch (exit 1).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
from pathlib import Path

from importlib.metadata import PackageNotFoundError, version

from kcollapse.config import RUNTIME_FIELDS, flatten, read_yaml
from kcollapse.corpus import TEXT_SUFFIXES
from kcollapse.errors import UserError
from kcollapse.io import atomic_write_json, sanitize_terminal

CHUNK = 1 << 20


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ------------------------------------------------------------------------------------------------ hashing

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_path(path: Path, suffixes: tuple[str, ...] | None = None) -> str:
    """A file's sha256; for a directory, the sha256 of its files' `relative path <TAB> sha256` lines, sorted."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and (suffixes is None or p.suffix in suffixes))
    manifest = "".join(f"{p.relative_to(path).as_posix()}\t{sha256_file(p)}\n" for p in files)
    return hashlib.sha256(manifest.encode()).hexdigest()


def sha256_json(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


def sha256_texts(texts) -> str:
    """Texts as loaded (a `datasets` corpus), hashed one by one, each prefixed by its byte length."""
    h = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def config_sha256(cfg) -> str:
    """The resolved config (an ExperimentConfig, or the dict config.yaml holds), speed-only fields left out."""
    data = cfg if isinstance(cfg, dict) else cfg.model_dump(mode="json")
    return sha256_json({k: v for k, v in flatten(data).items() if k not in RUNTIME_FIELDS})


def weights_sha256(model_dir: Path) -> str | None:
    """The checkpoint's weights: its *.safetensors files (name and content)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir() or not any(model_dir.glob("*.safetensors")):
        return None
    return sha256_path(model_dir, (".safetensors",))


def _local(path: str | Path) -> dict:
    path = Path(path).expanduser().resolve()
    return {"path": str(path), "sha256": sha256_path(path)}


def hash_inputs(cfg, organism_corpus: Path | None, organism_benchmark: Path | None, texts, items) -> dict:
    """name -> {path, sha256} (a local file or directory) or {source, content_sha256} (loaded from a hub)."""
    out: dict[str, dict] = {}
    if cfg.corpus.dataset:
        out["corpus"] = {"source": f"dataset {cfg.corpus.dataset}", "content_sha256": sha256_texts(t.text for t in texts)}
    else:
        path = Path(organism_corpus if cfg.corpus.path == "organism" else cfg.corpus.path).expanduser().resolve()
        out["corpus"] = {"path": str(path), "sha256": sha256_path(path, None if path.is_file() else TEXT_SUFFIXES)}
    spec = cfg.eval.benchmark
    if spec.startswith("hf:"):
        out["benchmark"] = {"source": spec, "content_sha256": sha256_json(items)}
    else:
        out["benchmark"] = _local(organism_benchmark if spec == "organism" else spec)
    for field in ("formats_file", "few_shot_file"):
        if getattr(cfg.eval, field):
            out[f"eval.{field}"] = _local(getattr(cfg.eval, field))
    for arm in cfg.arms:
        if arm.domain_corpus:
            out[f"arms.{arm.name}.domain_corpus"] = _local(arm.domain_corpus)
    return out


def hub_snapshot(model_id: str) -> Path | None:
    """The local cache directory of a hub model, if it is there."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception:  # not cached, not a hub id, no huggingface_hub: nothing to hash
        return None


def gen0_weights(model_path) -> dict:
    local = Path(str(model_path)).expanduser()
    where = local if local.is_dir() else hub_snapshot(str(model_path))
    return {"path": str(model_path), "sha256": weights_sha256(where) if where else None}


# ------------------------------------------------------------------------------------------------ record

def git_commit(start: Path | None = None) -> dict:
    """The commit of the git checkout kcollapse runs from (and whether it has uncommitted changes), else {}."""
    start = start or Path(__file__).resolve().parent
    try:
        def git(*args):
            return subprocess.run(["git", "-C", str(start), *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout

        top = Path(git("rev-parse", "--show-toplevel").strip())
        if not (top / "pyproject.toml").is_file():  # some other repository around a site-packages install
            return {}
        dirty = subprocess.run(["git", "-C", str(top), "status", "--porcelain", "--", "src"], capture_output=True,
                               text=True, timeout=10, check=True).stdout.strip()
        return {"git_commit": git("rev-parse", "HEAD").strip(), "git_dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host(model=None) -> dict:
    import torch  # deferred: slow to import, and only a run (which has it loaded) asks

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    out = {"hostname": platform.node(), "os": platform.platform(), "cpu": _cpu_model(), "cores": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "gpus": gpus}
    if model is not None:
        p = next(model.parameters())
        out.update(device=str(p.device), dtype=str(p.dtype).removeprefix("torch."))
    return out


def record(cfg, inputs: dict, model_path, model=None) -> dict:
    """The `provenance` section of run.json."""
    try:
        kc = {"version": version("kcollapse")}
    except PackageNotFoundError:
        kc = {"version": None}
    return {"config_sha256": config_sha256(cfg), "inputs": {**inputs, "gen0_weights": gen0_weights(model_path)},
            "kcollapse": kc | git_commit(), "host": host(model)}


def changed_inputs(run_dir: Path, inputs: dict) -> list[str]:
    """Names of the inputs hashed now (hash_inputs) whose hash differs from the one run.json recorded."""
    try:
        recorded = json.loads((Path(run_dir) / "run.json").read_text())["provenance"]["inputs"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    key = lambda e: (e or {}).get("sha256") or (e or {}).get("content_sha256")  # noqa: E731
    return [n for n, e in inputs.items() if n in recorded and key(recorded[n]) != key(e)]


def generation_times(run_dir: Path) -> dict:
    """{"gen_0": {...}, "<arm>": {"<g>": {"started", "finished"}}} from every times.json of the run."""
    run_dir = Path(run_dir)
    out: dict = {}
    if (run_dir / "gen_0" / "times.json").is_file():
        out["gen_0"] = json.loads((run_dir / "gen_0" / "times.json").read_text())
    for path in sorted(run_dir.glob("arms/*/gen_*/times.json"), key=lambda p: (p.parts[-3], int(p.parent.name[4:]))):
        out.setdefault(path.parts[-3], {})[path.parent.name[4:]] = json.loads(path.read_text())
    return out


def update_run_json(run_dir: Path, **fields) -> None:
    """run.json with its generation times (and `fields`) brought up to date."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        return
    data = json.loads(path.read_text())
    data.update(generation_times=generation_times(run_dir), **fields)
    atomic_write_json(path, data)


def extend_record(run_dir: Path, cfg, from_generations: int) -> None:
    """run.json of a run extended to cfg.generations: its config hash is the new config's, and `extended` lists each
    extension (from, to, when)."""
    path = Path(run_dir) / "run.json"
    data = json.loads(path.read_text())
    data.setdefault("provenance", {})["config_sha256"] = config_sha256(cfg)
    data.setdefault("extended", []).append({"from_generations": from_generations, "to_generations": cfg.generations,
                                            "at": now()})
    atomic_write_json(path, data)


# ------------------------------------------------------------------------------------------------ verify

def verify(run_dir: Path) -> list[str]:
    """One line per recorded hash that no longer matches (empty: everything matches); UserError when nothing is
    recorded."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: run directory not found")
    try:
        prov = json.loads((run_dir / "run.json").read_text()).get("provenance")
    except (OSError, ValueError):
        raise UserError(f"{run_dir / 'run.json'}: missing or not JSON; is {run_dir} a kcollapse run directory?") from None
    if not isinstance(prov, dict):
        raise UserError(f"{run_dir / 'run.json'}: no provenance recorded (a run from before kcollapse recorded it)")
    problems = []
    cfg_path = run_dir / "config.yaml"
    try:  # as written, not re-validated: a field a later kcollapse adds is not a change of this run
        now_cfg = config_sha256(read_yaml(cfg_path))
    except (UserError, AttributeError) as e:
        now_cfg = f"unreadable ({e})"
    if now_cfg != prov.get("config_sha256"):
        problems.append(f"config: {cfg_path} sha256 {_short(now_cfg)}, recorded {_short(prov.get('config_sha256'))}")
    for name, entry in prov.get("inputs", {}).items():
        if not isinstance(entry, dict) or not entry.get("sha256"):
            continue  # hub content: not re-checkable offline
        if name == "gen0_weights":
            copied = run_dir / "gen_0" / "model"
            where = copied if copied.is_dir() else Path(entry["path"]).expanduser()
            if not where.is_dir():
                where = hub_snapshot(entry["path"]) or where
            now_hash = weights_sha256(where) if where.is_dir() else None
        else:
            where = Path(entry["path"])
            suffixes = TEXT_SUFFIXES if name == "corpus" and where.is_dir() else None  # as hash_inputs read it
            now_hash = sha256_path(where, suffixes) if where.exists() else None
        if now_hash is None:
            problems.append(f"{name}: {where} is missing")
        elif now_hash != entry["sha256"]:
            problems.append(f"{name}: {where} sha256 {_short(now_hash)}, recorded {_short(entry['sha256'])}")
    return problems


def _short(h) -> str:
    return h[:12] if isinstance(h, str) and len(h) == 64 else str(h)


def verify_command(run_dir: Path) -> int:
    problems = verify(run_dir)
    prov = json.loads((Path(run_dir) / "run.json").read_text())["provenance"]
    if problems:
        for line in problems:
            print(sanitize_terminal(line))
        return 1
    names = ["config"] + [k for k, e in prov.get("inputs", {}).items() if isinstance(e, dict) and e.get("sha256")]
    print(f"ok: {len(names)} recorded hashes match ({', '.join(names)})")
    return 0
