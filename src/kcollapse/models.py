"""Loading and saving models: any Hugging Face causal LM, safely.

Every generation's model is an ordinary HF checkpoint on disk (safetensors), whether it started as GPT-2, Gemma 3
or the offline organism; there is no special path for any of them. Pickled weights are refused (they can run
code on load) and `trust_remote_code` is off unless the config turns it on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from kcollapse.errors import UserError
from kcollapse.io import atomic_replace_dir, current_umask

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device: '{name}' requested but no CUDA GPU is available (use device: cpu or auto)")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[name]


CHECKSUMS = "kcollapse_checksums.json"  # written by save_model, verified by load_model


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_checkpoint_dir(path: Path, trust_remote_code: bool = False) -> None:
    """Refuse what would be unsafe or silently wrong to load: no config, pickled weights only, remote code not asked
    for, or weights that differ from the checksums save_model wrote (a corrupted or partly copied checkpoint)."""
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: not a Hugging Face model directory (no config.json)")
    if not list(path.glob("*.safetensors")):
        pickled = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
        if pickled:
            raise UserError(f"{path}: weights only in pickle format ({pickled[0]}); convert them to safetensors first")
        raise UserError(f"{path}: no model weights (*.safetensors) found")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}/config.json: not a valid JSON model config ({e.__class__.__name__})") from None
    if isinstance(config, dict) and config.get("auto_map") and not trust_remote_code:
        raise UserError(f"{path}: this model needs its own Python code to load (auto_map in config.json); kcollapse "
                        "does not run it unless you set trust_remote_code: true")
    sums = path / CHECKSUMS
    if sums.is_file():
        try:
            expected = json.loads(sums.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            expected = None
        if not isinstance(expected, dict):
            raise UserError(f"{sums}: checksum file is corrupted; delete the checkpoint to redo its generation")
        for name, digest in expected.items():
            f = path / str(name)
            if not f.is_file() or sha256_file(f) != digest:
                redo = (f", or delete {path.parent} and run again to redo that generation"
                        if path.parent.name.startswith("gen_") else "")
                raise UserError(f"{f}: checkpoint is corrupted or incomplete (checksum mismatch); restore it{redo}")


def _check_causal(path: str, config) -> None:
    if getattr(config, "is_encoder_decoder", False):
        raise UserError(f"model: {path} is an encoder-decoder ({config.model_type}); expected a causal language model")


def _attends_ahead(model) -> bool:
    """True when the first positions' logits depend on later tokens: a bidirectional encoder (e.g. a BERT masked-LM
    checkpoint, which AutoModelForCausalLM loads as BertLMHeadModel without complaint), not a causal LM. Two short
    forwards whose inputs share the first two tokens; in a causal LM those positions come out identical."""
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(0)
    a_ids, b_ids = torch.randint(0, vocab, (1, 16), generator=gen), torch.randint(0, vocab, (1, 16), generator=gen)
    b_ids[0, :2] = a_ids[0, :2]
    device = next(model.parameters()).device
    with torch.inference_mode():
        a = model(input_ids=a_ids.to(device)).logits[0, :2].float()
        b = model(input_ids=b_ids.to(device)).logits[0, :2].float()
    tolerance = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2  # rounding in half precision
    return bool((a - b).abs().max() > tolerance * a.std().clamp(min=1e-6))


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer  # deferred: transformers is slow to import

    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # missing files, a corrupted tokenizer.json (tokenizers raises a bare Exception), ...
        raise UserError(f"{path}: cannot load a tokenizer ({type(e).__name__}: {_first_line(e)})") from None
    if len(tokenizer) < 2 or not tokenizer("hello world", add_special_tokens=False)["input_ids"]:
        # transformers 5 builds an empty tokenizer from a directory without tokenizer files instead of failing
        raise UserError(f"{path}: no usable tokenizer (no tokenizer files, or an empty vocabulary); "
                        "add the tokenizer files or set `tokenizer:` to a tokenizer directory or hub id")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "left"  # generation and last-position scoring need left padding
    return tokenizer


def load_model(path: str | Path, *, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False,
               tokenizer_path: str | None = None):
    """(model, tokenizer) from a local checkpoint dir or a hub id, in eval mode on the resolved device."""
    from transformers import AutoConfig, AutoModelForCausalLM  # deferred: transformers is slow to import

    path = str(path)
    local = Path(path)
    if local.exists():
        if not local.is_dir():
            raise UserError(f"model: {path} is a file; expected a checkpoint directory or a hub id")
        _check_checkpoint_dir(local, trust_remote_code)
    elif path.startswith((".", "/", "~")) or os.sep in path and not _looks_like_hub_id(path):
        raise UserError(f"model: {path} does not exist")
    dev = resolve_device(device)
    with quiet_transformers():  # the load report and bars are replaced by the one-line checks below
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise UserError(f"model: cannot load {path} ({_first_line(e)})") from None
        _check_causal(path, config)
        try:
            model, info = AutoModelForCausalLM.from_pretrained(
                path, config=config, dtype=resolve_dtype(dtype, dev), use_safetensors=True,
                trust_remote_code=trust_remote_code, output_loading_info=True,
            )
        except ValueError as e:
            raise UserError(f"model: {path} is not a causal language model ({_first_line(e)})") from None
        except OSError as e:
            raise UserError(f"model: cannot load {path} ({_first_line(e)})") from None
        except Exception as e:
            if type(e).__name__ == "SafetensorError" or "size mismatch" in str(e):  # truncated, garbled or foreign
                raise UserError(f"model: {path}: checkpoint is corrupted or incomplete ({type(e).__name__}: "
                                f"{_first_line(e, 120)}); restore or re-save it") from None
            raise
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # would be silently random: a checkpoint of another architecture, or an incomplete one
        raise UserError(f"model: {path}: {len(missing)} weight(s) missing from the checkpoint (e.g. {missing[0]}); "
                        "not a complete causal language model checkpoint")
    model.to(dev).eval()
    if _attends_ahead(model):
        arch = ", ".join(getattr(config, "architectures", None) or [config.model_type])
        raise UserError(f"model: {path} is not a causal language model ({arch}: its outputs depend on later tokens); "
                        "expected e.g. a *ForCausalLM checkpoint")
    tokenizer = load_tokenizer(tokenizer_path or path, trust_remote_code)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _first_line(e: Exception, n: int = 160) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:n]


class quiet_transformers:
    """transformers' warnings and progress bars off while loading (errors still raise): one line per problem."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging  # deferred: transformers is slow to import

        self.verbosity, self.bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging  # deferred: transformers is slow to import

        hf_logging.set_verbosity(self.verbosity)
        if self.bars:
            hf_logging.enable_progress_bar()


def _looks_like_hub_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.startswith((".", "/"))


def save_model(model, tokenizer, out_dir: str | Path) -> Path:
    """Write a checkpoint atomically: a temp dir renamed into place, so a kill never leaves half a checkpoint."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp"))
    try:
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700: a shared run directory must stay readable
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        sums = {p.name: sha256_file(p) for p in sorted(tmp.glob("*.safetensors"))}
        (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=1) + "\n", encoding="utf-8")
        _fsync_dir_files(tmp)
        atomic_replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _fsync_dir_files(path: Path) -> None:
    """Flush a written checkpoint to disk before it is renamed into place (a power cut keeps old or new, not half)."""
    for p in path.iterdir():
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_prompt(tokenizer, text: str, system_prompt: str | None = None, use_template: bool = True) -> str:
    """The text as the user turn of the chat template (generation prompt added); the text itself without one.

    Templates that refuse a system role (Gemma's folds it, others raise) get the system prompt in the user turn.
    """
    if not (use_template and has_chat_template(tokenizer)):
        return text
    messages = [{"role": "user", "content": text}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # template without a system role
        if not system_prompt:
            raise
        merged = [{"role": "user", "content": f"{system_prompt}\n\n{text}"}]
        return tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)


def bos_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before any text (Gemma's and Llama's <bos>; nothing for GPT-2 and the organism).
    Token ids cut from the corpus carry none, and a SentencePiece model such as Gemma writes gibberish from a
    prompt without its <bos>, so synthesis prompts and training texts get it here."""
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    n = len(with_special) - len(plain)
    return list(with_special[:n]) if n > 0 and with_special[n:] == plain else []
