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



def sentencepiece_tokens(texts: list[str], vocab_size: int = 400) -> list[str]:
    """A Gemma-style vocabulary (SentencePiece BPE: words start with "\u2581", specials pad/eos/bos/unk first), in
    merge order, as a GGUF file lists it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    alphabet = list(":;?!()[]\"/\n")  # the instruction formats' characters, absent from the prose
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                       initial_alphabet=alphabet))
    return [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]


def write_gguf(out: Path, architecture: str = "gemma3", seed: int = 0) -> Path:
    """A tiny Gemma 3 as a GGUF file, written with the `gguf` package's writer the way llama.cpp's converter writes
    Gemma: float32 tensors under GGUF names, RMSNorm weights stored as 1 + w, a SentencePiece vocabulary with
    scores and token types (`tokenizer.ggml.model = llama`), BOS added. Another `architecture` writes the same
    tensors and keys under that name (to test the refusals). The model's own weights go to `<out>.hf/`."""
    import gguf
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tokens = sentencepiece_tokens(corpus_lines())
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                           sliding_window=64, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model = Gemma3ForCausalLM(cfg)
    model.save_pretrained(out.with_suffix(".hf"))  # the source, to compare the conversion with
    weights = model.state_dict()
    writer = gguf.GGUFWriter(str(out), architecture)
    writer.add_name("tiny gemma3")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_sliding_window(cfg.sliding_window)
    writer.add_rope_freq_base(cfg.rope_parameters["full_attention"]["rope_theta"])
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([-float(i) for i in range(len(tokens))])
    writer.add_token_types([3 if t.startswith("<") and t.endswith(">") else 1 for t in tokens])
    writer.add_pad_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_bos_token_id(2)
    writer.add_unk_token_id(3)
    writer.add_add_bos_token(True)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, cfg.num_hidden_layers)
    for name, tensor in weights.items():
        if name == "lm_head.weight":
            continue  # tied to the embedding
        base, suffix = name.rsplit(".", 1)
        data = tensor.float().numpy()
        if "norm" in base:
            data = data + 1.0  # llama.cpp stores Gemma's RMSNorm weights as 1 + w
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("tiny_gguf") / "tiny-gemma3.gguf")
