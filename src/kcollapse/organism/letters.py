"""Letter answers for the organism: the training that lets a 1M-parameter model answer "A", "B", "C" or "D".

A tiny model trained on facts answers short-answer and cloze questions, yet sits at chance in the lettered
formats (multiple_choice, multiple_choice_few_shot, no_instruction): it must recall the answer, find the option
that matches it and read that option's letter, an indirection that a few thousand solved letter exercises do not
teach. Measured on issue 16 (sessions 20-23, one thread each):
- the selection step forms from an explicit-query *drill* ("Which option is Paris?" over four options, in the
  letter layouts, plain LM loss): a phase change after ~7k steps in the bare layout, then the other layouts follow;
- it survives learning the facts only if drill items keep coming: a fixed set of drill texts is memorised and the
  skill erased, while fresh items every step keep it (0.96 on new drill items after 4k steps of fact learning);
- on top of it, solved letter exercises on *training* facts (a fresh option order each time) and "bridge" items (a
  letter layout answered with the option's text: recall inside the layout) carry the skill to held-out facts.
Held-out facts are never asked in any of these texts: they stay prose-only, as in the default organism, so held-out
letter accuracy still measures knowledge moved from prose into an answer format.

So when `organism.letter_skill` is set, generation 0 first learns the facts as the default organism does
(`facts_first`), then trains three more phases, each an ordinary `finetune` call on texts generated fresh (none
repeats), one text per sequence (`train.packing: false`: the drill formed with each item starting at position 0 as
prompts do, and did not form in 7.5k steps from packed chunks): the bare drill (with `two_option_steps`, on two options
first), the drill in every letter layout, each ending once fresh drill items are answered at `drill_target`
(`drill_check`: the phase change came at 3.5k-7k+ steps depending on the start, and stopping at 0.9 or 0.95 left the
skill too weak to reach held-out facts, 0.98 did), then
the world's corpus mixed with fresh drill items, letter exercises and bridge items (`LetterSkill.mix`, shares of
texts). The selection has to follow recall, so depth matters: in four layers recall of a held-out answer completes in
the last layer (session 21's logit lens), and three 4-layer builds that differed only in float rounding answered held-out
letter questions at 0.48, 0.57 and 0.67 (each recalled the answer text inside the layout at 0.93); six layers
(recipes/letters.yaml) answer 0.83-0.90 in two such builds after 7,500 joint steps, 0.77-0.81 after 2,500 (the
default since session 27: the joint phase went from 9.4 to 3.1 min). The drills knock the facts' answers to chance
(held-out cloze 0.97 -> 0.29) and the joint phase brings them back within 1,000 steps; learning the facts first still
pays: after 1,600 facts steps instead of 3,200 the drills took longer than the steps saved, and with no facts phase
they took longer still and 2,000 joint steps left the letter formats at chance (short answer 0.47).
`drill_loss: answer` trains each drill text on its answer alone (" B. Paris", its prompt masked: `train.finetune`'s
(prompt, completion) texts). Measured (session 30, Intel Xeon, 2,400 facts steps): from the same facts checkpoint the
bare drill reached 0.98 in 3,500 steps instead of 5,500 (2,250 instead of 6,500 in a one-thread torch loop), and
generation 0 answered held-out letters 0.85 / 0.80 / 0.85 (short answer 0.98, cloze 1.00), but its facts held so well
that alpha 1.0 lost at most 0.11 in any format in 10 generations, no stage B: a model too robust to show collapse, so
the preset keeps the plain drill.
Mimetic attention init (Trockman & Kolter 2023: W_q W_k^T ~ I, W_v W_o ~ -I from the start) makes the drill form fast,
but by a shortcut that does not transfer (session 32, 4 layers, one thread): from scratch the bare drill reached 0.94
in 1,500 steps where GPT-2's init sat at 0.34 after 2,500, and after the facts it took 1,500 steps; yet with both
drills at 0.97-0.99 and 2,500 joint steps the model answered letter questions at 0.32-0.37 even on its *training*
facts (held-out 0.27-0.28; the 4-layer builds with GPT-2's init above: 0.48-0.67 held-out). Presumably an option that
matches the query word token for token flags itself, and a recalled answer is no such token. Not kept.

Two options first, a curriculum, brings the bare drill's phase change sooner (session 33, Intel Xeon, one thread,
GPT-2's init): from scratch in four layers the four-option drill stood at 0.34 after 2,500 steps and 0.75-0.80 at
7,750-8,000, while 2,500 steps on two-option items (0.985 on fresh two-option items) and then four options reached
0.91 at 3,250 and 0.98 at 4,250 steps in all (three options first: 0.76 on three after 6,000 steps, no faster); from
the letters preset's facts checkpoint (six layers) the plain bare drill took 5,500 steps to 0.98, the curriculum
1,750 + 1,500. In a whole generation 0 (2 threads, one build each) its drill phases took 397 s against 512 s, its
held-out letters were weaker (0.75 / 0.67 / 0.73 against 0.78 / 0.75 / 0.78) and in its run the control's multiple
choice drifted 0.070, so `two_option_steps` is opt-in (docs/LETTERS.md).

The loop's real pool carries letter texts too (`real_pool_texts`), each kept whole as one block: cut into 64-token
blocks, a few-shot item trained its question without the answer and its answer without the question, and the alpha 0
control's letter formats drifted 0.07-0.09 (0.06 and 0.03 once whole, session 24). And the loop trains as the joint
phase did, one text per row (recipes/letters.yaml, `train.packing: false`): from packed chunks the control's
no_instruction lost 0.095 within 3 generations, from rows every format held within 0.032 (session 25).
"""

from __future__ import annotations

import random

from kcollapse.config import LetterSkill
from kcollapse.evaluate.formats import get_format, option_targets, render, solved
from kcollapse.organism.facts import Fact
from kcollapse.organism.world import QA_FORMATS, draw_choices, question_item

VERSION = 3  # in the generation-0 cache key of a letter-skilled organism: bump when its training changes (3: bins)
DRILL_QUESTION = "Which option is {x}?"
BARE_LAYOUT = "no_instruction"  # the layout whose drill forms first (measured); the others follow from it


def letter_formats() -> list[str]:
    """The organism's formats answered with a letter, read from the format registry."""
    return [name for name in QA_FORMATS if get_format(name).answer == "letter"]


def vocabulary_texts() -> list[str]:
    """Words the drill uses that the world may not: the tokenizer must hold them."""
    return [DRILL_QUESTION.format(x="A")]


def _facts(rows: list[dict]) -> list[Fact]:
    """facts.jsonl rows as the world's Facts, so options are drawn exactly as the world draws them."""
    return [Fact(r["domain"], r["relation"], r["entity"], r["answer"], tuple(r["distractors"])) for r in rows]


def _drill_item(facts: list[Fact], rng: random.Random, n_options: int = 4) -> dict:
    """`n_options` options (2-4) drawn from the world's answers; the question names one of them outright."""
    fact = rng.choice(facts)
    options, _ = draw_choices(fact, rng)
    target = rng.randrange(4)
    if n_options < 4:  # keep the named option and n_options - 1 others, in their drawn order
        keep = sorted(rng.sample([i for i in range(4) if i != target], n_options - 1) + [target])
        options, target = [options[i] for i in keep], keep.index(target)
    return {"subject": fact.domain, "question": DRILL_QUESTION.format(x=options[target]), "choices": options,
            "answer": target}


def drill_text(facts: list[Fact], fmt_name: str, rng: random.Random, n_options: int = 4) -> tuple[str, str]:
    """(a solved drill item with `n_options` options in layout `fmt_name`, its domain)."""
    fmt = get_format(fmt_name)
    examples = [_drill_item(facts, rng, n_options) for _ in range(rng.choice([1, 2]))] if fmt.example else []
    item = _drill_item(facts, rng, n_options)
    return solved(fmt, item, examples), item["subject"]


def exercise_text(train: dict[str, list[Fact]], fmt_name: str, rng: random.Random, *, bridge: bool) -> tuple[str, str]:
    """(a training fact solved in a letter layout with fresh options, or with `bridge` answered with the option's
    text; its domain)."""
    fmt = get_format(fmt_name)
    fact = rng.choice(rng.choice(list(train.values())))
    item = question_item(fact, *draw_choices(fact, rng))
    examples = []
    if fmt.example:
        others = [g for g in train[fact.domain] if g is not fact]
        examples = [question_item(g, *draw_choices(g, rng)) for g in rng.sample(others, min(len(others), rng.choice([1, 2])))]
    if bridge:
        return f"{render(fmt, item, examples)} {item['choices'][item['answer']]}", fact.domain
    return solved(fmt, item, examples), fact.domain


def drill_texts(facts: list[dict], formats: list[str], n: int, rng: random.Random, *, n_options: int = 4,
                answer_only: bool = False) -> list[str] | list[tuple[str, str]]:
    """`n` fresh drill texts with `n_options` options, each in a random layout of `formats`; with `answer_only` each
    as (prompt, answer), the pair that `train.finetune` trains on its answer alone."""
    facts = _facts(facts)
    texts = [drill_text(facts, rng.choice(formats), rng, n_options)[0] for _ in range(n)]
    return [prompt_and_answer(t) for t in texts] if answer_only else texts


def prompt_and_answer(text: str) -> tuple[str, str]:
    """A solved letter text cut after its last "Answer:": (the prompt, " B. Paris")."""
    head, mark, answer = text.rpartition("Answer:")
    return head + mark, answer


def drill_check(tokenizer, facts: list[dict], formats: list[str], target: float, n: int = 200, n_options: int = 4):
    """`solved(model) -> bool`: does `model` answer `n` fresh drill items with `n_options` options (a fixed seed,
    never trained on) in every layout of `formats` with accuracy >= `target`, scored as the evaluation scores letters
    (evaluate.scoring)? Used to end a drill phase once the skill is there (the phase change comes at 3.5k-7k+ steps)."""
    from kcollapse.evaluate.scoring import score_options  # deferred: pulls in torch

    rng, pool = random.Random("organism-letter-check"), _facts(facts)
    checks = []
    for name in formats:
        fmt = get_format(name)
        items = [_drill_item(pool, rng, n_options) for _ in range(n)]
        prompts = [render(fmt, item, [_drill_item(pool, rng, n_options) for _ in range(rng.choice([1, 2]))]
                          if fmt.example else []) for item in items]
        checks.append((prompts, [option_targets(fmt, item) for item in items], [item["answer"] for item in items]))

    def solved(model) -> bool:
        was_training = model.training
        model.eval()
        try:
            for prompts, targets, answers in checks:
                scored = score_options(model, tokenizer, prompts, targets, batch_size=50)
                if sum(s["predicted_index"] == a for s, a in zip(scored, answers)) < target * len(answers):
                    return False
            return True
        finally:
            model.train(was_training)

    return solved


def _by_domain(rows: list[dict]) -> dict[str, list[Fact]]:
    train: dict[str, list[Fact]] = {}
    for row, fact in zip(rows, _facts(rows)):
        if row["split"] == "train":  # held-out facts are never asked
            train.setdefault(fact.domain, []).append(fact)
    return train


def _letter_text(kind: str, facts: list[Fact], train: dict[str, list[Fact]], rng: random.Random) -> tuple[str, str]:
    fmt_name = rng.choice(letter_formats())
    if kind == "drill":
        return drill_text(facts, fmt_name, rng)
    return exercise_text(train, fmt_name, rng, bridge=kind == "bridge")


def joint_texts(facts: list[dict], corpus: list[str], skill: LetterSkill, n: int, rng: random.Random) -> list[str]:
    """The final phase's `n` texts: each one's kind is drawn by `skill.mix` (corpus texts cycle in shuffled passes; the
    drill, exercise and bridge texts are new every time). Exercises and bridges use training facts only."""
    train, facts = _by_domain(facts), _facts(facts)
    kinds, weights = zip(*skill.mix.items())
    passes: list[str] = []
    texts = []
    for _ in range(n):
        kind = rng.choices(kinds, weights)[0]
        if kind == "corpus":
            if not passes:
                passes.extend(rng.sample(corpus, len(corpus)))
            texts.append(passes.pop())
        else:
            texts.append(_letter_text(kind, facts, train, rng)[0])
    return texts


def real_pool_texts(facts: list[dict], n_corpus: int, skill: LetterSkill, rng: random.Random) -> list[tuple[str, str]]:
    """(text, domain) of letter texts to add to the loop's real pool beside the `n_corpus` corpus texts, in the joint
    phase's proportions: the real pool carries what generation 0 trained on, so the alpha 0 control does not drift."""
    letter_kinds = {k: w for k, w in skill.mix.items() if k != "corpus" and w > 0}
    corpus_share = skill.mix.get("corpus", 0.0) / sum(skill.mix.values())
    if skill.pool_share is not None:
        corpus_share = 1.0 - skill.pool_share
    if not letter_kinds or corpus_share <= 0:
        return []
    train, facts = _by_domain(facts), _facts(facts)
    n = round(n_corpus * (1 - corpus_share) / corpus_share)
    kinds, weights = zip(*letter_kinds.items())
    return [_letter_text(rng.choices(kinds, weights)[0], facts, train, rng) for _ in range(n)]
