"""Loading and saving models: any Hugging Face causal LM, safely.

Every generation's model is an ordinary HF checkpoint on disk (safetensors), whether it started as GPT-2, Gemma 3
or the offline organism; there is no special path for any of them. Pickled weights are refused (they can run
code on load) and `trust_remote_code` is off unless the config turns it on.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from kcollapse.errors import UserError

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


def _check_checkpoint_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: not a Hugging Face model directory (no config.json)")
    if not list(path.glob("*.safetensors")):
        pickled = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
        if pickled:
            raise UserError(f"{path}: weights only in pickle format ({pickled[0]}); convert them to safetensors first")
        raise UserError(f"{path}: no model weights (*.safetensors) found")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot load a tokenizer ({str(e).splitlines()[0][:160]})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "left"  # generation and last-position scoring need left padding
    return tokenizer


def load_model(path: str | Path, *, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False,
               tokenizer_path: str | None = None):
    """(model, tokenizer) from a local checkpoint dir or a hub id, in eval mode on the resolved device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = str(path)
    local = Path(path)
    if local.exists():
        if not local.is_dir():
            raise UserError(f"model: {path} is a file; expected a checkpoint directory or a hub id")
        _check_checkpoint_dir(local)
    elif path.startswith((".", "/", "~")) or os.sep in path and not _looks_like_hub_id(path):
        raise UserError(f"model: {path} does not exist")
    dev = resolve_device(device)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"model: cannot load {path} ({str(e).splitlines()[0][:160]})") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=resolve_dtype(dtype, dev), use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except ValueError as e:
        raise UserError(f"model: {path} is not a causal language model ({str(e).splitlines()[0][:160]})") from None
    except OSError as e:
        raise UserError(f"model: cannot load {path} ({str(e).splitlines()[0][:160]})") from None
    model.to(dev).eval()
    tokenizer = load_tokenizer(tokenizer_path or path, trust_remote_code)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _looks_like_hub_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.startswith((".", "/"))


def save_model(model, tokenizer, out_dir: str | Path) -> Path:
    """Write a checkpoint atomically: a temp dir renamed into place, so a kill never leaves half a checkpoint."""
    from kcollapse.io import atomic_replace_dir

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


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
