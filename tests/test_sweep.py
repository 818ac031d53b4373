"""`kcollapse sweep` on Ray end to end (tiny GPT-2, 2 trials), resume of an interrupted trial, grid validation,
and the single-process `accelerate launch` path on CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from kcollapse import sweep
from kcollapse.config import load_config
from kcollapse.errors import UserError

from conftest import corpus_lines, interrupted
from test_loop import tiny_config

ray = pytest.importorskip("ray")


ARMS = [{"name": "general", "synthetic_ratio": 1.0}, {"name": "geo", "synthetic_ratio": 1.0, "domain": "geography"}]


def write_config(tmp, model, arms=ARMS, **over) -> "os.PathLike":
    """The tiny loop config with a domain-tagged corpus: a general arm and a geography arm at alpha 1.0."""
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": l, "domain": "chemistry" if "chemical element" in l else "geography"})
                              + "\n" for l in corpus_lines()))
    cfg = tiny_config(model, arms, generations=1, **{"corpus.path": str(corpus), "eval.formats": ["cloze", "multiple_choice"],
                                                      "eval.free_text": False, **over})
    path = tmp / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def swept(tiny_gpt2, tmp_path_factory, ray_local):
    """Trial seed1 interrupted in-process (gen 0 and the general arm done, killed while training geo), then the
    sweep: seed0 runs from scratch and seed1 resumes, both as Ray tasks."""
    from kcollapse.loop import run_experiment

    tmp = tmp_path_factory.mktemp("sweep")
    config, out = write_config(tmp, tiny_gpt2), tmp / "sweep"
    partial = out / "trials" / "lr=0.001__seed1"
    with pytest.MonkeyPatch.context() as mp:
        interrupted(mp, 2, lambda: run_experiment(load_config(config, ["train.lr=0.001", "seed=1", "threads=1"]), partial))
    before = {p: p.stat().st_mtime_ns for p in (partial / "gen_0/metrics.jsonl", partial / "arms/general/gen_1/metrics.jsonl")}
    assert not json.loads((partial / "state.json").read_text())["complete"]
    sweep.sweep_command(config, ["train.lr=0.001"], 2, None, 1, out)
    return config, out, before


def test_sweep_runs_trials_on_ray_and_summarises(swept):
    config, out, _ = swept
    trials = sorted(p.name for p in (out / "trials").iterdir())
    assert trials == ["lr=0.001__seed0", "lr=0.001__seed1"]
    for name in trials:  # ordinary, complete run directories with their own seed
        run = out / "trials" / name
        assert json.loads((run / "state.json").read_text())["complete"] is True
        assert yaml.safe_load((run / "config.yaml").read_text().split("\n", 1)[1])["seed"] == int(name[-1])
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 2 * 2 * 2  # trials x arms x generations 0..1
    for col in ["trial", "train.lr", "seed", "arm", "synthetic_ratio", "domain", "generation", "accuracy/cloze",
                "accuracy_heldout/cloze", "accuracy_geography/multiple_choice", "perplexity_heldout", "train_tokens"]:
        assert col in summary.columns, col
    assert set(summary['train.lr']) == {0.001} and set(summary.seed) == {0, 1}
    res = json.loads((out / "resistance.json").read_text())
    (c,) = res["points"]["lr=0.001"]["comparisons"]
    assert (c["domain_arm"], c["general_arm"], c["domain"], c["seeds"]) == ("geo", "general", "geography", [0, 1])
    assert c["method"].startswith("paired bootstrap over seeds") and set(c["formats"]) == {"cloze", "multiple_choice", "all"}
    assert c["train_tokens"]["geo"] > 0 and c["train_tokens"]["general"] > 0  # equal compute, stated
    point = res["points"]["lr=0.001"]
    for arm in ("general", "geo"):  # regimes from retention above chance, recomputed from summary.csv's accuracies
        acc = summary[summary.arm == arm].groupby("generation")[["accuracy/cloze", "accuracy/multiple_choice"]].mean()
        chance = point["comparisons"][0]["chance"]
        want = [(acc.loc[1, f"accuracy/{f}"] - chance[f]) / (acc.loc[0, f"accuracy/{f}"] - chance[f])
                for f in ("cloze", "multiple_choice") if acc.loc[0, f"accuracy/{f}"] - chance[f] > 0.05]
        got = point["regimes"][arm]["all"]
        assert (got["retention"] is None) == (not want)
        if want:
            assert got["retention"] == pytest.approx(sum(want) / len(want))
            r = got["retention"]
            assert got["regime"] == ("homeostatic" if r > 0.8 else "bounded" if r >= 0.6 else "degradative")
        else:
            assert got["regime"] is None
    f = c["formats"]["all"]
    assert f["ci_kind"] in ("two-sided", "lower bound", "upper bound", "unbounded", "n/a")
    if f["censored"]["geo"] and not f["censored"]["general"]:  # a domain arm that never falls: a bound, no point
        assert f["ci"] is None or f["ci"][1] is None
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "<script" not in html and "Resistance factor" in html
    assert "lr=0.001__seed1" in html and "homeostatic: retention &gt; 0.8" in html


def test_an_interrupted_trial_resumes_and_finished_trials_are_kept(swept, capsys):
    config, out, before = swept
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # seed1 resumed, not restarted
    watched = [p for p in (out / "trials").rglob("*") if p.name in ("state.json", "metrics.jsonl", "config.yaml")]
    stamps = {p: p.stat().st_mtime_ns for p in watched}
    sweep.sweep_command(config, ["train.lr=0.001"], 2, None, 1, out)  # everything finished: nothing runs again
    assert {p: p.stat().st_mtime_ns for p in watched} == stamps
    text = capsys.readouterr().out
    assert "2 finished, 0 to run" in text and "resistance factor" in text and "95% CI" in text and "regime geo" in text
    saved = (out / "resistance.json").read_text()
    sweep.report_sweep(out)  # the summary again from SWEEP/sweep.json alone
    assert (out / "resistance.json").read_text() == saved


def test_a_finished_trial_is_unfinished_for_a_sweep_that_asks_for_more_generations(swept):
    """So re-running a sweep with a larger `generations` extends its trials (the loop's extension) instead of
    skipping them as done."""
    _, out, _ = swept
    for trial in (out / "trials").iterdir():
        assert sweep.finished(trial) and sweep.finished(trial, 1) and not sweep.finished(trial, 2)


def test_a_bad_grid_value_is_one_error_and_writes_nothing(tiny_gpt2, tmp_path):
    config, out = write_config(tmp_path, tiny_gpt2), tmp_path / "sweep"
    for grid, msg in [(["arms.0.synthetic_ratio=0.5,1.5"], r"--grid synthetic_ratio=1.5: arms.0.synthetic_ratio: .*1\.5"),
                      (["train.nope=1"], r"--grid nope=1: .*no such field 'train.nope'"),
                      (["train.lr"], r"expected key.path=v1,v2"), (["seed=1,2"], r"--seeds"),
                      (["train.lr=1e-3,"], "empty value")]:
        with pytest.raises(UserError, match=msg) as err:
            sweep.sweep_command(config, grid, 2, None, 1, out)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="--seeds 0"):
        sweep.sweep_command(config, [], 0, None, 1, out)
    from typer.testing import CliRunner

    from kcollapse.cli import app

    res = CliRunner().invoke(app, ["sweep", str(config), "--grid", "train.lr=1e-3,-1", "--seeds", "2", "--out", str(out)])
    assert res.exit_code == 2 and res.output.strip().count("\n") == 0
    assert res.output.startswith("error: --grid lr=-1: train.lr: Input should be greater than 0")
    assert not out.exists()


def test_grid_parsing_and_trial_names(tiny_gpt2, tmp_path):
    assert sweep.parse_grid(["eval.formats=[cloze,multiple_choice],[cloze]", "train.lr=1e-3"]) == [
        ("eval.formats", ["[cloze,multiple_choice]", "[cloze]"]), ("train.lr", ["1e-3"])]
    config = write_config(tmp_path, tiny_gpt2)
    trials = sweep.plan(config, ["arms.0.synthetic_ratio=0.5,1.0", "arms.1.synthetic_ratio=1.0"], 2, 1, tmp_path / "s")
    assert [t.name for t in trials][:3] == ["arms.0.synthetic_ratio=0.5,arms.1.synthetic_ratio=1.0__seed0",
                                            "arms.0.synthetic_ratio=0.5,arms.1.synthetic_ratio=1.0__seed1",
                                            "arms.0.synthetic_ratio=1.0,arms.1.synthetic_ratio=1.0__seed0"]
    assert sweep.plan(config, ["train.lr=1e-3,2e-3"], 1, 1, tmp_path / "s")[1].name == "lr=2e-3__seed0"
    names = [t.name for t in sweep.plan(config, ["eval.formats=[cloze],[cloze, multiple_choice]"], 1, 1, tmp_path / "s")]
    assert names == ["formats=cloze__seed0", "formats=cloze_multiple_choice__seed0"]
    assert trials[0].cfg.arms[0].synthetic_ratio == 0.5 and trials[1].cfg.seed == 1 and trials[1].cfg.threads == 1
    assert sweep.plan(config, [], 1, 1, tmp_path / "s")[0].name == "base__seed0"


def test_accelerate_launch_single_process_on_cpu(tiny_gpt2, tmp_path):
    """The path multi-GPU runs take (docs/multi_gpu.md), with one CPU process: an ordinary, complete run."""
    if not shutil.which("accelerate"):
        pytest.skip("accelerate CLI not installed")
    config = write_config(tmp_path, tiny_gpt2, arms=[{"name": "a", "synthetic_ratio": 1.0}], **{"eval.formats": ["cloze"]})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = ["accelerate", "launch", "--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1", "-m", "kcollapse", "run", str(config),
           "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "run/state.json").read_text())["complete"] is True
    assert (tmp_path / "run/arms/a/gen_1/model/model.safetensors").exists()


def test_warming_an_organism_trial_builds_the_generation_0_its_run_then_uses(tmp_path):
    """sweep.warm_organism (a Ray task before the trials) builds the world and generation 0 in the trial's cache; the
    run's own preparation then finds exactly that checkpoint."""
    from pathlib import Path

    import torch

    from kcollapse import loop

    tiny = ["organism.domains=[chemistry]", "organism.steps=2", "organism.n_embd=16", "organism.n_layer=1",
            "organism.n_head=2", "organism.n_positions=32", "organism.paragraphs_per_entity=1", f"cache_dir={tmp_path}"]
    cfg = load_config(preset="quick", overrides=tiny)
    threads = torch.get_num_threads()
    try:
        warmed = Path(sweep.warm_organism(cfg, 1))
    finally:
        torch.set_num_threads(threads)  # the task sets its own count: keep this process's for the other tests
    assert (warmed / "organism.json").is_file() and warmed.parent == tmp_path
    assert loop.prepare(cfg)[0] == warmed
