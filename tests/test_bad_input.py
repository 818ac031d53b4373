"""Bad input never becomes a traceback: one `error:` line naming the file/field, exit code 2, no run directory.

Every case runs the real command line (`kcollapse run CONFIG --out DIR`, in-process through typer's runner) on the
tiny GPT-2 fixture, the small corpus and the small benchmark, with one thing wrong. A property-based test fuzzes
configs and `--set` values: each is a valid run config or one clean error line, never an exception.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from kcollapse.cli import app
from kcollapse.config import ExperimentConfig, load_config
from kcollapse.errors import UserError

from conftest import DATA

BAD_INPUTS_TRIED: list[str] = []  # the count goes in the reliability note


def base_config(model) -> dict:
    return {
        "model": str(model), "threads": 1,
        "corpus": {"path": str(DATA / "corpus.txt"), "min_chars": 20, "heldout_share": 0.1},
        "block_tokens": 16, "prompt_tokens": 8, "new_tokens": 8, "samples_per_generation": 8, "generations": 1,
        "arms": [{"name": "a", "synthetic_ratio": 0.5}],
        "train": {"lr": 1e-3, "max_steps": 1, "chunk_tokens": 64, "batch_size": 2, "grad_accum": 1,
                  "gradient_checkpointing": False},
        "eval": {"benchmark": str(DATA / "bench.jsonl"), "limit": 2, "formats": ["cloze"], "free_text": False},
    }


def assert_one_clean_line(result, out: Path | None, expected: str | list[str]):
    """Exit 2, exactly one non-empty stderr line `error: ...` holding the expected text, no traceback, no run dir."""
    stderr_lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert len(stderr_lines) == 1, stderr_lines
    line = stderr_lines[0]
    assert line.startswith("error: "), line
    for text in [expected] if isinstance(expected, str) else expected:
        assert text in line, (text, line)
    assert "Traceback" not in result.output and result.stdout.strip() == ""
    if out is not None:
        assert not out.exists(), f"{out} was left behind by a run that never started"
    return line


def run_cli(args: list[str]):
    return CliRunner().invoke(app, [str(a) for a in args])


# ------------------------------------------------------------------------------------------ config files
def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


CONFIG_FILE_CASES = {
    # name: (config file contents or None for "missing", expected text)
    "missing config": (None, ["cfg.yaml", "config file not found"]),
    "config not UTF-8": (b"model: \xff\xfe organism\n", ["cfg.yaml", "cannot read config file"]),
    "YAML syntax error": ("model: organism\ntrain:\n  lr: [1e-5\n", ["cfg.yaml", "YAML syntax error at line 4"]),
    "YAML tab indentation": ("train:\n\tlr: 1\n", ["cfg.yaml", "YAML syntax error at line 2"]),
    "YAML top level a list": ("- model\n- organism\n", ["cfg.yaml", "expected a mapping", "found list"]),
    "YAML nested 5000 deep": ("generations: " + "[" * 5000 + "]" * 5000 + "\n", ["cfg.yaml", "nested too deeply"]),
    "unknown key": ("modle: organism\n", ["cfg.yaml", "unknown key 'modle'"]),
    "unknown nested key": ("train:\n  lrr: 0.1\n", ["unknown key 'train.lrr'"]),
    "wrong type": ("block_tokens: many\n", ["block_tokens", "valid integer", "'many'"]),
    "wrong type section": ("train: 5\n", ["train", "found 5"]),
    "synthetic_ratio above 1": ("arms: [{name: a, synthetic_ratio: 1.5}]\n", ["arms.0.synthetic_ratio", "1.5"]),
    "synthetic_ratio below 0": ("arms: [{name: a, synthetic_ratio: -0.1}]\n", ["arms.0.synthetic_ratio", "-0.1"]),
    "synthetic_ratio missing": ("arms: [{name: a}]\n", ["arms.0.synthetic_ratio", "Field required"]),
    "generations 0": ("generations: 0\n", ["generations", "greater than or equal to 1", "found 0"]),
    "generations negative": ("generations: -3\n", ["generations", "found -3"]),
    "lr zero": ("train: {lr: 0}\n", ["train.lr", "greater than 0"]),
    "lr negative": ("train: {lr: -1e-5}\n", ["train.lr", "greater than 0"]),
    "lr a string": ("train: {lr: fast}\n", ["train.lr", "'fast'"]),
    "no arms": ("arms: []\n", ["arms", "at least 1"]),
    "duplicate arm names": ("arms: [{name: a, synthetic_ratio: 0}, {name: a, synthetic_ratio: 1}]\n", ["unique"]),
    "arm name with a path": ("arms: [{name: ../evil, synthetic_ratio: 0.5}]\n", ["arms.0.name"]),
    "unknown mode": ("arms: [{name: a, synthetic_ratio: 0.5, mode: mix}]\n", ["arms.0.mode", "'mix'"]),
    "subsample mode misspelt": ("arms: [{name: a, synthetic_ratio: 0.5, mode: accumulate_subsampled}]\n",
                                ["arms.0.mode", "accumulate_subsample", "'accumulate_subsampled'"]),
    "permutation not a boolean": ("eval: {permutation: maybe}\n", ["eval.permutation", "valid boolean", "'maybe'"]),
    "position-bias rule above 1": ("stages: {position_bias: 1.5}\n", ["stages.position_bias", "1.5"]),
    "unknown device": ("device: gpu\n", ["device", "'gpu'"]),
    "prompt longer than block": ("block_tokens: 8\nprompt_tokens: 9\n", ["prompt_tokens must be <= block_tokens"]),
    "unknown format": ("eval: {formats: [multiple_choise]}\n", ["eval", "unknown format 'multiple_choise'"]),
    "no formats": ("eval: {formats: []}\n", ["eval", "formats: empty list"]),
    "few-shot file missing": ("eval: {few_shot_file: /nonexistent/shots.jsonl}\n", ["few_shot_file", "does not exist"]),
    "formats file missing": ("eval: {formats_file: /nonexistent/f.yaml}\n", ["formats_file", "does not exist"]),
    "unknown scoring": ("eval: {scoring: magic}\n", ["eval.scoring", "'magic'"]),
    "limit zero": ("eval: {limit: 0}\n", ["eval.limit"]),
    "heldout_share 1": ("corpus: {heldout_share: 1.0}\n", ["corpus.heldout_share"]),
    "unknown organism relation": ("organism: {relations: [capital, birthday]}\n", ["organism.relations", "'birthday'"]),
    "exercise share above 1": ("organism: {qa_exercises: {cloze: 1.5}}\n", ["organism.qa_exercises", "between 0 and 1"]),
    "unknown exercise format": ("organism: {qa_exercises: {essay: 1.0}}\n", ["organism.qa_exercises", "essay"]),
}


@pytest.mark.parametrize("name", list(CONFIG_FILE_CASES))
def test_bad_config_file(name, tmp_path):
    content, expected = CONFIG_FILE_CASES[name]
    cfg = tmp_path / "cfg.yaml"
    if content is not None:
        _write(cfg, content)
    out = tmp_path / "run"
    assert_one_clean_line(run_cli(["run", cfg, "--out", out]), out, expected)
    BAD_INPUTS_TRIED.append(name)


FORMATS_FILE_CASES = {
    "formats file unknown placeholder": ('mine:\n  template: "Q: {question} {questoin}"\n', "unknown placeholder {questoin}"),
    "formats file attribute placeholder": ('mine:\n  template: "{question.__class__}"\n', "unknown placeholder"),
    "formats file unbalanced brace": ('mine:\n  template: "Q: {question} {"\n', "write {{ and }} for braces"),
    "formats file without template": ("mine:\n  answer: letter\n", "needs a 'template' string"),
    "formats file bad answer kind": ('mine:\n  template: "{question}"\n  answer: number\n', "'letter' or 'text'"),
    "formats file not YAML": ("mine: [\n", "cannot read formats file"),
    "formats file not UTF-8": (b"mine: \xff\n", "not UTF-8"),
}


@pytest.mark.parametrize("name", list(FORMATS_FILE_CASES))
def test_bad_formats_file(name, tmp_path, tiny_gpt2):
    content, expected = FORMATS_FILE_CASES[name]
    data = base_config(tiny_gpt2)
    data["eval"] = {**data["eval"], "formats_file": str(_write(tmp_path / "formats.yaml", content)),
                    "formats": ["cloze", "mine"]}
    cfg = _write(tmp_path / "cfg.yaml", yaml.safe_dump(data))
    out = tmp_path / "run"
    assert_one_clean_line(run_cli(["run", cfg, "--out", out]), out, expected)
    BAD_INPUTS_TRIED.append(name)


def test_config_that_is_a_directory(tmp_path):
    out = tmp_path / "run"
    assert_one_clean_line(run_cli(["run", tmp_path, "--out", out]), out, ["is a directory"])
    BAD_INPUTS_TRIED.append("config is a directory")


def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    """An alias bomb (9^9 elements by reference) must not hang in repr() of the error message."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    cfg = _write(tmp_path / "cfg.yaml", "\n".join(lines).replace("a8: &a8", "generations: &a8") + "\n")
    import time

    t0 = time.time()
    assert_one_clean_line(run_cli(["run", cfg, "--out", tmp_path / "run"]), tmp_path / "run", ["cfg.yaml"])
    assert time.time() - t0 < 10
    BAD_INPUTS_TRIED.append("YAML alias bomb")


# ------------------------------------------------------------------------------------------ --set, --preset, --out
SET_CASES = {
    "--set unknown field": (["--set", "train.lrr=1"], "no such field 'train.lrr'"),
    "--set unknown top-level field": (["--set", "nope=1"], "no such field 'nope'"),
    "--set without '='": (["--set", "train.lr"], "expected key.path=value"),
    "--set list index out of range": (["--set", "arms.5.synthetic_ratio=1"], "not an index"),
    "--set into a value": (["--set", "generations.x=1"], "'generations' is not a section"),
    "--set wrong type": (["--set", "train.lr=abc"], "train.lr"),
    "--set ratio out of range": (["--set", "arms.0.synthetic_ratio=2"], "arms.0.synthetic_ratio"),
    "--set generations 0": (["--set", "generations=0"], "generations"),
    "--preset unknown": (["--preset", "quik"], "unknown preset"),
}


@pytest.mark.parametrize("name", list(SET_CASES))
def test_bad_set_and_preset(name, tmp_path, tiny_gpt2):
    extra, expected = SET_CASES[name]
    out = tmp_path / "run"
    args = ["run", "--out", out, *extra] if name.startswith("--preset") else \
        ["run", _write(tmp_path / "cfg.yaml", yaml.safe_dump(base_config(tiny_gpt2))), "--out", out, *extra]
    assert_one_clean_line(run_cli(args), out, expected)
    BAD_INPUTS_TRIED.append(name)


def test_out_that_cannot_be_created_is_one_line(tmp_path, tiny_gpt2):
    """An OS error (here: --out under /proc) is one line too, exit 1, no traceback."""
    cfg = _write(tmp_path / "cfg.yaml", yaml.safe_dump(base_config(tiny_gpt2)))
    result = run_cli(["run", cfg, "--out", "/proc/kcollapse-test/run"])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: /proc/kcollapse-test"), result.output
    assert "Traceback" not in result.output and "resume" not in lines[0]
    BAD_INPUTS_TRIED.append("--out not creatable")


def test_config_and_preset_together(tmp_path, tiny_gpt2):
    cfg = _write(tmp_path / "cfg.yaml", yaml.safe_dump(base_config(tiny_gpt2)))
    assert_one_clean_line(run_cli(["run", cfg, "--preset", "quick", "--out", tmp_path / "r"]), tmp_path / "r",
                          "either a CONFIG file or --preset")
    BAD_INPUTS_TRIED.append("config and preset together")


@pytest.mark.parametrize("where", ["file", "under a file"])
def test_out_pointing_at_a_file(where, tmp_path, tiny_gpt2):
    cfg = _write(tmp_path / "cfg.yaml", yaml.safe_dump(base_config(tiny_gpt2)))
    afile = _write(tmp_path / "afile", "precious")
    out = afile if where == "file" else afile / "run"
    result = run_cli(["run", cfg, "--out", out])
    assert_one_clean_line(result, None, ["--out", "is a file"])
    assert afile.read_text() == "precious"
    BAD_INPUTS_TRIED.append(f"--out {where}")


# ------------------------------------------------------------------------------------------ models
def _save_tiny(tmp_path: Path, tiny_gpt2: Path, name: str) -> Path:
    import shutil

    target = tmp_path / name
    shutil.copytree(tiny_gpt2, target)
    return target


class _Boom:
    """Unpickling this writes a marker file: proof that a pickle was (not) loaded."""

    marker = ""

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "unpickled!"))


def model_pickle_only(tmp_path, tiny_gpt2):
    path = _save_tiny(tmp_path, tiny_gpt2, "pickled")
    from safetensors.torch import load_file

    weights = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    boom = _Boom()
    boom.marker = str(tmp_path / "UNPICKLED")
    torch.save({**weights, "evil": boom}, path / "pytorch_model.bin")
    return path


def _with_tokenizer_of(path, source):
    """Give a model directory the tokenizer files of another checkpoint (so only the model itself is at fault)."""
    for f in source.glob("tokenizer*"):
        (path / f.name).write_bytes(f.read_bytes())
    return path


def model_not_causal(tmp_path, tiny_gpt2):
    from transformers import BertConfig, BertModel

    path = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=400, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(path)
    return _with_tokenizer_of(path, tiny_gpt2)


def model_masked_lm(tmp_path, tiny_gpt2):
    from transformers import BertConfig, BertForMaskedLM

    path = tmp_path / "bert-mlm"
    BertForMaskedLM(BertConfig(vocab_size=400, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32)).save_pretrained(path)
    return _with_tokenizer_of(path, tiny_gpt2)


def model_encoder_decoder(tmp_path, tiny_gpt2):
    from transformers import T5Config, T5ForConditionalGeneration

    path = tmp_path / "t5"
    T5ForConditionalGeneration(T5Config(vocab_size=400, d_model=16, d_ff=16, num_layers=1, num_heads=2,
                                        d_kv=8)).save_pretrained(path)
    return path


def model_remote_code(tmp_path, tiny_gpt2):
    path = _save_tiny(tmp_path, tiny_gpt2, "remote")
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.Evil"}
    (path / "config.json").write_text(json.dumps(config))
    code = f"import pathlib\npathlib.Path({str(tmp_path / 'REMOTE_CODE_RAN')!r}).write_text('ran')\n"
    (path / "configuration_evil.py").write_text(code)
    (path / "modeling_evil.py").write_text(code)
    return path


def model_truncated(tmp_path, tiny_gpt2):
    path = _save_tiny(tmp_path, tiny_gpt2, "truncated")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    return path


def model_missing_weights(tmp_path, tiny_gpt2):
    from safetensors.torch import load_file, save_file

    path = _save_tiny(tmp_path, tiny_gpt2, "partial")
    weights = load_file(path / "model.safetensors")
    weights.pop(sorted(weights)[-1])
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


def model_no_config(tmp_path, tiny_gpt2):
    path = _save_tiny(tmp_path, tiny_gpt2, "noconfig")
    (path / "config.json").unlink()
    return path


def model_bad_config_json(tmp_path, tiny_gpt2):
    path = _save_tiny(tmp_path, tiny_gpt2, "badjson")
    (path / "config.json").write_text("{not json")
    return path


def model_no_tokenizer(tmp_path, tiny_gpt2):
    path = _save_tiny(tmp_path, tiny_gpt2, "notok")
    for f in path.glob("tokenizer*"):
        f.unlink()
    return path


def model_corrupt_tokenizer(tmp_path, tiny_gpt2):
    path = _save_tiny(tmp_path, tiny_gpt2, "badtok")
    (path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "nonsense"}}')
    return path


MODEL_CASES = {
    "model path missing": (lambda tmp, t: tmp / "no-such-model", "does not exist"),
    "model path is a file": (lambda tmp, t: _write(tmp / "model.bin", "x"), "is a file"),
    "model without config.json": (model_no_config, "no config.json"),
    "model config.json not JSON": (model_bad_config_json, "config.json"),
    "model weights only in pickle format": (model_pickle_only, "weights only in pickle format (pytorch_model.bin)"),
    "model not a causal LM (BERT encoder)": (model_not_causal, "missing from the checkpoint (e.g. cls.predictions"),
    "model not a causal LM (BERT masked LM)": (model_masked_lm, "not a causal language model (BertForMaskedLM"),
    "model encoder-decoder (T5)": (model_encoder_decoder, "encoder-decoder"),
    "model needs remote code": (model_remote_code, "trust_remote_code: true"),
    "model weights truncated": (model_truncated, "corrupted or incomplete"),
    "model weights incomplete": (model_missing_weights, "missing from the checkpoint"),
    "model without tokenizer": (model_no_tokenizer, "no usable tokenizer"),
    "model tokenizer corrupted": (model_corrupt_tokenizer, "cannot load a tokenizer"),
}


@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_bad_model(name, tmp_path, tiny_gpt2):
    make, expected = MODEL_CASES[name]
    model = make(tmp_path, tiny_gpt2)
    cfg = _write(tmp_path / "cfg.yaml", yaml.safe_dump({**base_config(tiny_gpt2), "model": str(model)}))
    out = tmp_path / "run"
    assert_one_clean_line(run_cli(["run", cfg, "--out", out]), out, expected)
    assert not (tmp_path / "UNPICKLED").exists(), "a user's pickle was unpickled"
    assert not (tmp_path / "REMOTE_CODE_RAN").exists(), "a model's own code ran without trust_remote_code"
    BAD_INPUTS_TRIED.append(name)


def test_causal_lms_still_load(tmp_path, tiny_gpt2, tiny_gemma):
    """The checks refuse encoders, not causal LMs whose config says is_decoder=False (GPT-NeoX/Pythia) or chat ones."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from kcollapse.models import load_model

    neox = tmp_path / "neox"
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=400, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32)).save_pretrained(neox)
    for f in tiny_gpt2.glob("tokenizer*"):
        (neox / f.name).write_bytes(f.read_bytes())
    for path in (tiny_gpt2, tiny_gemma, neox):
        model, tok = load_model(path, device="cpu")
        assert not model.training and tok.padding_side == "left"


def test_bad_tokenizer_path_and_device(tmp_path, tiny_gpt2):
    for name, over, expected in [
        ("tokenizer path missing", {"tokenizer": str(tmp_path / "no-tokenizer")}, "cannot load a tokenizer"),
        ("device cuda without a GPU", {"device": "cuda"}, "no CUDA GPU"),
    ]:
        if name.startswith("device") and torch.cuda.is_available():
            continue
        cfg = _write(tmp_path / "cfg.yaml", yaml.safe_dump({**base_config(tiny_gpt2), **over}))
        assert_one_clean_line(run_cli(["run", cfg, "--out", tmp_path / "run"]), tmp_path / "run", expected)
        BAD_INPUTS_TRIED.append(name)


# ------------------------------------------------------------------------------------------ corpora
def _lines(n=40, width=80):
    return "\n".join(f"line {i}: " + "the quick brown fox jumps over the lazy dog " * (width // 44 + 1) for i in range(n))


CORPUS_CASES = {
    "corpus missing": (None, ".txt", {}, "does not exist"),
    "corpus empty": ("", ".txt", {}, "has no text of at least 20 characters"),
    "corpus only blank lines": ("\n\n   \n\t\n", ".txt", {}, "has no text"),
    "corpus empty, no minimum length": ("", ".txt", {"corpus": {"min_chars": 0}},
                                        "has no text (every line or record is empty)"),
    "corpus not UTF-8": (b"caf\xe9 " * 40 + b"\n", ".txt", {}, "not UTF-8 text (byte 3)"),
    "corpus UTF-16": ("hello world, a long enough line of text\n".encode("utf-16"), ".txt", {}, "not UTF-8"),
    "corpus texts too short": ("short line\n" * 30, ".txt", {}, "(corpus.min_chars)"),
    "corpus too short for one block": ("a" * 30 + "\n", ".txt", {"block_tokens": 512, "prompt_tokens": 8},
                                       "too short"),
    "corpus unknown file type": (_lines(), ".csv", {}, "'.csv' file"),
    "corpus JSONL line not JSON": ('{"text": "' + "x" * 60 + '"}\n{oops\n', ".jsonl", {}, "line 2 is not valid JSON"),
    "corpus JSONL without text field": ('{"body": "' + "x" * 60 + '"}\n', ".jsonl", {}, "no string field 'text'"),
    "corpus JSONL text not a string": ('{"text": 12345}\n', ".jsonl", {}, "no string field 'text'"),
    "corpus directory without texts": ("DIR", "", {}, "holds no .txt or .jsonl files"),
    "corpus arm domain absent": (_lines(), ".txt", {"arms": [{"name": "a", "synthetic_ratio": 0.5,
                                                              "domain": "chemistry"}]}, "no corpus text has domain"),
    "corpus arm keywords absent": (_lines(), ".txt", {"arms": [{"name": "a", "synthetic_ratio": 0.5,
                                                                "domain_keywords": ["zyzzyva"]}]}, "mentions any of"),
    "corpus arm domain_corpus missing": (_lines(), ".txt", {"arms": [{"name": "a", "synthetic_ratio": 0.5,
                                                                      "domain_corpus": "/nonexistent/c.txt"}]},
                                         "does not exist"),
}


@pytest.mark.parametrize("name", list(CORPUS_CASES))
def test_bad_corpus(name, tmp_path, tiny_gpt2):
    content, suffix, over, expected = CORPUS_CASES[name]
    corpus = tmp_path / f"corpus{suffix}"
    if content == "DIR":
        corpus.mkdir()
        _write(corpus / "notes.md", _lines())
    elif content is not None:
        _write(corpus, content)
    data = base_config(tiny_gpt2)
    data.update({key: value for key, value in over.items() if key != "corpus"})
    data["corpus"] = {**data["corpus"], **over.get("corpus", {}), "path": str(corpus)}  # corpus keys merge
    cfg = _write(tmp_path / "cfg.yaml", yaml.safe_dump(data))
    out = tmp_path / "run"
    assert_one_clean_line(run_cli(["run", cfg, "--out", out]), out, expected)
    BAD_INPUTS_TRIED.append(name)


# ------------------------------------------------------------------------------------------ benchmarks
GOOD_ROW = {"id": "q", "subject": "geo", "question": "Capital of France?", "choices": ["Paris", "Rome"], "answer": 0,
            "statement": "The capital of France is"}


def _bench_rows(**change):
    row = {k: v for k, v in {**GOOD_ROW, **change}.items() if v is not ...}
    return json.dumps(GOOD_ROW) + "\n" + json.dumps(row) + "\n"


BENCH_CASES = {
    "benchmark missing": (None, ".jsonl", {}, "does not exist"),
    "benchmark empty": ("", ".jsonl", {}, "no questions"),
    "benchmark missing column": (_bench_rows(choices=...), ".jsonl", {}, "row 2: missing field 'choices'"),
    "benchmark missing answer": (_bench_rows(answer=...), ".jsonl", {}, "row 2: missing field 'answer'"),
    "benchmark answer index out of range": (_bench_rows(answer=2), ".jsonl", {}, "index 2 out of range for 2 choices"),
    "benchmark negative answer": (_bench_rows(answer=-1), ".jsonl", {}, "out of range"),
    "benchmark answer letter out of range": (_bench_rows(answer="Z"), ".jsonl", {}, "field 'answer'"),
    "benchmark answer a bool": (_bench_rows(answer=True), ".jsonl", {}, "field 'answer'"),
    "benchmark fewer than 2 choices": (_bench_rows(choices=["Paris"]), ".jsonl", {}, "at least 2 choices, found 1"),
    "benchmark choices not a list": (_bench_rows(choices="Paris"), ".jsonl", {}, "at least 2 choices"),
    "benchmark empty question": (_bench_rows(question="  "), ".jsonl", {}, "row 2: field 'question': empty question"),
    "benchmark row not JSON": (json.dumps(GOOD_ROW) + "\n{nope\n", ".jsonl", {}, "row 2: not valid JSON"),
    "benchmark row not an object": (json.dumps(GOOD_ROW) + "\n[1, 2]\n", ".jsonl", {}, "expected a JSON object"),
    "benchmark not UTF-8": (json.dumps(GOOD_ROW).encode() + b"\n\xff\xfe\n", ".jsonl", {}, "row 2: not UTF-8"),
    "benchmark unknown file type": (json.dumps(GOOD_ROW), ".txt", {}, "unknown benchmark file type '.txt'"),
    "benchmark CSV too few columns": ("What?,Paris,A\n", ".csv", {}, "row 1: expected question, at least 2 choices"),
    "benchmark CSV bad answer letter": ("What?,Paris,Rome,Z\n", ".csv", {}, "row 1: field 'answer'"),
    "benchmark CSV with a header row": ("question,A,B,answer\nWhat?,Paris,Rome,A\n", ".csv", {},
                                        "row 1 looks like a header (question, A, B, answer); MMLU CSVs have none"),
    "benchmark unknown subject": (_bench_rows(), ".jsonl", {"subjects": ["astrology"]}, "unknown subject 'astrology'"),
    "benchmark unknown split": (_bench_rows(), ".jsonl", {"split": "heldout"}, "no questions of split 'heldout'"),
    "benchmark few-shot file bad": (_bench_rows(), ".jsonl", {"few_shot_file": "SHOTS"}, "missing field 'answer'"),
}


@pytest.mark.parametrize("name", list(BENCH_CASES))
def test_bad_benchmark(name, tmp_path, tiny_gpt2):
    content, suffix, over, expected = BENCH_CASES[name]
    bench = tmp_path / f"bench{suffix}"
    if content is not None:
        _write(bench, content)
    if over.get("few_shot_file") == "SHOTS":
        over = {**over, "few_shot_file": str(_write(tmp_path / "shots.jsonl", _bench_rows(answer=...)))}
    data = base_config(tiny_gpt2)
    data["eval"] = {**data["eval"], "benchmark": str(bench), **over}
    cfg = _write(tmp_path / "cfg.yaml", yaml.safe_dump(data))
    out = tmp_path / "run"
    assert_one_clean_line(run_cli(["run", cfg, "--out", out]), out, expected)
    BAD_INPUTS_TRIED.append(name)


def test_debug_shows_the_traceback(tmp_path):
    """--debug is the way to a traceback: the UserError propagates instead of the one line."""
    result = run_cli(["run", tmp_path / "nope.yaml", "--out", tmp_path / "run", "--debug"])
    assert result.exit_code != 0 and isinstance(result.exception, UserError)


def test_usage_errors_are_not_tracebacks(tmp_path):
    """Typos in the command line itself (click's usage errors): exit 2, no traceback, nothing written."""
    for args in (["run", "--outt", tmp_path / "run"], ["runn"], ["run", "--set"]):
        result = run_cli(args)
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert not (tmp_path / "run").exists()
        BAD_INPUTS_TRIED.append("usage: " + " ".join(map(str, args[:2])))


def test_bad_input_count_is_reported():
    """Not a check: prints how many bad inputs this module tried (for the reliability note)."""
    print(f"\nbad inputs tried: {len(BAD_INPUTS_TRIED)}")


# ------------------------------------------------------------------------------------------ fuzzing
FIELDS = sorted(k for k in __import__("kcollapse.config", fromlist=["flatten"]).flatten(
    ExperimentConfig(arms=[{"name": "a", "synthetic_ratio": 0.5}]).model_dump(mode="json")))
KEYS = st.one_of(st.sampled_from(FIELDS), st.sampled_from(["arms.0.synthetic_ratio", "arms.0.mode", "arms.1.name",
                                                           "train", "eval", "arms", "corpus"]),
                 st.text(min_size=0, max_size=12))
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=20), st.sampled_from(["1e-5", "0.5", "-1", "[cloze]", "{a: 1}", "nan", ".inf",
                                                           "~", "''", "[", "]", ":", "!!python/object:os.system",
                                                           "&a [*a]", "\x00", "\ud800", "1.5", "organism"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                     st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)


def _nest(flat: dict) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, last = key.split(".")
        for p in parents:
            child = node.get(p)
            if not isinstance(child, dict):
                child = node[p] = {}
            node = child
        node[last] = value
    return out


def _check_outcome(call):
    try:
        cfg = call()
    except UserError as e:
        msg = str(e)
        assert msg and "\n" not in msg and "Traceback" not in msg and len(msg) < 2000, msg
        return None
    assert isinstance(cfg, ExperimentConfig)
    return cfg


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(flat=st.dictionaries(KEYS, VALUES, max_size=5), raw_yaml=st.booleans(), junk=st.text(max_size=40))
def test_fuzzed_config_files_load_or_fail_in_one_line(tmp_path_factory, flat, raw_yaml, junk):
    path = tmp_path_factory.mktemp("fuzz") / "cfg.yaml"
    if raw_yaml:  # arbitrary text as a config file
        path.write_text(junk, encoding="utf-8", errors="surrogatepass")
    else:
        try:
            path.write_text(yaml.safe_dump(_nest(flat), allow_unicode=False))
        except (yaml.YAMLError, UnicodeEncodeError):
            return
    _check_outcome(lambda: load_config(path))


@settings(max_examples=200, deadline=None)
@given(overrides=st.lists(st.one_of(
    st.builds(lambda k, v: f"{k}={v}", KEYS, st.one_of(st.text(max_size=20), SCALARS.map(str))),
    st.text(max_size=30)), min_size=1, max_size=4))
def test_fuzzed_set_values_load_or_fail_in_one_line(overrides):
    _check_outcome(lambda: load_config(preset="quick", overrides=overrides))


@settings(max_examples=40, deadline=None)
@given(overrides=st.lists(st.builds(lambda k, v: f"{k}={v}", KEYS, SCALARS.map(str)), min_size=1, max_size=3))
def test_fuzzed_set_through_the_cli(overrides, monkeypatch_module):
    """Through the command line: exit 0 (the run itself is stubbed out) or exit 2 with one `error:` line."""
    result = CliRunner().invoke(app, ["run", "--preset", "quick", "--out", "/nonexistent-dir/run",
                                      *[a for o in overrides for a in ("--set", o)]])
    if result.exit_code == 0:
        assert monkeypatch_module
        return
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (result.output,
                                                                                          result.exception)


@pytest.fixture(scope="module")
def monkeypatch_module():
    """The run itself replaced by a stub: the fuzz tests the config path only."""
    import kcollapse.loop

    mp = pytest.MonkeyPatch()
    calls = []
    mp.setattr(kcollapse.loop, "run_experiment", lambda cfg, out: calls.append(cfg))
    yield calls
    mp.undo()
