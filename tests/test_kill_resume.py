"""Kills and crashes lose nothing: a run SIGKILLed anywhere resumes to the numbers of an uninterrupted run.

The kill tests drive the real command line in subprocesses. `KCOLLAPSE_TEST_PAUSE=<point>@<n>` (tests/killpoints.py,
the command line with pause points patched in; production code has none) parks a run at a precise moment and the test SIGKILLs it there, checks what is on
disk, and resumes with the same command: mid-evaluation of generation 0 (while a second `kcollapse run` on the same
directory is refused), mid-synthesis, mid-fine-tuning, half-way through writing a checkpoint, then Ctrl-C
mid-evaluation of generation 1. Each resume starts a new process (the stale lock of the killed one is taken over).
The final metrics.jsonl, training mixes and per-question answers must equal those of an uninterrupted run started
alongside (same seed, same machine; metrics named seconds_* excepted).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from kcollapse.cli import app
from kcollapse.config import validate
from kcollapse.errors import UserError
from kcollapse.io import RunLock, read_jsonl, remove_stale_temp, write_jsonl

from conftest import DATA

KILL_POINTS_SURVIVED: list[str] = []
KILLPOINTS = Path(__file__).with_name("killpoints.py")


def kill_config(model) -> dict:
    return {
        "model": str(model), "threads": 1, "device": "cpu",
        "corpus": {"path": str(DATA / "corpus.txt"), "min_chars": 20, "heldout_share": 0.1},
        "block_tokens": 16, "prompt_tokens": 8, "new_tokens": 8, "samples_per_generation": 24, "generations": 2,
        "arms": [{"name": "a", "synthetic_ratio": 0.5}],
        "train": {"lr": 1e-3, "max_steps": 3, "chunk_tokens": 64, "batch_size": 2, "grad_accum": 1,
                  "gradient_checkpointing": False},
        "sampling": {"batch_size": 4},  # 12 prompts: 3 sampling batches, so a pause after the 2nd is mid-synthesis
        "eval": {"benchmark": str(DATA / "bench.jsonl"), "limit": 6, "free_text_tokens": 4, "few_shot_k": 1,
                 "perplexity_stride": 32, "formats": ["multiple_choice", "cloze"]},
    }


def _env(pause: str | None, pause_file: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env.pop("KCOLLAPSE_TEST_PAUSE", None)
    if pause:
        env.update(KCOLLAPSE_TEST_PAUSE=pause, KCOLLAPSE_TEST_PAUSE_FILE=str(pause_file))
    return env


LAUNCHED: list = []  # every Launch of the running test, killed at its teardown if still running (a failed test)


@pytest.fixture(autouse=True)
def no_launch_outlives_its_test():
    yield
    while LAUNCHED:
        launch = LAUNCHED.pop()
        if launch.proc.poll() is None:
            launch.proc.kill()
            launch.proc.wait(timeout=60)


class Launch:
    """`kcollapse run CFG --out OUT` in a subprocess (through tests/killpoints.py), optionally parked at a pause point."""

    def __init__(self, cfg: Path, out: Path, logs: Path, pause: str | None = None):
        LAUNCHED.append(self)
        self.pause_file = logs / f"paused-{time.monotonic_ns()}"
        self.stderr_path = logs / f"stderr-{time.monotonic_ns()}.txt"
        self.stderr = open(self.stderr_path, "w")
        self.proc = subprocess.Popen([sys.executable, str(KILLPOINTS), "run", str(cfg), "--out", str(out)],
                                     stdout=subprocess.DEVNULL, stderr=self.stderr, env=_env(pause, self.pause_file))
        self.pause = pause

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        if not self.stderr.closed:
            self.stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    def wait_paused(self, timeout: float = 240) -> None:
        deadline = time.time() + timeout
        while not self.pause_file.exists():
            if self.proc.poll() is not None:
                pytest.fail(f"run exited ({self.proc.returncode}) before pausing at {self.pause}:\n{self.log()[-3000:]}")
            if time.time() > deadline:
                self.kill()
                pytest.fail(f"run never reached {self.pause}:\n{self.log()[-3000:]}")
            time.sleep(0.02)

    def kill(self, sig=signal.SIGKILL) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=120)
        self.stderr.close()
        return code

    def wait(self, timeout: float = 300) -> int:
        code = self.proc.wait(timeout=timeout)
        self.stderr.close()
        return code


def stable_metrics(run: Path) -> list[dict]:
    return [r for r in read_jsonl(run / "metrics.jsonl") if not r["metric"].startswith("seconds_")]


def results(run: Path) -> dict[str, list[dict]]:
    """Every result file a run writes (per-generation metrics without timings, mixes, per-question answers)."""
    out = {}
    for path in sorted(run.rglob("*.jsonl")):
        rows = read_jsonl(path)
        if path.name == "metrics.jsonl":
            rows = [r for r in rows if not r["metric"].startswith("seconds_")]
        out[str(path.relative_to(run))] = rows
    return out


def leftovers(run: Path) -> list[str]:
    return [str(p.relative_to(run)) for p in run.rglob(".*") if p.name != ".lock"]


@pytest.mark.slow
def test_killed_anywhere_resumes_to_the_same_numbers(tiny_gpt2, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(kill_config(tiny_gpt2)))
    logs = tmp_path / "logs"
    logs.mkdir()
    run, reference = tmp_path / "killed", tmp_path / "uninterrupted"
    baseline = Launch(cfg, reference, logs)  # runs alongside (both single-threaded)

    def killed_at(pause: str, check_on_disk, label: str) -> None:
        launch = Launch(cfg, run, logs, pause)
        launch.wait_paused()
        check_on_disk(launch)
        assert launch.kill() == -signal.SIGKILL
        KILL_POINTS_SURVIVED.append(f"SIGKILL {label}")

    gen0, gen1 = run / "gen_0", run / "arms/a/gen_1"

    # 1. mid-evaluation of generation 0; a second `kcollapse run` meanwhile is refused, naming the live process
    def during_gen0_eval(launch):
        assert (gen0 / "model").is_dir() and not (gen0 / "metrics.jsonl").exists()
        second = CliRunner().invoke(app, ["run", str(cfg), "--out", str(run)])
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert second.exit_code == 2 and len(lines) == 1, second.output
        assert lines[0].startswith("error: ") and f"pid {launch.pid}" in lines[0] and "in use" in lines[0]
        assert json.loads((run / ".lock").read_text())["pid"] == launch.pid

    killed_at("greedy@1", during_gen0_eval, "mid-evaluation of generation 0")
    assert json.loads((run / ".lock").read_text())["pid"]  # the killed run's lock is still there: stale

    # 2. mid-synthesis of generation 1 (the stale lock was taken over)
    killed_at("sample@2", lambda l: (
        (gen0 / "metrics.jsonl").exists() and not (gen1 / "synthetic.jsonl").exists() and
        json.loads((run / ".lock").read_text())["pid"] == l.pid) or pytest.fail("not mid-synthesis"),
        "mid-synthesis of generation 1")

    # 3. mid-training of generation 1
    killed_at("train_step@2", lambda l: ((gen1 / "synthetic.jsonl").exists() and not (gen1 / "model").exists())
              or pytest.fail("not mid-training"), "mid-fine-tuning of generation 1")

    # 4. half-way through writing the generation-1 checkpoint: weights written, tokenizer not, not renamed in place
    def during_checkpoint(launch):
        partial = list(gen1.glob(".model.tmp*"))
        assert partial and (partial[0] / "model.safetensors").exists() and not (gen1 / "model").exists()

    killed_at("save_model@1", during_checkpoint, "mid-write of the generation-1 checkpoint")
    assert list(gen1.glob(".model.tmp*"))  # a half checkpoint never has the final name

    # 5. Ctrl-C mid-evaluation of generation 1 (resumed: retrained, saved, evaluating): stops cleanly, says how to
    #    resume, releases the run directory; the half checkpoint of step 4 was cleaned up
    launch = Launch(cfg, run, logs, "greedy@1")
    launch.wait_paused()
    assert (gen1 / "model/model.safetensors").exists() and not (gen1 / "metrics.jsonl").exists()
    assert not list(gen1.glob(".model.tmp*"))
    assert launch.kill(signal.SIGINT) == 130
    err = launch.log()
    assert "Traceback" not in err, err[-3000:]
    assert "interrupted. Run the same command again to resume from the last finished step in" in err
    assert str(run) in err.strip().splitlines()[-1]
    assert not (run / ".lock").exists() and not leftovers(run)
    KILL_POINTS_SURVIVED.append("Ctrl-C mid-evaluation of generation 1")

    # 6. the last resume finishes; everything equals the uninterrupted run
    final = Launch(cfg, run, logs)
    assert final.wait() == 0, final.log()[-3000:]
    assert baseline.wait() == 0, baseline.log()[-3000:]
    assert stable_metrics(run) == stable_metrics(reference)
    assert len(stable_metrics(run)) > 20 and {r["generation"] for r in stable_metrics(run)} == {0, 1, 2}
    assert results(run) == results(reference)
    assert json.loads((run / "state.json").read_text())["complete"] is True
    assert leftovers(run) == [] and not (run / ".lock").exists()
    print(f"\nkill points survived: {len(KILL_POINTS_SURVIVED)} ({', '.join(KILL_POINTS_SURVIVED)})")


def parallel_runs(tiny_gpt2, tmp_path):
    """Two arms in two worker processes (par.yaml) and the same experiment in one process (seq.yaml), whose
    uninterrupted run is launched as the reference; then a parallel run parked in a worker, mid-training of its
    arm's generation 1. Returns the parked run's directory and Launch, the worker's pid, and `resume()`: once the
    test has stopped the parked run, it runs the same command again and checks the result equals the reference."""
    data = kill_config(tiny_gpt2)
    data["arms"] = [{"name": "a", "synthetic_ratio": 0.5}, {"name": "b", "synthetic_ratio": 1.0}]
    sequential, parallel = tmp_path / "seq.yaml", tmp_path / "par.yaml"
    sequential.write_text(yaml.safe_dump(data))
    parallel.write_text(yaml.safe_dump({**data, "parallel_arms": 2}))
    logs = tmp_path / "logs"
    logs.mkdir()
    run, reference = tmp_path / "killed", tmp_path / "uninterrupted"
    baseline = Launch(sequential, reference, logs)
    launch = Launch(parallel, run, logs, "train_step@2")
    launch.wait_paused()
    worker = int(launch.pause_file.read_text().split()[-1])
    assert worker != launch.pid

    def resume():
        final = Launch(parallel, run, logs)
        assert final.wait() == 0, final.log()[-3000:]
        assert baseline.wait() == 0, baseline.log()[-3000:]
        assert results(run) == results(reference)
        assert json.loads((run / "state.json").read_text())["complete"] is True
        assert leftovers(run) == [] and not (run / ".lock").exists()

    return run, launch, worker, resume


@pytest.mark.slow
def test_killed_parallel_run_leaves_no_worker_and_resumes(tiny_gpt2, tmp_path):
    """SIGKILL of a run whose arms train in worker processes: the workers die with it (nothing keeps writing into
    the run directory), and the resumed run equals an uninterrupted one-process run."""
    run, launch, worker, resume = parallel_runs(tiny_gpt2, tmp_path)
    assert launch.kill() == -signal.SIGKILL
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"worker {worker} outlived its killed parent")
    resume()


@pytest.mark.slow
def test_a_dead_arm_worker_ends_the_run_in_one_line_and_it_resumes(tiny_gpt2, tmp_path):
    """The out-of-memory killer takes one arm worker (SIGKILL to the worker alone): the run stops within seconds
    (multiprocessing's Pool would start a new worker and wait forever for the lost job) with one line that says
    what happened and how to resume, releases the run directory, and the resumed run equals an uninterrupted
    one-process run."""
    run, launch, worker, resume = parallel_runs(tiny_gpt2, tmp_path)
    os.kill(worker, signal.SIGKILL)
    assert launch.wait(timeout=60) == 1
    err = launch.log()
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: a worker process (pid {worker}) was killed by SIGKILL (out of memory?) before")
    assert last.endswith(f"Run the same command again to resume from the last finished step in {run}.")
    assert not (run / ".lock").exists()
    resume()


# ------------------------------------------------------------------------------------------ checkpoints
def test_corrupted_checkpoint_in_a_resumed_run_is_one_clear_line(tiny_gpt2, tmp_path, monkeypatch):
    """A checkpoint damaged between sessions (bit rot, a partial copy) is caught on load by its checksums."""
    from kcollapse.loop import Runner, run_experiment

    data = kill_config(tiny_gpt2)
    data["eval"].update(formats=["cloze"], free_text=False)
    cfg = validate(data)
    real_evaluate, calls = Runner._evaluate, []

    def stop_at_gen1_eval(self, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_evaluate(self, *a, **kw)

    monkeypatch.setattr(Runner, "_evaluate", stop_at_gen1_eval)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "run")
    monkeypatch.setattr(Runner, "_evaluate", real_evaluate)
    weights = tmp_path / "run/arms/a/gen_1/model/model.safetensors"
    good = weights.read_bytes()
    assert json.loads((weights.parent / "kcollapse_checksums.json").read_text())["model.safetensors"]

    for damage in (good[:-64] + bytes(64), good[: len(good) // 2], b""):  # flipped bytes, truncated, empty
        weights.write_bytes(damage)
        result = CliRunner().invoke(app, ["run", str(_dump(tmp_path, data)), "--out", str(tmp_path / "run")])
        errors = [line for line in result.stderr.splitlines() if line.startswith("error")]  # (after the progress bar)
        assert result.exit_code == 2 and len(errors) == 1 and "Traceback" not in result.output, result.output
        assert result.stderr.strip().splitlines()[-1] == errors[0]
        assert "checkpoint is corrupted or incomplete" in errors[0] and "gen_1" in errors[0]
        assert "delete" in errors[0] and "to redo that generation" in errors[0]
        assert not (tmp_path / "run/arms/a/gen_1/metrics.jsonl").exists()
    KILL_POINTS_SURVIVED.append("corrupted checkpoint on resume")

    # following the advice (delete the generation) redoes it, to the same numbers as the checkpoint gave
    import shutil

    shutil.rmtree(tmp_path / "run/arms/a/gen_1")
    run_experiment(cfg, tmp_path / "run")
    assert json.loads((tmp_path / "run/state.json").read_text())["complete"] is True
    assert (tmp_path / "run/arms/a/gen_2/model/model.safetensors").exists()


def _dump(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_save_model_is_atomic_and_checksummed(tiny_gpt2, tmp_path):
    from kcollapse.models import load_model, save_model

    model, tok = load_model(tiny_gpt2, device="cpu")
    out = save_model(model, tok, tmp_path / "gen_1" / "model")
    assert {p.name for p in out.iterdir()} >= {"config.json", "kcollapse_checksums.json", "model.safetensors"}
    assert not list(out.glob("*.bin")) and not list((tmp_path / "gen_1").glob(".*"))
    assert oct(out.stat().st_mode & 0o777) != "0o700"  # shared run directories stay readable
    load_model(out, device="cpu")  # verifies
    save_model(model, tok, out)  # over an existing one: replaced whole
    load_model(out, device="cpu")


# ------------------------------------------------------------------------------------------ atomic files
WRITER = """
import sys
from kcollapse.io import write_jsonl
rows = ({"i": i, "text": "x" * 1000} for i in range(200_000))
write_jsonl(sys.argv[1], rows)
"""


def test_jsonl_killed_mid_write_keeps_the_old_complete_file(tmp_path):
    target = tmp_path / "metrics.jsonl"
    write_jsonl(target, [{"i": 0, "text": "old"}, {"i": 1, "text": "old"}])
    before = target.read_bytes()
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)])
    deadline = time.time() + 60
    while not any(p.stat().st_size > 1_000_000 for p in tmp_path.glob(".metrics.jsonl.*.tmp")):
        assert proc.poll() is None and time.time() < deadline, "writer finished before it could be killed"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.read_bytes() == before  # the old file, whole: never half of the new one
    assert [r["i"] for r in read_jsonl(target)] == [0, 1]
    assert list(tmp_path.glob(".metrics.jsonl.*.tmp"))  # the temporary it was writing...
    assert remove_stale_temp(tmp_path) == 1 and not list(tmp_path.glob(".*.tmp"))  # ...is what a resume deletes
    KILL_POINTS_SURVIVED.append("mid-write of a JSONL file")


def test_every_run_file_is_complete_json(tiny_gpt2, tmp_path):
    """After a run, every .json/.jsonl parses line by line and files are group/world readable as the umask says."""
    from kcollapse.loop import run_experiment

    data = kill_config(tiny_gpt2)
    data.update(generations=1)
    data["eval"].update(formats=["cloze"], free_text=False)
    out = run_experiment(validate(data), tmp_path / "run")
    for path in list(out.rglob("*.jsonl")) + list(out.rglob("*.json")):
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            assert text == "" or text.endswith("\n")
            for line in text.splitlines():
                json.loads(line)
        else:
            json.loads(text)
    umask = os.umask(0o022)
    os.umask(umask)
    assert (out / "metrics.jsonl").stat().st_mode & 0o777 == 0o666 & ~umask


# ------------------------------------------------------------------------------------------ the lock
HOLDER = """
import sys, time
from kcollapse.io import RunLock
with RunLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_live_lock_refuses_and_a_killed_holders_lock_is_taken_over(tmp_path, tiny_gpt2):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=rf"in use by a running kcollapse process \(pid {holder.pid}"):
            with RunLock(run):
                pass
        cfg = _dump(tmp_path, {**kill_config(tiny_gpt2)})
        result = CliRunner().invoke(app, ["run", str(cfg), "--out", str(run)])
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and f"pid {holder.pid}" in lines[0], result.output
    finally:
        holder.kill()
        holder.wait()
    assert json.loads((run / ".lock").read_text())["pid"] == holder.pid  # left behind by the killed holder
    with RunLock(run):  # the pid is gone: taken over
        assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
    assert not (run / ".lock").exists()


def test_old_style_lock_of_a_dead_pid_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(str(dead.pid))
    with RunLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


def test_sigterm_stops_a_run_like_ctrl_c():
    from kcollapse.cli import _sigterm_as_interrupt

    with pytest.raises(KeyboardInterrupt):
        with _sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert signal.getsignal(signal.SIGTERM) is not None  # the previous handler is back
