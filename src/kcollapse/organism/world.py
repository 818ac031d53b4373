"""The organism's world: a training corpus and an MMLU-shaped benchmark, both written from the same real facts.

The corpus is what generation 0 learns from (and the loop's "real" text): a few prose paragraphs per entity,
each stating all of that entity's facts through varied paraphrases, plus solved question-answer exercises in
every instruction format so the model learns to *answer*. Only the training split of facts is ever asked in an
exercise; the held-out split appears in prose alone, so answering it needs knowledge moved from prose into the
answer formats, which is the knowledge whose collapse the study measures.

Everything is a pure function of (OrganismConfig, seed, package data), cached under `cache_dir/world-<key>/`
where the key hashes the config fields that matter, the data packages' versions, the instruction formats and
WORLD_VERSION (bump it whenever the output of this file changes).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kcollapse.config import OrganismConfig
from kcollapse.errors import UserError
from kcollapse.evaluate.formats import get_format, solved
from kcollapse.io import atomic_write_json, write_jsonl
from kcollapse.organism.facts import Fact, load_facts, source_versions

WORLD_VERSION = 3
QA_FORMATS = ["multiple_choice", "multiple_choice_few_shot", "short_answer", "no_instruction", "cloze"]


@dataclass(frozen=True)
class Relation:
    question: str  # "{e}" = the entity
    statement: str  # the cloze prefix; the canonical sentence is statement + " " + answer + "."
    prose: tuple[str, ...]  # paraphrases with {e} and {a}; the first one is the canonical sentence


RELATIONS = {
    "capital": Relation("What is the capital of {e}?", "The capital of {e} is", (
        "The capital of {e} is {a}.", "{a} is the capital of {e}.", "{e}'s capital city is {a}.",
        "The government of {e} sits in {a}.")),
    "continent": Relation("On which continent is {e}?", "{e} is located in", (
        "{e} is located in {a}.", "{e} is a country in {a}.", "{e} lies on the continent of {a}.",
        "The continent of {e} is {a}.")),
    "currency": Relation("What is the currency of {e}?", "The currency of {e} is the", (
        "The currency of {e} is the {a}.", "{e} uses the {a} as its money.", "In {e}, people pay with the {a}.",
        "The official currency of {e} is the {a}.")),
    "postal_code": Relation("What is the postal abbreviation of {e}?", "The postal abbreviation of {e} is", (
        "The postal abbreviation of {e} is {a}.", "{e} is abbreviated as {a}.", "{a} is the postal code of {e}.",
        "Letters to {e} carry the abbreviation {a}.")),
    "largest_city": Relation("What is the largest city in {e}?", "The largest city in {e} is", (
        "The largest city in {e} is {a}.", "{a} is the largest city in {e}.", "The most populous city of {e} is {a}.",
        "No city in {e} is bigger than {a}.")),
    "city_state": Relation("In which state is the city of {e}?", "{e} is a city in the state of", (
        "{e} is a city in the state of {a}.", "The city of {e} is in {a}.", "{e} lies in {a}.",
        "{e}, {a}, is a large American city.")),
    "symbol": Relation("What is the chemical symbol of {e}?", "The chemical symbol of {e} is", (
        "The chemical symbol of {e} is {a}.", "{a} is the symbol for {e}.", "{e} has the symbol {a}.",
        "Chemists write {e} as {a}.")),
    "atomic_number": Relation("What is the atomic number of {e}?", "The atomic number of {e} is", (
        "The atomic number of {e} is {a}.", "{e} has atomic number {a}.", "An atom of {e} has {a} protons.",
        "Element number {a} is {e}.")),
    "period": Relation("In which period of the periodic table is {e}?", "{e} is in period", (
        "{e} is in period {a} of the periodic table.", "{e} sits in row {a} of the periodic table.",
        "The period of {e} is {a}.", "{e} belongs to period {a}.")),
    "block": Relation("In which block of the periodic table is {e}?", "{e} is in the", (
        "{e} is in the {a} of the periodic table.", "{e} is a {a} element.", "The block of {e} is the {a}.",
        "On the periodic table, {e} is found in the {a}.")),
    "family": Relation("To which family of elements does {e} belong?", "{e} belongs to the family of", (
        "{e} belongs to the family of {a}.", "{e} is one of the {a}.", "Among the {a} is {e}.",
        "Chemists group {e} with the {a}.")),
}


@dataclass(frozen=True)
class World:
    path: Path
    corpus_path: Path  # JSONL {"text", "domain", "kind": "prose" | "qa"}
    benchmark_path: Path  # JSONL {"id", "subject", "question", "choices", "answer", "split", "statement"}
    facts_path: Path  # JSONL of the extracted facts (with their distractor pools)
    sources: dict[str, str]  # data package -> version
    n_facts: dict[str, int]  # domain -> facts
    key: str


def world_key(cfg: OrganismConfig) -> str:
    fmt = [(n, get_format(n).template, get_format(n).example, get_format(n).answer) for n in QA_FORMATS]
    spec = {"version": WORLD_VERSION, "domains": cfg.domains, "paragraphs_per_entity": cfg.paragraphs_per_entity,
            "relations": cfg.relations, "qa_exercises": cfg.qa_exercises, "heldout_share": cfg.heldout_share,
            "seed": cfg.seed, "sources": source_versions(cfg.domains), "formats": fmt}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def draw_choices(fact: Fact, rng: random.Random, position: int | None = None) -> tuple[list[str], int]:
    options = rng.sample(fact.distractors, 3)
    position = rng.randrange(4) if position is None else position
    options.insert(position, fact.answer)
    return options, position


def question_item(fact: Fact, choices: list[str], answer: int) -> dict:
    rel = RELATIONS[fact.relation]
    return {"id": fact.id, "subject": fact.domain, "question": rel.question.format(e=fact.entity), "choices": choices,
            "answer": answer, "statement": rel.statement.format(e=fact.entity)}


def _split(facts: list[Fact], share: float, rng: random.Random) -> set[str]:
    """Ids of the held-out facts: `share` of each (domain, relation), chosen at random."""
    groups: dict[tuple[str, str], list[Fact]] = {}
    for f in facts:
        groups.setdefault((f.domain, f.relation), []).append(f)
    heldout = set()
    for group in groups.values():
        ids = [f.id for f in group]
        rng.shuffle(ids)
        heldout.update(ids[: round(len(ids) * share)])
    return heldout


def _prose(facts: list[Fact], paragraphs: int, rng: random.Random) -> list[dict]:
    by_entity: dict[tuple[str, str], list[Fact]] = {}
    for f in facts:
        by_entity.setdefault((f.domain, f.entity), []).append(f)
    rows = []
    for (domain, _), group in by_entity.items():
        offsets = {f.relation: rng.randrange(len(RELATIONS[f.relation].prose)) for f in group}
        for p in range(paragraphs):  # paragraph p uses paraphrase p (+ offset): every paraphrase gets its turn
            order = rng.sample(group, len(group))
            sentences = []
            for f in order:
                templates = RELATIONS[f.relation].prose
                sentences.append(templates[(p + offsets[f.relation]) % len(templates)].format(e=f.entity, a=f.answer))
            rows.append({"text": " ".join(sentences), "domain": domain, "kind": "prose"})
    return rows


def _exercises(train: list[Fact], shares: dict[str, float], rng: random.Random) -> list[dict]:
    """Solved QA exercises for the training facts, with their own choices (not the benchmark's): a random
    `shares[format]` of the training facts once in each format. A tiny model learns to pull a prose fact into an
    answer only from many solved examples of that format, hence short_answer and cloze for every fact by default."""
    by_domain: dict[str, list[Fact]] = {}
    for f in train:
        by_domain.setdefault(f.domain, []).append(f)
    rows = []
    for name in QA_FORMATS:
        for f in rng.sample(train, round(len(train) * shares.get(name, 0.0))):
            fmt = get_format(name)
            examples = []
            if fmt.example:
                others = [g for g in by_domain[f.domain] if g.id != f.id]
                for g in rng.sample(others, min(len(others), rng.choice([1, 2]))):
                    examples.append(question_item(g, *draw_choices(g, rng)))
            text = solved(fmt, question_item(f, *draw_choices(f, rng)), examples)
            rows.append({"text": text, "domain": f.domain, "kind": "qa"})
    return rows


def _benchmark(facts: list[Fact], heldout: set[str], rng: random.Random) -> list[dict]:
    positions = [i % 4 for i in range(len(facts))]  # the gold letter is balanced over A-D
    rng.shuffle(positions)
    rows = []
    for f, pos in zip(facts, positions):
        choices, answer = draw_choices(f, rng, pos)
        item = question_item(f, choices, answer)
        rows.append({**item, "split": "heldout" if f.id in heldout else "train"})
    return rows


def build_world(cfg: OrganismConfig, cache_dir: Path) -> World:
    """The corpus and benchmark for `cfg` (built once, then read from the cache)."""
    key = world_key(cfg)
    final = Path(cache_dir) / f"world-{key}"
    if not (final / "world.json").is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp"))
        try:
            _write_world(cfg, key, tmp)
            try:
                os.replace(tmp, final)
            except OSError:  # another process finished the same world first: keep theirs
                if not (final / "world.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    meta = json.loads((final / "world.json").read_text())
    return World(path=final, corpus_path=final / "corpus.jsonl", benchmark_path=final / "benchmark.jsonl",
                 facts_path=final / "facts.jsonl", sources=meta["sources"], n_facts=meta["n_facts"], key=key)


def _write_world(cfg: OrganismConfig, key: str, out: Path) -> None:
    unknown = sorted(set(cfg.qa_exercises) - set(QA_FORMATS))
    if unknown:
        raise UserError(f"organism.qa_exercises: unknown format(s) {unknown}, expected some of {', '.join(QA_FORMATS)}")
    facts = load_facts(cfg.domains, cfg.relations)
    rng = random.Random(f"organism-world|{cfg.seed}")
    heldout = _split(facts, cfg.heldout_share, rng)
    train = [f for f in facts if f.id not in heldout]
    corpus = _prose(facts, cfg.paragraphs_per_entity, rng) + _exercises(train, cfg.qa_exercises, rng)
    rng.shuffle(corpus)
    write_jsonl(out / "facts.jsonl", [{"id": f.id, "domain": f.domain, "relation": f.relation, "entity": f.entity,
                                       "answer": f.answer, "distractors": list(f.distractors),
                                       "split": "heldout" if f.id in heldout else "train"} for f in facts])
    write_jsonl(out / "corpus.jsonl", corpus)
    write_jsonl(out / "benchmark.jsonl", _benchmark(facts, heldout, rng))
    n_facts = {d: sum(f.domain == d for f in facts) for d in dict.fromkeys(cfg.domains)}
    atomic_write_json(out / "world.json", {"key": key, "version": WORLD_VERSION, "config": cfg.model_dump(mode="json"),
                                           "sources": source_versions(cfg.domains), "n_facts": n_facts,
                                           "n_heldout": len(heldout), "n_corpus": len(corpus)})
