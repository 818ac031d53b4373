"""Config loading, validation and --set overrides: valid configs load, every mistake is one clear line."""

import pytest
import yaml
from typer.testing import CliRunner

from kcollapse.cli import app
from kcollapse.config import ExperimentConfig, apply_overrides, differing_fields, load_config, read_yaml, validate
from kcollapse.errors import UserError


def test_presets_load_and_differ():
    default, quick = load_config(preset="default"), load_config(preset="quick")
    assert default.model == "organism" and quick.model == "organism"
    assert quick.generations < default.generations
    assert {a.synthetic_ratio for a in default.arms} >= {0.0, 0.5, 1.0}
    assert any(a.domain for a in default.arms)


def test_defaults_are_the_papers_protocol():
    cfg = ExperimentConfig()
    assert (cfg.block_tokens, cfg.new_tokens, cfg.samples_per_generation, cfg.generations) == (64, 64, 8000, 16)
    t = cfg.train
    assert (t.lr, t.epochs, t.chunk_tokens, t.batch_size, t.grad_accum, t.weight_decay) == (1e-5, 0.5, 512, 1, 4, 0.01)
    assert t.gradient_checkpointing and cfg.prompt_tokens is None


def test_set_overrides_nested_list_and_plain_paths(tmp_path):
    cfg = load_config(preset="quick", overrides=[f"corpus={tmp_path}/c.txt", f"model={tmp_path}/m",
                                                  "arms.1.synthetic_ratio=0.75", "train.lr=2e-4", "eval.formats=[cloze]"])
    assert cfg.corpus.path == f"{tmp_path}/c.txt" and cfg.model == f"{tmp_path}/m"
    assert cfg.arms[1].synthetic_ratio == 0.75 and cfg.train.lr == 2e-4 and cfg.eval.formats == ["cloze"]


def test_corpus_filters_resolve_to_keep_everything_only_when_the_organism_trains_on_its_own_corpus(tmp_path):
    """The organism's real pool is generation 0's training set as it is; any other corpus gets the paper's filters
    (50 characters, a quarter block); a value the user sets is kept; config.yaml shows the resolved values."""
    own = load_config(preset="default")
    assert (own.corpus.min_chars, own.corpus.min_block_tokens) == (0, 1)
    gemma = load_config(preset="gemma3-270m")  # the organism's prose for a pre-trained model: just a corpus
    assert (gemma.corpus.min_chars, gemma.corpus.min_block_tokens) == (50, gemma.block_tokens // 4)
    text = validate({"corpus": f"{tmp_path}/c.txt", "block_tokens": 32})
    assert (text.corpus.min_chars, text.corpus.min_block_tokens) == (50, 8)
    chosen = load_config(preset="default", overrides=["corpus.min_chars=50", "corpus.min_block_tokens=16"])
    assert (chosen.corpus.min_chars, chosen.corpus.min_block_tokens) == (50, 16)
    again = validate(yaml.safe_load(yaml.safe_dump(own.model_dump(mode="json"))))
    assert again == own


@pytest.mark.parametrize("data, expected", [
    ({"foo": 1}, "unknown key 'foo'"),
    ({"train": {"lrr": 1}}, "unknown key 'train.lrr'"),
    ({"generations": 0}, "generations"),
    ({"train": {"lr": 0}}, "train.lr"),
    ({"train": {"lr": -1e-5}}, "train.lr"),
    ({"arms": [{"name": "a", "synthetic_ratio": 1.5}]}, "arms.0.synthetic_ratio"),
    ({"arms": [{"name": "a", "synthetic_ratio": -0.1}]}, "arms.0.synthetic_ratio"),
    ({"arms": [{"name": "a", "synthetic_ratio": 0.5, "mode": "mix"}]}, "arms.0.mode"),
    ({"arms": [{"name": "a", "synthetic_ratio": 0.5}, {"name": "a", "synthetic_ratio": 1}]}, "unique"),
    ({"block_tokens": "many"}, "block_tokens"),
    ({"prompt_tokens": 100, "block_tokens": 64}, "prompt_tokens"),
    ({"device": "gpu"}, "device"),
    ({"corpus": {"min_block_tokens": 0}}, "corpus.min_block_tokens"),
    ({"corpus": {"min_chars": -1}}, "corpus.min_chars"),
])
def test_invalid_configs_name_the_field(data, expected):
    with pytest.raises(UserError) as err:
        validate(data, "cfg.yaml")
    msg = str(err.value)
    assert expected in msg and "\n" not in msg and msg.startswith("cfg.yaml")


def test_yaml_syntax_error_has_line_number(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: organism\ntrain:\n  lr: [1e-5\n")
    with pytest.raises(UserError, match=r"bad.yaml: YAML syntax error at line \d+"):
        read_yaml(bad)


@pytest.mark.parametrize("override, expected", [
    ("train.nope=1", "no such field 'train.nope'"),
    ("nope=1", "no such field 'nope'"),
    ("arms.9.synthetic_ratio=1", "not an index"),
    ("train.lr=abc", "train.lr"),
    ("novalue", "expected key.path=value"),
])
def test_bad_set_overrides(override, expected):
    with pytest.raises(UserError, match=expected):
        load_config(preset="quick", overrides=[override])


def test_differing_fields_ignores_runtime_only_fields():
    a = ExperimentConfig().model_dump(mode="json")
    b = apply_overrides(a, ["train.lr=1e-3", "device=cpu", "eval.batch_size=7"])
    assert differing_fields(a, b) == ["train.lr"]


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(app, ["run", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "r")])
    assert missing.exit_code == 2 and "config file not found" in missing.output
    assert "Traceback" not in missing.output and not (tmp_path / "r").exists()
    bad_set = runner.invoke(app, ["run", "--preset", "quick", "--set", "generations=0", "--out", str(tmp_path / "r")])
    assert bad_set.exit_code == 2 and "generations" in bad_set.output and not (tmp_path / "r").exists()
    afile = tmp_path / "afile"
    afile.write_text("x")
    out_file = runner.invoke(app, ["run", "--preset", "quick", "--out", str(afile)])
    assert out_file.exit_code == 2 and "is a file" in out_file.output


def test_init_writes_a_config_that_validates(tmp_path):
    target = tmp_path / "exp.yaml"
    result = CliRunner().invoke(app, ["init", str(target)])
    assert result.exit_code == 0, result.output
    cfg = validate(yaml.safe_load(target.read_text()))
    assert cfg.model == "organism" and cfg.eval.benchmark == "organism"
    again = CliRunner().invoke(app, ["init", str(target)])
    assert again.exit_code == 2 and "already exists" in again.output
