"""Shared fixtures: tiny models built locally with save_pretrained (never a download) and a small real corpus."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)

DATA = Path(__file__).parent / "data"
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ '<start_of_turn>user\n' + m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'user' %}{% if loop.index0 == 0 or messages[loop.index0 - 1]['role'] != 'system' %}"
    "{{ '<start_of_turn>user\n' }}{% endif %}{{ m['content'] + '<end_of_turn>\n' }}"
    "{% else %}{{ '<start_of_turn>model\n' + m['content'] + '<end_of_turn>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def build_tokenizer(texts: list[str], vocab_size: int = 400, chat: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<pad>"] + (["<bos>", "<start_of_turn>", "<end_of_turn>"] if chat else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    kwargs = dict(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>")
    if chat:
        kwargs.update(bos_token="<bos>", chat_template=GEMMA_CHAT_TEMPLATE)
    return PreTrainedTokenizerFast(**kwargs)


def corpus_lines() -> list[str]:
    return [l for l in (DATA / "corpus.txt").read_text().splitlines() if l.strip()]


@pytest.fixture(scope="session")
def corpus_path() -> Path:
    return DATA / "corpus.txt"


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    tok = build_tokenizer(corpus_lines())
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=256,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    path = tmp_path_factory.mktemp("tiny_gpt2")
    GPT2LMHeadModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_gemma(tmp_path_factory) -> Path:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    tok = build_tokenizer(corpus_lines(), chat=True)
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                           sliding_window=64, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    path = tmp_path_factory.mktemp("tiny_gemma")
    Gemma3ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def interrupted(monkeypatch, n: int, run) -> None:
    """Call `run()` with the n-th `kcollapse.train.finetune` call raising KeyboardInterrupt (a Ctrl-C mid-run)."""
    import kcollapse.train as train

    real, calls = train.finetune, []

    def dies(*a, **kw):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(train, "finetune", dies)
    try:
        with pytest.raises(KeyboardInterrupt):
            run()
    finally:
        monkeypatch.setattr(train, "finetune", real)
