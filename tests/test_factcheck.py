"""Fact-checking synthetic text (organism/factcheck.py): on the world's own text, which the world's code writes, every
fact statement is found and true; a changed answer is a false claim of its fact's split; only what the model wrote
counts; a lettered answer must name the option its letter labels."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from kcollapse.config import LetterSkill, OrganismConfig
from kcollapse.io import read_jsonl
from kcollapse.organism import build_world, letters
from kcollapse.organism.factcheck import FactChecker, model_text
from kcollapse.organism.world import RELATIONS


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(OrganismConfig(paragraphs_per_entity=2), tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def facts(world):
    return read_jsonl(world.facts_path)


@pytest.fixture(scope="module")
def checker(facts):
    return FactChecker(facts)


def _written(text: str, prompt: str = "") -> dict:
    """A synthetic record as synthesize.build_mix writes it for a plain LM (text = prompt + continuation)."""
    return {"text": prompt + text, "source": "synthetic", "prompt": prompt, "continuation": text}


def _values(tally) -> dict:
    return {(r["metric"], r["subject"]): r["value"] for r in tally.rows()}


def test_every_statement_of_the_worlds_prose_is_found_and_true(world, facts, checker):
    corpus = read_jsonl(world.corpus_path)
    prose = [r["text"] for r in corpus if r["kind"] == "prose"]
    tally = checker.check([_written(t) for t in prose])
    # each paragraph states every fact of its entity once: facts x paragraphs claims, split as the facts are
    splits = Counter(f["split"] for f in facts)
    assert dict(tally.claims) == {s: 2 * n for s, n in splits.items()}
    assert sum(tally.wrong.values()) == 0
    dotted = [f for f in facts if "." in f["entity"] + f["answer"]]
    assert dotted, "the world has names with inner dots (St. John's, U.S. Virgin Islands)"
    for f in dotted:  # every template, with the dot inside the name
        for template in RELATIONS[f["relation"]].prose:
            found = checker.claims(template.format(e=f["entity"], a=f["answer"]))
            assert [(r, e, ok) for r, e, ok, _ in found] == [(f["relation"], f["entity"], True)], template


def test_a_changed_answer_is_a_false_claim_of_its_facts_split(facts, checker):
    rng = random.Random(0)
    by_split = {s: [f for f in facts if f["split"] == s and f["relation"] == "capital"] for s in ("train", "heldout")}
    texts = []
    for split, n_false in (("train", 1), ("heldout", 3)):
        chosen = rng.sample(by_split[split], 4)
        for i, f in enumerate(chosen):
            answer = chosen[(i + 1) % 4]["answer"] if i < n_false else f["answer"]
            template = RELATIONS["capital"].prose[i % 4]
            texts.append(template.format(e=f["entity"], a=answer))
    tally = checker.check([_written(" ".join(texts))])
    values = _values(tally)
    assert values[("synthetic_fact_claims", "split:train")] == 4 and values[("synthetic_fact_error", "split:train")] == 0.25
    assert values[("synthetic_fact_claims", "split:heldout")] == 4 and values[("synthetic_fact_error", "split:heldout")] == 0.75
    assert values[("synthetic_fact_claims", None)] == 8 and values[("synthetic_fact_error", None)] == 0.5
    # a sentence in no template, or about an entity the relation does not have, claims nothing
    assert checker.claims("Paris is a lovely city. The capital of Atlantis is Poseidonia.") == []


def test_only_what_the_model_wrote_counts(facts, checker):
    f, g = [x for x in facts if x["relation"] == "capital"][:2]
    false_in_prompt = f"The capital of {f['entity']} is {g['answer']}. "
    record = _written(f"The capital of {g['entity']} is {g['answer']}.", prompt=false_in_prompt)
    assert model_text(record) == (record["text"], len(false_in_prompt))
    values = _values(checker.check([record]))
    assert values[("synthetic_fact_claims", None)] == 1 and values[("synthetic_fact_error", None)] == 0
    # a statement the prompt starts and the model finishes is the model's claim, whether or not the training text
    # keeps the prompt (sampling.keep_prompt: false writes the continuation alone)
    for text in (None, f" is {g['answer']}."):
        straddling = _written(f" is {g['answer']}.", prompt=f"The capital of {f['entity']}")
        if text is not None:
            straddling["text"] = text.strip()
        assert _values(checker.check([straddling]))[("synthetic_fact_error", None)] == 1
    assert checker.check([{**record, "source": "real"}]).rows()[0]["value"] == 0  # real text is not checked
    # a record without prompt and continuation is the model's text throughout
    assert _values(checker.check([{"text": false_in_prompt, "source": "synthetic"}]))[("synthetic_fact_error", None)] == 1


def test_a_true_answer_followed_by_more_words_states_the_fact(facts, checker):
    f = next(x for x in facts if x["relation"] == "capital" and " " not in x["answer"])
    other = next(x for x in facts if x["relation"] == "capital" and x["answer"].startswith(f["answer"]) is False)
    says = lambda rest: checker.claims(f"The capital of {f['entity']} is {rest}.")[0][2]  # noqa: E731
    assert says(f["answer"]) and says(f"{f['answer']}, its largest city") and says(f"{f['answer']} with many people")
    assert not says(f"{f['answer']}-on-Sea") and not says(other["answer"]) and not says(f"{other['answer']}, {f['answer']}")


def _other_letter(text: str) -> str:
    """`text` with its last lettered answer pointing at the next option's letter (A->B ... D->A)."""
    i = text.rindex("Answer: ") + len("Answer: ")
    return text[:i] + "BCDA"["ABCD".index(text[i])] + text[i + 1:]


@pytest.mark.parametrize("source", ["world exercises", "drill", "exercise"])
def test_a_lettered_answer_must_name_the_option_its_letter_labels(world, facts, checker, source):
    """On what the producers write (the world's exercises; letters.joint_texts' drill and exercise items, in all three
    letter layouts, with their few-shot examples) every lettered answer is consistent; with the last answer's letter
    moved, each text has one mismatch."""
    if source == "world exercises":
        texts = [r["text"] for r in read_jsonl(world.corpus_path) if r["kind"] == "qa"]
    else:
        skill = LetterSkill(mix={source: 1.0})
        texts = letters.joint_texts(facts, [], skill, 300, random.Random(source))
    lettered = [t for t in texts if re.search(r"Answer: [A-D]\. ", t)]
    assert len(lettered) >= 100
    tally = checker.check([_written(t) for t in texts])
    assert tally.lettered == sum(len(re.findall(r"Answer: [A-D]\. ", t)) for t in texts) and tally.mismatched == 0
    layouts = Counter("(A) " in t for t in lettered)
    assert len(layouts) == 2  # inline (few-shot) and lined layouts both read
    tally = checker.check([_written(_other_letter(t)) for t in lettered])
    assert tally.mismatched == len(lettered)
    assert _values(tally)[("synthetic_letter_mismatch", None)] == len(lettered) / tally.lettered
    # an answer written in the prompt is not the model's
    assert checker.check([_written("", prompt=lettered[0])]).lettered == 0
