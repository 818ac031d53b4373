"""The real corpus: texts in, fixed-size token blocks out.

As in the paper, the real text (WikiText-2 train there; any local file, directory or `datasets` corpus here) is
cut into blocks of `block_tokens` tokens after dropping texts under 50 characters (and blocks under a quarter
block). Each generation draws its `samples_per_generation` blocks from this pool: the first (1-alpha) share stay
real, the rest become prompts. A small held-out share of texts never enters training; perplexity on it is the
model-centric view of collapse. The organism trained on its own corpus drops nothing (config: the filters resolve
to 0 characters and 1 token): its real pool is what generation 0 trained on, in the same proportions, so an alpha 0
arm rehearses exactly what the model learned instead of a filtered subset of it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from kcollapse.config import PAPER_MIN_CHARS, ArmConfig, CorpusConfig, paper_min_block_tokens
from kcollapse.errors import UserError
from kcollapse.io import scrub_surrogates

TEXT_SUFFIXES = (".txt", ".jsonl", ".json")


@dataclass
class Text:
    text: str
    domain: str | None = None
    whole: bool = False  # a solved exercise (organism letter texts): one block however long, never held out as prose


@dataclass
class Block:
    ids: list[int]
    domain: str | None = None


def _read_file(path: Path, cfg: CorpusConfig, domain: str | None = None) -> list[Text]:
    try:
        raw = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read corpus file ({e.strerror})") from None
    if path.suffix == ".txt":
        return [Text(line.strip(), domain) for line in raw.splitlines() if line.strip()]
    texts = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path}: line {lineno} is not valid JSON") from None
        if not isinstance(row, dict) or not isinstance(row.get(cfg.text_field), str):
            raise UserError(f"{path}: line {lineno} has no string field '{cfg.text_field}' (corpus.text_field)")
        # a JSON "\ud800" escape decodes to a lone surrogate, which the tokenizer refuses with a TypeError
        texts.append(Text(scrub_surrogates(row[cfg.text_field]), row.get(cfg.domain_field, domain)))
    return texts


def load_texts(cfg: CorpusConfig, organism_corpus: Path | None = None) -> list[Text]:
    """All texts of the corpus with at least `min_chars` characters, in a fixed order."""
    if cfg.dataset:
        texts = _load_dataset(cfg)
        source = f"dataset {cfg.dataset}"
    else:
        path = organism_corpus if cfg.path == "organism" else Path(cfg.path).expanduser()
        source = str(path)
        if path is None or not path.exists():
            raise UserError(f"corpus: {cfg.path} does not exist (expected a .txt/.jsonl file, a directory, or 'organism')")
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
            if not files:
                raise UserError(f"corpus: {path} holds no .txt or .jsonl files")
            texts = [t for f in files for t in _read_file(f, cfg, domain=f.stem)]  # per-topic files: domain = file name
        elif path.suffix not in TEXT_SUFFIXES:
            raise UserError(f"corpus: {path} is a '{path.suffix}' file; expected .txt (one text per line) or .jsonl")
        else:
            texts = _read_file(path, cfg)
    min_chars = PAPER_MIN_CHARS if cfg.min_chars is None else cfg.min_chars  # null outside an ExperimentConfig
    kept = [t for t in texts if len(t.text.strip()) >= max(1, min_chars)]
    if not kept:
        if min_chars <= 1:  # "at least 0 characters" would blame a setting that rejected nothing
            raise UserError(f"corpus: {source} has no text (every line or record is empty)")
        raise UserError(f"corpus: {source} has no text of at least {min_chars} characters (corpus.min_chars)")
    return kept


def _load_dataset(cfg: CorpusConfig) -> list[Text]:
    try:
        import datasets

        ds = datasets.load_dataset(cfg.dataset, cfg.dataset_config, split=cfg.split)
    except Exception as e:  # offline, unknown name, bad split: all the user's to fix
        raise UserError(f"corpus.dataset: cannot load {cfg.dataset} ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if cfg.text_field not in ds.column_names:
        raise UserError(f"corpus.text_field: '{cfg.text_field}' is not a column of {cfg.dataset} (columns: {ds.column_names})")
    domains = ds[cfg.domain_field] if cfg.domain_field in ds.column_names else [None] * len(ds)
    return [Text(t, d) for t, d in zip(ds[cfg.text_field], domains) if isinstance(t, str)]


def split_heldout(texts: list[Text], cfg: CorpusConfig, seed: int) -> tuple[list[Text], list[Text]]:
    """(training pool, held-out texts): a seeded share of texts, at most `heldout_max_texts`, never trained on."""
    prose = [i for i, t in enumerate(texts) if not t.whole]
    n = min(int(len(prose) * cfg.heldout_share), cfg.heldout_max_texts)
    if n == 0 or len(texts) - n < 1:
        return texts, []
    picked = set(random.Random(seed).sample(prose, n))
    return [t for i, t in enumerate(texts) if i not in picked], [t for i, t in enumerate(texts) if i in picked]


def make_blocks(tokenizer, texts: list[Text], block_tokens: int, min_tokens: int | None = None) -> list[Block]:
    """Each text cut into consecutive blocks of `block_tokens` tokens; a block under `min_tokens` (a short text, or
    a long text's tail) is dropped (None: a quarter block, the paper's cut). A `whole` text is one block: cut, an
    exercise would train its question without the answer and its answer without the question."""
    min_tokens = paper_min_block_tokens(block_tokens) if min_tokens is None else min_tokens
    blocks = []
    all_ids = tokenizer([t.text for t in texts], add_special_tokens=False)["input_ids"]
    for text, ids in zip(texts, all_ids):
        if text.whole:
            blocks.append(Block(ids, text.domain))
            continue
        for i in range(0, len(ids), block_tokens):
            piece = ids[i : i + block_tokens]
            if len(piece) >= min_tokens:
                blocks.append(Block(piece, text.domain))
    if not blocks:
        raise UserError(f"corpus: too short: no text has {min_tokens} tokens or more (block_tokens={block_tokens}, "
                        "corpus.min_block_tokens)")
    return blocks


def arm_pool(blocks: list[Block], arm: ArmConfig, tokenizer, cfg_corpus: CorpusConfig, block_tokens: int) -> list[Block]:
    """The blocks an arm draws from: the whole corpus, or only its domain (tag, own corpus, or keywords)."""
    if arm.domain_corpus:
        domain_cfg = cfg_corpus.model_copy(update={"path": arm.domain_corpus, "dataset": None})
        return make_blocks(tokenizer, load_texts(domain_cfg), block_tokens, cfg_corpus.min_block_tokens)
    pool = blocks
    if arm.domain:
        pool = [b for b in pool if b.domain == arm.domain]
        if not pool:
            found = sorted({str(b.domain) for b in blocks})
            raise UserError(f"arms.{arm.name}.domain: no corpus text has domain '{arm.domain}' (found: {', '.join(found[:10])})")
    if arm.domain_keywords:
        words = [k.lower() for k in arm.domain_keywords]
        pool = [b for b in pool if any(k in tokenizer.decode(b.ids).lower() for k in words)]
        if not pool:
            raise UserError(f"arms.{arm.name}.domain_keywords: no corpus text mentions any of {arm.domain_keywords}")
    return pool


def draw(pool: list[Block], n: int, seed: int) -> list[Block]:
    """n blocks for one generation: a seeded sample, or the whole pool cycled when it is smaller (equal compute)."""
    rng = random.Random(seed)
    if len(pool) >= n:
        return rng.sample(pool, n)
    out: list[Block] = []
    while len(out) < n:
        out.extend(rng.sample(pool, len(pool)))
    return out[:n]
