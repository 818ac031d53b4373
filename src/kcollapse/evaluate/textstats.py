"""Model-centric measures: how the text a model writes (and the text it trains on) drifts, with no download.

Word-level statistics on whitespace tokens, as the paper: `entropy` (Shannon entropy, in bits, of each text's
word distribution, then the mean and `entropy_std` over texts), `distinct_1`/`distinct_2` (unique word n-grams /
all n-grams, over the whole set), `repetition_rate` (per text, the share of word 4-grams that already occurred
earlier in it; mean), `vocab_size` (distinct normalised words). Fluency without a classifier download: the share
of normalised words that are in the generation-0 training vocabulary (`vocabulary`), and perplexity under the
generation-0 model. Perplexity is a sliding window over each text (stride `perplexity_stride`, window the model's
context capped at 1024 tokens; `LM.loglikelihood_rolling`), token-weighted over the set. `gibberish_scores` runs a local sequence classifier
of the autonlp-Gibberish-Detector kind, its labels mapped to the paper's scale: noise 0, word salad 1, mild 2,
clean 3.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import torch

from kcollapse.errors import UserError
from kcollapse.lm import LM

GIBBERISH_SCALE = {"noise": 0, "word salad": 1, "mild gibberish": 2, "clean": 3}


def words(text: str) -> list[str]:
    return str(text).split()


def vocab_words(text: str) -> list[str]:
    """Lowercased words with surrounding punctuation stripped (what vocabulary membership is measured on)."""
    return [w for w in (re.sub(r"^\W+|\W+$", "", t.lower()) for t in words(text)) if w]


def vocabulary(texts: list[str]) -> set[str]:
    """The vocabulary of a text set (e.g. the generation-0 training texts, for `fluency`)."""
    return {w for t in texts for w in vocab_words(t)}


def entropy(text: str) -> float | None:
    counts = Counter(words(text))
    n = sum(counts.values())
    if not n:
        return None
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: list[str], n: int) -> float | None:
    grams = [g for t in texts for g in ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else None


def repetition(text: str, n: int = 4) -> float:
    """Share of word n-grams of a text that repeat an earlier one (0 for texts shorter than n words)."""
    grams = ngrams(words(text), n)
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _std(values) -> float | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


def text_stats(texts: list[str]) -> dict[str, float | None]:
    ent = [entropy(t) for t in texts]
    return {
        "entropy": _mean(ent),
        "entropy_std": _std(ent),
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "repetition_rate": _mean(repetition(t) for t in texts) if texts else None,
        "vocab_size": float(len(vocabulary(texts))),
    }


def vocab_share(texts: list[str], reference_vocab: set[str]) -> float | None:
    """`fluency`: share of the texts' words that the generation-0 vocabulary knows."""
    known = {w for entry in reference_vocab for w in vocab_words(entry)}  # however the vocabulary was split
    all_words = [w for t in texts for w in vocab_words(t)]
    return sum(w in known for w in all_words) / len(all_words) if all_words else None


def perplexity(model, tokenizer, texts: list[str], *, stride: int = 256, batch_size: int = 16) -> float | None:
    """Token-weighted perplexity over the texts; long texts in overlapping windows (each token scored once)."""
    scored = LM(model, tokenizer, batch_size).loglikelihood_rolling(texts, stride=stride)
    logprob, count = sum(lp for lp, _ in scored), sum(n for _, n in scored)
    return math.exp(-logprob / count) if count else None


def load_gibberish_classifier(path: str):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer  # deferred: transformers is slow to import

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True).eval()
    except (OSError, ValueError) as e:
        raise UserError(f"eval.gibberish_model: cannot load {path} ({str(e).splitlines()[0][:160]})") from None
    labels = {int(i): str(name).lower().replace("_", " ").strip() for i, name in model.config.id2label.items()}
    unknown = sorted(set(labels.values()) - set(GIBBERISH_SCALE))
    if unknown:
        raise UserError(f"eval.gibberish_model: {path}: unknown label(s) {unknown}, expected {sorted(GIBBERISH_SCALE)}")
    return model, tokenizer, {i: GIBBERISH_SCALE[name] for i, name in labels.items()}


def gibberish_scores(classifier, texts: list[str], batch_size: int = 32) -> list[int]:
    """The paper's 0-3 scale per text (noise, word salad, mild gibberish, clean)."""
    model, tokenizer, scale = classifier
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer([t or " " for t in texts[i : i + batch_size]], padding=True, truncation=True,
                        max_length=512, return_tensors="pt").to(device)
        with torch.inference_mode():
            out += [scale[int(k)] for k in model(**enc).logits.argmax(-1)]
    return out
