"""What `kcollapse bench` measures on: the models (organism, a wider GPT-2, real pretrained models), the inputs the
loop and the evaluator would give each of them, the targets each is held to, and the row every pair reports.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from kcollapse import corpus as corpus_mod
from kcollapse import organism
from kcollapse.config import PAPER_FORMATS, CorpusConfig, EvalConfig, ExperimentConfig, OrganismConfig, load_config
from kcollapse.evaluate import benchmark as bmk
from kcollapse.evaluate import build_prompts, load_benchmark
from kcollapse.evaluate.formats import get_format, option_targets
from kcollapse.models import load_model
from kcollapse.organism.gen0 import build_model, build_tokenizer, gen0_key, world_texts
from kcollapse.pretrained import PACKAGED, resolve_model
from kcollapse.synthesize import synthesis_inputs

TARGETS = {("scoring", "reference", "letter"): 6.0, ("scoring", "reference", "text"): 3.0,
           ("scoring", "lm-eval", "letter"): 3.0, ("scoring", "lm-eval", "text"): 3.0,
           ("free_text", "reference", None): 5.0, ("synthesis", "reference", None): 4.0}
UTILISATION_TARGET = 50.0  # % of the matmul peak, on the organism
REAL_TARGETS = {("scoring", "reference", "letter"): 5.0, ("scoring", "reference", "text"): 5.0,
                ("free_text", "reference", None): 4.0, ("synthesis", "reference", None): 3.0}
REAL_UTILISATION_TARGET = 60.0  # % of the fp32 matmul peak, on a real pretrained model


@dataclass
class Subject:
    """A model under test, the recipe the loop would run it with, and the targets its rows are held to."""

    label: str
    model: object
    tokenizer: object
    recipe: ExperimentConfig
    targets: dict
    utilisation_target: float | None
    pretrained: bool = False  # a real model: its own (smaller) input counts

    @property
    def precision(self) -> str:
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")


@dataclass
class Inputs:
    """What the loop and the evaluator would give this model, built with its own tokenizer and recipe."""

    scoring: dict  # format -> (answer kind, prompts, option targets)
    free_prompts: list[str]
    synth: list  # synthesis inputs as build_mix makes them: ids after BOS, or chat-template texts
    train_texts: list[str]


def organisms(tiny: bool) -> tuple[list[Subject], object]:
    """The organism (cached gen 0 if present) and a wider GPT-2 on its tokenizer, both on the default recipe."""
    from transformers import GPT2Config, GPT2LMHeadModel  # deferred: transformers is slow to import

    recipe = load_config(None, [], "default")
    cfg = OrganismConfig()
    world = organism.build_world(cfg, organism.default_cache_dir())
    cached = organism.default_cache_dir() / f"gen0-{gen0_key(cfg, world)}"
    if (cached / "organism.json").is_file() and not tiny:
        model, tok = load_model(cached, device="cpu")
        label = "organism (gen 0)"
    else:
        tok = build_tokenizer(world_texts(world), cfg.n_positions)
        tok.padding_side = "left"
        if tiny:
            cfg = cfg.model_copy(update=dict(n_embd=32, n_layer=2, n_head=2))
        model = build_model(cfg, tok).eval()
        label = "organism (tiny)" if tiny else "organism (random init)"
    subjects = [Subject(f"{label} {model.num_parameters() / 1e6:.1f}M", model, tok, recipe, TARGETS, UTILISATION_TARGET)]
    if not tiny:
        torch.manual_seed(1)
        wide = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=cfg.n_positions, n_embd=256, n_layer=6,
                                          n_head=8, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                          bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                                          pad_token_id=tok.pad_token_id)).eval()
        subjects.append(Subject(f"gpt2 6x256 {wide.num_parameters() / 1e6:.1f}M", wide, tok, recipe, TARGETS, None))
    return subjects, world


def pretrained_subject(spec: str) -> Subject:
    """A real model from any spec `model:` accepts (checkpoint dir, `.gguf` file, `gemma3-270m`), float32 on the
    CPU, with the recipe the loop would run it with: a packaged model's own preset, else the default recipe. A spec
    that does not load is the loader's one-line UserError."""
    recipe = load_config(None, [], spec if spec in PACKAGED else "default").model_copy(update={"model": spec})
    model, tok = load_model(resolve_model(spec, recipe.cache_dir), device="cpu", dtype="float32",
                            tokenizer_path=recipe.tokenizer)
    return Subject(f"{spec} {model.num_parameters() / 1e6:.0f}M", model, tok, recipe, REAL_TARGETS,
                   REAL_UTILISATION_TARGET, pretrained=True)


def default_real_models() -> list[str]:
    """The packaged real models whose weights package is installed (a full bench adds their rows)."""
    return [name for name, package in PACKAGED.items() if importlib.util.find_spec(package) is not None]


def build_inputs(subject: Subject, world, n_questions: int, n_prompts: int, n_synth: int) -> Inputs:
    """Inputs as the loop and the evaluator build them for this model: prompts by `build_prompts` (its chat template
    when it has one and the recipe uses it), tokenised by the engine (its BOS); synthesis prompts cut from the
    organism corpus with its tokenizer by `make_blocks` and wrapped by `synthesis_inputs` (BOS or chat template)."""
    recipe, tok = subject.recipe, subject.tokenizer
    ecfg = EvalConfig(**{**recipe.eval.model_dump(), "limit": -(-max(n_questions, n_prompts) // 3)})  # 3 subjects
    items = load_benchmark(ecfg, world.benchmark_path)
    questions = [q for q in items if bmk.is_question(q)][: max(n_questions, n_prompts)]
    pool = bmk.few_shot_pool(items)
    scoring = {}
    for name in PAPER_FORMATS:  # the four the paper evaluates
        fmt = get_format(name)
        scoring[name] = (fmt.answer, build_prompts(fmt, questions, pool, ecfg, tok, recipe.chat.use_template),
                         [option_targets(fmt, q) for q in questions])
    free_prompts = scoring["multiple_choice"][1][:n_prompts]
    scoring = {name: (answer, prompts[:n_questions], targets[:n_questions])
               for name, (answer, prompts, targets) in scoring.items()}
    texts = corpus_mod.load_texts(CorpusConfig(path="organism"), world.corpus_path)
    blocks = corpus_mod.make_blocks(tok, texts[: n_synth * 4], recipe.block_tokens)
    # whole prompts only: equal lengths, so the reference's batches of 4 need no padding (the paper's did not)
    blocks = [b for b in blocks if len(b.ids) >= recipe.prompt_tokens][:n_synth]
    _, synth = synthesis_inputs(tok, blocks, recipe)
    return Inputs(scoring, free_prompts, synth, [t.text for t in texts[:2000]])


def row(subject: Subject, name, baseline, fmt, ours, theirs, unit, check, threads=None, train_config=None,
         held=True, precision=None):
    ratio = ours / theirs if theirs else float("nan")
    if unit.startswith("%"):
        target = subject.utilisation_target if held else None
        passed = ours >= target if target else None
    else:
        target = subject.targets.get((name, baseline, get_format(fmt).answer if fmt else None))
        passed = ratio >= target if target else None
    return {"name": name, "baseline": baseline, "format": fmt, "model": subject.label, "ours": ours, "theirs": theirs,
            "ratio": ratio, "unit": unit, "threads": threads or torch.get_num_threads(),
            "precision": precision or subject.precision,
            "target": target, "passed": passed, "train_config": train_config, "check": check}

