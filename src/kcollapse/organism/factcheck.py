"""Fact-checking the synthetic text: how much misinformation each generation writes into its own training data.

Knowledge collapse needs a carrier: a model states something false, and the next generation learns it from that
text. On the organism's world the truth is known (facts.jsonl) and every way the corpus states a fact is a template
(world.RELATIONS), so each statement a model writes can be checked: a sentence in one of a relation's templates
whose entity has that relation is a claim about the fact, right or wrong. Lettered exercises are checked for their
own consistency: "Answer: B. Paris" must name the option that B labels, the indirection that the letter formats
test. Only what the model wrote counts (a claim whose answer ends after the prompt it was given, an "Answer:" line
after it; read in the prompt's context, kept in the training text or not), and claims are counted per split of the
facts, so held-out facts, which the loop's text states in prose alone, have their own error rate.

The loop writes, per generation and arm with synthetic text, `synthetic_fact_claims` and `synthetic_fact_error`
(subject null, "split:train", "split:heldout") and `synthetic_lettered_answers` and `synthetic_letter_mismatch`
(docs/CONTRACTS.md): rows at generation g describe the text model g-1 wrote. Any model run on the organism's world
gets them (the organism, or a real model with `corpus: organism`). Measured (README, "What each model writes"): the
default organism's alpha 1.0 text goes from 0.11 to 0.40 false claims in ten generations as its short answers fall;
the letter-skilled organism's stays at 0.06-0.13 while its lettered answers drift from their options (0.14 -> 0.28);
Gemma 3 270M's generation-0 text: 24 of 47 claims false.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from kcollapse.organism.world import RELATIONS

SENTENCE = re.compile(r"[^.!?\n]+[.!?]?")  # names with inner dots are protected before this runs
HIDDEN_DOT = "\u2024"  # stands in for a dot inside a known name ("St. Louis") while sentences are cut
ANSWER = re.compile(r"^Answer: ([A-D])\. (.+)$", re.M)
LINED = re.compile(r"^([A-D])\. (.+)$", re.M)
INLINE = re.compile(r"\(([A-D])\) (.+?)(?=\s+\([A-D]\) |\n|$)")


def _pattern(template: str) -> re.Pattern:
    """A prose template as a whole-sentence regex: {e} and {a} captured, the final dot optional (text may stop)."""
    parts = re.split(r"(\{e\}|\{a\})", template.removesuffix("."))
    body = "".join({"{e}": "(?P<e>.+?)", "{a}": "(?P<a>.+?)"}.get(p, re.escape(p)) for p in parts)
    return re.compile(body + r"\.?")


@dataclass
class Tally:
    """Claims about facts and lettered answers found in a set of texts."""

    claims: Counter = field(default_factory=Counter)  # split -> claims
    wrong: Counter = field(default_factory=Counter)  # split -> claims that contradict the fact
    lettered: int = 0  # "Answer: L. text" lines under four options
    mismatched: int = 0  # ... whose text is not the option that L labels

    def rows(self) -> list[dict]:
        """Metric rows (metric, value, format, subject): counts always, rates where something was counted."""
        out = []
        for subject, split in [(None, None), ("split:train", "train"), ("split:heldout", "heldout")]:
            n = sum(self.claims.values()) if split is None else self.claims[split]
            wrong = sum(self.wrong.values()) if split is None else self.wrong[split]
            out.append(("synthetic_fact_claims", n, subject))
            if n:
                out.append(("synthetic_fact_error", wrong / n, subject))
        out.append(("synthetic_lettered_answers", self.lettered, None))
        if self.lettered:
            out.append(("synthetic_letter_mismatch", self.mismatched / self.lettered, None))
        return [{"metric": m, "value": float(v), "format": None, "subject": s} for m, v, s in out]


class FactChecker:
    """Checks texts against the world's facts (facts.jsonl rows)."""

    def __init__(self, facts: list[dict]):
        self.truth: dict[tuple[str, str], tuple[set[str], str]] = {}  # (relation, entity) -> (answers, split)
        for row in facts:
            answers, _ = self.truth.setdefault((row["relation"], row["entity"]), (set(), row["split"]))
            answers.add(row["answer"])
        relations = {r for r, _ in self.truth}
        self.templates = [(rel, _pattern(t)) for rel in RELATIONS if rel in relations for t in RELATIONS[rel].prose]
        names = {n for (_, e), (answers, _) in self.truth.items() for n in (e, *answers) if "." in n}
        self.dotted = sorted(names, key=len, reverse=True)

    def claims(self, text: str) -> list[tuple[str, str, bool, int]]:
        """(relation, entity, true?, end of the claimed answer in `text`) for every fact statement in `text`."""
        for name in self.dotted:
            text = text.replace(name, name.replace(".", HIDDEN_DOT))
        found = []
        for sentence in SENTENCE.finditer(text):
            s = sentence.group().lstrip()
            start = sentence.start() + len(sentence.group()) - len(s)
            for rel, pattern in self.templates:
                m = pattern.fullmatch(s)
                if m is None:
                    continue
                entity, answer = (m.group(k).replace(HIDDEN_DOT, ".") for k in ("e", "a"))
                if (rel, entity) in self.truth:
                    found.append((rel, entity, states(answer, self.truth[rel, entity][0]), start + m.end("a")))
                    break
        return found

    def check(self, records: list[dict]) -> Tally:
        """Tally the model-written part of synthetic training records ({text, source, prompt, continuation})."""
        tally = Tally()
        for rec in records:
            if rec.get("source") != "synthetic":
                continue
            text, written = model_text(rec)
            for rel, entity, true, end in self.claims(text):
                if end > written:
                    split = self.truth[rel, entity][1]
                    tally.claims[split] += 1
                    tally.wrong[split] += not true
            offset = 0
            for block in text.split("\n\n"):  # one question, or a few-shot example, per block
                for m in ANSWER.finditer(block):
                    options = dict(INLINE.findall(block)) or dict(LINED.findall(block[: m.start()]))
                    if len(options) == 4 and offset + m.end() > written:
                        tally.lettered += 1
                        tally.mismatched += options.get(m.group(1), "").strip() != m.group(2).strip()
                offset += len(block) + 2
        return tally


def states(answer: str, truth: set[str]) -> bool:
    """Does a claimed answer state the fact? Exactly, or the true answer followed by more words ("Maputo, the capital
    of the Republic of Mozambique", "Louisville with 1 million residents"); "Guinea-Bissau" does not state "Guinea"."""
    return any(answer == t or (answer.startswith(t) and answer[len(t)] in " ,;(") for t in truth)


def model_text(record: dict) -> tuple[str, int]:
    """(the text a synthetic record's model wrote in context, where its own writing starts): prompt + continuation
    when both are recorded (synthesize.build_mix), so that "Mongolia's capital city is" + " Ulaanbaatar." is the model's
    claim whether or not the training text keeps the prompt (`sampling.keep_prompt`); else the training text."""
    prompt, cont = record.get("prompt"), record.get("continuation")
    if prompt is None or cont is None:
        return record["text"], 0
    return prompt + cont, len(prompt)
