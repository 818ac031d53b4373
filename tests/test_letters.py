"""Letter answers for the organism (organism/letters.py): drill items whose letter names the option the question
asks for, fresh every time; exercises and bridges on training facts only; generation 0's three phases."""

from __future__ import annotations

import random
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest

from kcollapse import train as train_module
from kcollapse.config import LetterSkill, OrganismConfig, load_config
from kcollapse.errors import UserError
from kcollapse.io import read_jsonl
from kcollapse.organism import build_world, ensure_gen0, letters
from kcollapse.organism.gen0 import build_tokenizer, gen0_key, world_texts
from kcollapse.organism.world import RELATIONS

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from kc_cached_gen0 import cached_gen0, heldout_accuracy  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(OrganismConfig(), tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def facts(world):
    return read_jsonl(world.facts_path)


@pytest.fixture(scope="module")
def tokenizer(world):
    return build_tokenizer(world_texts(world, letter_skill=True), 128)


def _final_item(text: str) -> tuple[str, str, str]:
    """(named option, listing of the last item's options, its answer letter) of a solved drill text."""
    question = list(re.finditer(r"Which option is (.+?)\?\n", text))[-1]
    listing, answer = text[question.end():].rsplit("\nAnswer: ", 1)
    letter, named = answer.split(". ", 1)
    assert named == question.group(1)  # the answer line repeats the named option's text
    return named, listing, letter


def _options(listing: str) -> dict[str, str]:
    """{letter: option text} of an item's option listing, one option a line or all on one line."""
    return dict(re.findall(r"^([A-D])\. (.+)$", listing, re.M) or re.findall(r"\(([A-D])\) (.+?)(?=  \(|$)", listing))


@pytest.mark.parametrize("n_options", [4, 2])
@pytest.mark.parametrize("fmt", ["multiple_choice", "multiple_choice_few_shot", "no_instruction"])
def test_drill_letter_points_at_the_option_the_question_names(facts, fmt, n_options):
    rng = random.Random(0)
    facts = letters._facts(facts)  # the Facts the world draws options from
    texts = [letters.drill_text(facts, fmt, rng, n_options)[0] for _ in range(400)]
    gold = Counter()
    for text in texts:
        named, listing, letter = _final_item(text)
        options = _options(listing)
        assert sorted(options) == list("ABCD"[:n_options]) and options[letter] == named, text
        assert len(set(options.values())) == n_options  # distinct options, as the world draws them
        gold[letter] += 1
    fresh = 0.95 if n_options == 4 else 0.85  # fresh items, not a set to memorise (small answer pools repeat)
    assert len(set(texts)) >= fresh * len(texts)
    assert min(gold.values()) >= 280 / n_options  # the named option's position is spread over the letters


def test_joint_stream_follows_the_mix_and_never_asks_a_heldout_fact(world, facts, tokenizer):
    corpus = [row["text"] for row in read_jsonl(world.corpus_path)]
    skill = LetterSkill(mix={"corpus": 0.5, "drill": 0.2, "exercise": 0.2, "bridge": 0.1})
    texts = letters.joint_texts(facts, corpus, skill, 3000, random.Random(0))
    assert len(texts) == 3000
    questions = {RELATIONS[f["relation"]].question.format(e=f["entity"]): f["split"] for f in facts}
    in_corpus = set(corpus)
    kinds = Counter()
    for text in texts:
        if text in in_corpus:
            kinds["corpus"] += 1
            continue
        assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"], text
        if "Which option is" in text:
            kinds["drill"] += 1
            continue
        asked = [q for q in questions if q in text]
        assert asked and all(questions[q] == "train" for q in asked), text
        kinds["exercise" if re.search(r"Answer: [A-D]\. ", text.rsplit("\n", 2)[-1]) else "bridge"] += 1
    total = sum(kinds.values())
    for kind, share in skill.mix.items():
        assert abs(kinds[kind] / total - share) < 0.03, (kind, kinds)


def test_generation_0_with_the_letter_skill_trains_its_phases_and_caches_apart(tmp_path, monkeypatch):
    calls = []
    real = train_module.finetune
    monkeypatch.setattr(train_module, "finetune",
                        lambda model, tok, texts, cfg, **kw: calls.append((cfg.max_steps, cfg.lr, texts)) or
                        checked.append("stop_when" in kw) or real(model, tok, texts, cfg, **kw))
    checked = []
    tiny = dict(domains=["chemistry"], n_embd=16, n_layer=1, n_head=2, n_positions=32, steps=3, batch_size=2,
                paragraphs_per_entity=1)
    skill = LetterSkill(two_option_steps=5, bare_drill_steps=2, drill_steps=3, joint_steps=4, drill_batch_size=2,
                        joint_batch_size=2, facts_first=True, drill_target=0.9)
    cfg = OrganismConfig(**tiny, letter_skill=skill)
    path = ensure_gen0(cfg, tmp_path, progress=False)
    assert [(steps, lr) for steps, lr, _ in calls] == [(3, 4e-3), (5, 1e-3), (2, 1e-3), (3, 1e-3), (4, 2e-3)]
    prose, two, bare, drill, joint = (texts for _, _, texts in calls)
    assert checked == [False, True, True, True, False]  # the drill phases end once the drill is mastered
    world = build_world(cfg, tmp_path)
    assert prose == [r["text"] for r in read_jsonl(world.corpus_path)]  # the facts first, as the standard organism
    assert [len(two), len(bare), len(drill), len(joint)] == [5 * 2, 2 * 2, 3 * 2, 4 * 2]  # one text per row, all new
    assert all(t.startswith("Which option is") for t in two + bare)  # the bare layout: the question comes first
    assert all(len(_options(_final_item(t)[1])) == 2 for t in two)  # the curriculum: two options, then four
    assert all(len(_options(_final_item(t)[1])) == 4 for t in bare + drill)
    assert any(t.startswith("The following") for t in drill) and all("Which option is" in t for t in drill)
    assert any("Which option is" not in t for t in joint) and any("Which option is" in t for t in joint)
    assert (path / "model.safetensors").is_file()

    plain = OrganismConfig(**tiny)
    keys = {gen0_key(plain, world), gen0_key(cfg, world),
            gen0_key(cfg.model_copy(update={"letter_skill": skill.model_copy(update={"joint_lr": 1e-3})}), world)}
    assert len(keys) == 3 and path.name == f"gen0-{gen0_key(cfg, world)}"
    pool_only = cfg.model_copy(update={"letter_skill": skill.model_copy(update={"pool_share": 0.1})})
    assert gen0_key(pool_only, world) == gen0_key(cfg, world)  # the loop's pool share does not change generation 0
    no_two = cfg.model_copy(update={"letter_skill": skill.model_copy(update={"two_option_steps": 0})})
    assert gen0_key(no_two, world) != gen0_key(cfg, world)
    calls.clear()
    ensure_gen0(cfg.model_copy(update={"letter_skill": skill.model_copy(update={"bare_drill_steps": 0})}), tmp_path,
                progress=False)
    assert [steps for steps, _, _ in calls] == [3, 5, 3, 4]  # a phase of 0 steps is skipped
    calls.clear()
    answer_only = cfg.model_copy(update={"letter_skill": skill.model_copy(update={"drill_loss": "answer"})})
    ensure_gen0(answer_only, tmp_path, progress=False)
    two, bare, drill, joint = (texts for _, _, texts in calls[1:])  # drills as (prompt, answer): trained on the answer
    assert all(re.fullmatch(r" [A-D]\. .+", answer) and prompt.endswith("\nAnswer:")
               for prompt, answer in two + bare + drill)
    assert all(prompt.startswith("Which option is") for prompt, _ in two + bare)
    assert all(isinstance(t, str) for t in joint)
    assert gen0_key(answer_only, world) != gen0_key(cfg, world)
    calls.clear(), checked.clear()
    ensure_gen0(cfg.model_copy(update={"letter_skill": skill.model_copy(update={"facts_first": False,
                                                                                "drill_target": None})}),
                tmp_path, progress=False)
    assert [steps for steps, _, _ in calls] == [5, 2, 3, 4] and checked == [False] * 4  # from scratch, every step


def test_answer_only_drill_texts_are_the_drill_texts_cut_after_answer(facts):
    texts = letters.drill_texts(facts, letters.letter_formats(), 60, random.Random(3))
    pairs = letters.drill_texts(facts, letters.letter_formats(), 60, random.Random(3), answer_only=True)
    assert [prompt + answer for prompt, answer in pairs] == texts  # the same items, drawn alike
    for (prompt, answer), text in zip(pairs, texts):
        named, _, letter = _final_item(text)
        assert prompt.endswith("\nAnswer:") and answer == f" {letter}. {named}"  # the few-shot answers stay prompt


def test_a_prompt_and_answer_text_trains_on_its_answer_alone(tokenizer, facts, monkeypatch):
    """finetune's (prompt, completion) texts: in each bin a text's prompt tokens are no target, its answer's are; the
    binned loss and gradients are the padded rows' with the prompt masked (the model's own loss)."""
    import torch

    from kcollapse.config import TrainConfig
    from kcollapse.organism.gen0 import build_model

    pairs = letters.drill_texts(facts, letters.letter_formats(), 8, random.Random(0), answer_only=True)
    framed = train_module.prompted_rows(tokenizer, pairs, 128)
    for (ids, n), (prompt, answer) in zip(framed, pairs):
        assert ids[:n] == tokenizer(prompt)["input_ids"]  # the organism's tokenizer adds no BOS
        assert tokenizer.decode(ids[n:], skip_special_tokens=True) == answer.strip()
    batches = []
    real = train_module._bins
    monkeypatch.setattr(train_module, "_bins", lambda rows, capacity: batches.append(real(rows, capacity)) or batches[-1])
    model = build_model(OrganismConfig(n_embd=16, n_layer=1, n_head=2, n_positions=128), tokenizer)
    cfg = TrainConfig(method="full", lr=1e-2, max_steps=2, batch_size=4, grad_accum=1, chunk_tokens=128,
                      gradient_checkpointing=False, packing=False)
    train_module.finetune(model, tokenizer, pairs, cfg, seed=0, work_dir=Path(tempfile.mkdtemp()))
    expected = {tuple(ids): [-100] * n + ids[n:] for ids, n in framed}
    seen = 0
    for batch in batches:
        for b in range(len(batch["input_ids"])):
            starts = (batch["position_ids"][b] == 0).nonzero()[:, 0].tolist() + [batch["input_ids"].shape[1]]
            for s, e in zip(starts, starts[1:]):
                ids = tuple(batch["input_ids"][b, s:e].tolist())
                if ids in expected:
                    assert batch["labels"][b, s:e].tolist() == expected[ids]
                    seen += 1
    assert seen == 8
    with pytest.raises(ValueError, match="packing: false"):
        train_module.finetune(model, tokenizer, pairs, cfg.model_copy(update={"packing": True}), seed=0,
                              work_dir=Path(tempfile.mkdtemp()))

    model.config.use_cache = False
    model.train()
    chunks = train_module._Chunks([ids for ids, _ in framed[:4]], [n for _, n in framed[:4]])
    padded, _, want = _bins_train_as_padded_rows(model, chunks, 128, real)
    prompt = (padded["labels"] == -100) & padded["attention_mask"].bool()
    padded["labels"][prompt] = padded["input_ids"][prompt]
    assert not torch.allclose(model(**padded).loss, want)  # the prompt's tokens would have changed it


@pytest.mark.parametrize("override, expected", [
    ("organism.letter_skill={mix: {prose: 1}}", r"organism\.letter_skill\.mix.*unknown kind"),
    ("organism.letter_skill={joint_steps: 0}", r"organism\.letter_skill\.joint_steps"),
    ("organism.letter_skill={two_option_steps: -1}", r"organism\.letter_skill\.two_option_steps"),
    ("organism.letter_skill={drill_loss: prompt}", r"organism\.letter_skill\.drill_loss.*'text' or 'answer'"),
    ("organism.mixed_precision=fp16", r"organism\.mixed_precision"),
])
def test_bad_letter_skill_settings_name_the_field(override, expected):
    with pytest.raises(UserError, match=expected):
        load_config(preset="quick", overrides=[override])
    assert load_config(preset="quick", overrides=["organism.letter_skill={}"]).organism.letter_skill == LetterSkill()


def test_unpacked_training_trains_each_text_alone_in_bins_exactly_as_padded_rows(tokenizer, monkeypatch):
    import torch

    from kcollapse.config import TrainConfig
    from kcollapse.organism.gen0 import build_model

    short, long = "Which option is Fe?", " ".join(["Iron is a metal."] * 20)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in (short, long)]
    rows = train_module.rows(tokenizer, [short, long], 32)
    assert rows == [ids[0] + [tokenizer.eos_token_id], (ids[1] + [tokenizer.eos_token_id])[-32:]]
    assert len(rows[0]) < 16 and len(rows[1]) == 32
    batches = []
    real = train_module._bins
    monkeypatch.setattr(train_module, "_bins", lambda rows, capacity: batches.append(real(rows, capacity)) or batches[-1])
    model = build_model(OrganismConfig(n_embd=16, n_layer=1, n_head=2, n_positions=32), tokenizer)
    before = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    cfg = TrainConfig(method="full", lr=1e-2, max_steps=3, batch_size=4, grad_accum=1, chunk_tokens=32,
                      gradient_checkpointing=False, packing=False)
    train_module.finetune(model, tokenizer, [short, long] * 6, cfg, seed=0, work_dir=Path(tempfile.mkdtemp()))
    assert len(batches) == 3 and not torch.equal(before, model.transformer.h[0].attn.c_attn.weight)
    for batch in batches:  # 4 texts in bins of <= 32 tokens, positions restarting at 0, no text's first token a target
        segments = []
        for b in range(len(batch["input_ids"])):
            starts = (batch["position_ids"][b] == 0).nonzero()[:, 0].tolist() + [batch["input_ids"].shape[1]]
            segments += [(batch["input_ids"][b, s:e].tolist(), batch["labels"][b, s:e].tolist())
                         for s, e in zip(starts, starts[1:])]
        texts = [ids for ids, _ in segments if ids in rows]
        assert len(texts) == 4 and all(labels == [-100] + ids[1:] for ids, labels in segments if ids in rows)
        assert all(set(labels) == {-100} for ids, labels in segments if ids not in rows)  # the rest is padding
        longs = texts.count(rows[1])
        assert batch["input_ids"].shape[1] <= 32 and len(batch["input_ids"]) == longs + (longs < 4)

    # the same loss and gradients as the four texts padded into rows (the model's own loss) through the chunked loss
    # that finetune uses for this model: no text sees another, nor the padding
    model.config.use_cache = False
    chunks = train_module._Chunks([rows[0], rows[1], rows[0], rows[0]])
    _, binned, _ = _bins_train_as_padded_rows(model, chunks, 32, real)
    assert binned["input_ids"].shape == (2, 32)  # the long text fills one bin, the three short ones share the other


def _bins_train_as_padded_rows(model, chunks, capacity: int, bins):
    """Assert that the chunked loss of `chunks` laid into bins has the model's own loss and gradients on them as
    padded rows; return (the padded batch, the binned one, that loss)."""
    import torch

    from kcollapse import lmloss

    padded, binned = train_module._collate(list(chunks)), bins(list(chunks), capacity)
    model.zero_grad()
    want = model(**padded).loss
    want.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    got = lmloss.causal_lm_loss(model, binned["input_ids"], binned["labels"], position_ids=binned["position_ids"])
    got.backward()
    assert torch.allclose(got, want, atol=1e-5)
    assert all(torch.allclose(p.grad, g, atol=1e-5) for p, g in zip(model.parameters(), grads))
    return padded, binned, want


def test_a_drill_phase_ends_once_fresh_drill_items_are_answered_as_well_as_the_target(tokenizer, facts):
    import torch

    from kcollapse.config import TrainConfig
    from kcollapse.organism.gen0 import build_model

    model = build_model(OrganismConfig(n_embd=16, n_layer=1, n_head=2, n_positions=128), tokenizer)
    anything, perfect = (letters.drill_check(tokenizer, facts, letters.letter_formats(), t, n=40) for t in (0.0, 1.0))
    assert anything(model) and not perfect(model) and model.training  # an untrained model is not perfect
    letter_ids = tokenizer.convert_tokens_to_ids(list("ABCD"))
    with torch.no_grad():  # a head that always says "B": right on about a quarter of the fresh items, so the check
        model.lm_head.weight[letter_ids[1]] = 0  # at 0.5 fails and at 0.1 passes
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.lm_head.weight[:, 0] = -1.0
        model.lm_head.weight[letter_ids[1], 0] = 5.0
    assert letters.drill_check(tokenizer, facts, ["no_instruction"], 0.1, n=200)(model)
    assert not letters.drill_check(tokenizer, facts, ["no_instruction"], 0.5, n=200)(model)
    assert letters.drill_check(tokenizer, facts, ["no_instruction"], 0.4, n=200, n_options=2)(model)  # B: half right
    assert not letters.drill_check(tokenizer, facts, ["no_instruction"], 0.6, n=200, n_options=2)(model)

    steps, calls = [], []
    cfg = TrainConfig(method="full", lr=1e-3, max_steps=12, batch_size=2, grad_accum=1, chunk_tokens=64,
                      gradient_checkpointing=False, packing=False)
    texts = letters.drill_texts(facts, ["no_instruction"], 24, random.Random(0))
    model = build_model(OrganismConfig(n_embd=16, n_layer=1, n_head=2, n_positions=128), tokenizer)
    train_module.finetune(model, tokenizer, texts, cfg, seed=0, work_dir=Path(tempfile.mkdtemp()),
                          stop_when=lambda m: calls.append(m.training) or len(calls) == 2, check_every=3)
    assert calls == [True, True]  # asked at steps 3 and 6, in train mode; true the second time: stopped at 6 of 12


def test_a_letter_skilled_organism_carries_its_letter_texts_into_the_real_pool(tmp_path):
    """The alpha 0 control rehearses what generation 0 trained on: with the letter skill, the corpus and letter texts
    in the joint phase's proportions (loop.prepare, the real producer of the pool's texts, on a tiny world)."""
    from kcollapse import loop

    tiny = ["organism.domains=[geography, chemistry]", "organism.relations=[capital, symbol]", "organism.n_embd=16",
            "organism.n_layer=1", "organism.n_head=2", "organism.n_positions=32", "organism.steps=2",
            "organism.paragraphs_per_entity=1", f"cache_dir={tmp_path}"]
    skill = "organism.letter_skill={bare_drill_steps: 1, drill_steps: 1, joint_steps: 2, drill_batch_size: 2, joint_batch_size: 2}"
    _, texts, _, _, _ = loop.prepare(load_config(preset="default", overrides=[*tiny, skill]))
    _, plain, _, _, _ = loop.prepare(load_config(preset="default", overrides=tiny))
    corpus = {t.text for t in plain}
    added = [t for t in texts if t.text not in corpus]
    assert [t.text for t in texts if t.text in corpus] == [t.text for t in plain]
    mix = LetterSkill().mix
    assert abs(len(added) - len(plain) * (1 - mix["corpus"]) / mix["corpus"]) <= 1
    drills = [t for t in added if "Which option is" in t.text]
    assert abs(len(drills) / len(added) - mix["drill"] / (1 - mix["corpus"])) < 0.08
    facts = read_jsonl(build_world(load_config(preset="default", overrides=tiny).organism, tmp_path).facts_path)
    heldout = {RELATIONS[f["relation"]].question.format(e=f["entity"]) for f in facts if f["split"] == "heldout"}
    for t in added:
        assert t.domain in {"geography", "chemistry"} and not any(q in t.text for q in heldout), t
    _, fewer, _, _, _ = loop.prepare(load_config(preset="default", overrides=[*tiny, skill[:-1] + ", pool_share: 0.1}"]))
    assert abs((len(fewer) - len(plain)) - len(plain) * 0.1 / 0.9) <= 1  # pool_share sets the letter texts' share


def test_the_pool_keeps_each_letter_text_whole_and_out_of_the_perplexity_texts(tmp_path):
    """A letter text cut into 64-token blocks would train a few-shot question without its answer and the answer
    without its question (the control's letter formats drifted so): loop.setup, the real producer of the pools,
    gives each letter text one block, however long, and holds out only prose for perplexity."""
    from kcollapse import loop

    tiny = ["organism.domains=[geography, chemistry]", "organism.relations=[capital, symbol]", "organism.n_embd=16",
            "organism.n_layer=1", "organism.n_head=2", "organism.n_positions=32", "organism.steps=2",
            "organism.paragraphs_per_entity=1", f"cache_dir={tmp_path}", "block_tokens=16", "corpus.heldout_share=0.2"]
    skill = "organism.letter_skill={bare_drill_steps: 1, drill_steps: 1, joint_steps: 2, drill_batch_size: 2, joint_batch_size: 2}"
    cfg = load_config(preset="default", overrides=[*tiny, skill])
    _, texts, _, _, _ = loop.prepare(cfg)
    s = loop.setup(cfg)
    letter_texts = [t.text for t in texts if t.whole]
    assert letter_texts and s.heldout and not set(s.heldout) & set(letter_texts)
    pool = {tuple(b.ids) for b in s.pools["alpha_0"]}
    ids = s.tokenizer(letter_texts, add_special_tokens=False)["input_ids"]
    assert max(len(i) for i in ids) > 16  # some are longer than a block, and still one block
    assert all(tuple(i) in pool for i in ids)
    prose = [t for t in texts if not t.whole]
    assert len(s.pools["alpha_0"]) > len(letter_texts) and any(len(b.ids) == 16 for b in s.pools["alpha_0"])
    assert len(s.heldout) == int(len(prose) * 0.2)


def test_the_letters_preset_is_the_default_experiment_plus_the_letter_skill():
    """...with six layers (in four, held-out recall completes too late for the selection to follow it), the 3,200
    facts steps its generation 0 was measured with, loop training on one text per row, as its generation 0
    finished (packed chunks moved the control), and sampling at temperature 1.0, as its runs were measured (the
    default's 1.2 makes a 2,400-step four-layer build lose its facts; this one collapses in few-shot at 1.0)."""
    from kcollapse.config import differing_fields

    default = load_config(preset="default").model_dump(mode="json")
    letters_preset = load_config(preset="letters")
    assert letters_preset.organism.letter_skill == LetterSkill()
    assert letters_preset.train.packing is False
    changed = differing_fields(default, letters_preset.model_dump(mode="json"))
    assert letters_preset.organism.n_layer == 6
    rows = {"train.packing", "train.batch_size", "train.max_steps", "organism.n_layer", "organism.steps",
            "sampling.temperature"}
    assert (letters_preset.sampling.temperature, default["sampling"]["temperature"]) == (1.0, 1.2)
    assert rows <= set(changed) and all(f.startswith("organism.letter_skill.") for f in set(changed) - rows), changed


@pytest.mark.skipif(cached_gen0("letters")[1] is None,
                    reason="no cached letter-skilled generation 0: `kcollapse run --preset letters` trains it (17-24 min)")
def test_the_cached_letter_skilled_generation_0_answers_held_out_facts_in_all_five_formats():
    """Issue 16's numbers, on held-out facts (stated in prose only): >= 0.60 in each letter format (chance 0.25),
    short answer >= 0.85, cloze >= 0.90."""
    accuracy, items = heldout_accuracy(*cached_gen0("letters"))
    assert sum(i.get("split") == "heldout" for i in items) >= 250
    for fmt in letters.letter_formats():
        assert accuracy[fmt] >= 0.60, accuracy
    assert accuracy["short_answer"] >= 0.85 and accuracy["cloze"] >= 0.90, accuracy


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_a_killed_letter_skill_generation_0_resumes_after_its_last_finished_phase(tmp_path, monkeypatch, precision):
    """...to the same model as an unbroken build; in bf16 too (the reloaded phase trains with eager attention again)."""
    import torch
    from safetensors.torch import load_file

    tiny = dict(domains=["chemistry"], n_embd=16, n_layer=1, n_head=2, n_positions=32, paragraphs_per_entity=1, steps=2,
                mixed_precision=precision)
    cfg = OrganismConfig(**tiny, letter_skill=LetterSkill(two_option_steps=2, bare_drill_steps=2, drill_steps=2,
                                                          joint_steps=3, drill_batch_size=2, joint_batch_size=2))
    clean = ensure_gen0(cfg, tmp_path / "clean", progress=False)

    calls = []
    real = train_module.finetune

    def killed_in_the_joint_phase(model, tok, texts, train_cfg, **kw):
        calls.append(train_cfg.max_steps)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(model, tok, texts, train_cfg, **kw)

    monkeypatch.setattr(train_module, "finetune", killed_in_the_joint_phase)
    with pytest.raises(KeyboardInterrupt):
        ensure_gen0(cfg, tmp_path / "killed", progress=False)
    assert calls == [2, 2, 2, 2, 3] and len(list((tmp_path / "killed").glob(".gen0-*-phases/phase-*"))) == 4
    calls.clear()
    monkeypatch.setattr(train_module, "finetune", lambda *a, **kw: calls.append(a[3].max_steps) or real(*a, **kw))
    resumed = ensure_gen0(cfg, tmp_path / "killed", progress=False)
    assert calls == [3]  # only the unfinished phase trains again
    assert not list((tmp_path / "killed").glob(".gen0-*-phases"))  # phase checkpoints go once the model is cached
    a, b = load_file(clean / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same model as an unbroken run
