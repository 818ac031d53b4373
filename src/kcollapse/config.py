"""The experiment config: one pydantic model, loaded from YAML, overridable with `--set key.path=value`.

Defaults are the reference paper's protocol (Keisha et al. 2025: 64-token blocks, 8000 samples per generation,
full fine-tune at lr 1e-5 for 0.5 epoch on 512-token chunks, 16 generations). Recipes under `recipes/` (the
offline model organism's default, `quick` and `collapse`) are ordinary config files that override some of them.
Unknown keys and wrong types are errors that name the field; nothing is silently ignored.
"""

from __future__ import annotations

import copy
import reprlib
import string
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kcollapse.errors import UserError

PAPER_FORMATS = ["multiple_choice", "multiple_choice_few_shot", "short_answer", "no_instruction"]
PAPER_MIN_CHARS = 50  # the paper's corpus filter: shorter texts are dropped


def paper_min_block_tokens(block_tokens: int) -> int:
    """The paper's block filter: a short text or a long text's tail under a quarter block is dropped."""
    return max(2, block_tokens // 4)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CorpusConfig(Strict):
    """The real text. `path` is a local .txt/.jsonl/.csv file or a directory of them, or `organism`;
    `dataset` (with `dataset_config`, `split`, `text_field`) loads it through `datasets` instead."""

    path: str | None = "organism"
    dataset: str | None = None
    dataset_config: str | None = None
    split: str = "train"
    text_field: str = "text"
    domain_field: str = "domain"
    min_chars: int | None = Field(None, ge=0, description="texts shorter than this are dropped; null: 50 (the paper), "
                                  "0 when the organism trains on its own corpus")
    min_block_tokens: int | None = Field(None, ge=1, description="blocks (a short text, a long text's tail) with fewer "
                                         "tokens are dropped; null: block_tokens // 4, 1 when the organism trains on its own corpus")
    heldout_share: float = Field(0.05, ge=0.0, lt=1.0, description="share of texts kept out of training for perplexity_heldout")
    heldout_max_texts: int = Field(200, ge=1)

    @model_validator(mode="after")
    def _one_source(self):
        if not self.path and not self.dataset:
            raise ValueError("set corpus.path (a local file/dir or 'organism') or corpus.dataset")
        return self


class ArmConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    synthetic_ratio: float = Field(ge=0.0, le=1.0)
    mode: Literal["replace", "accumulate", "accumulate_subsample", "real_only"] = Field(
        "replace", description="train on this generation's mix (replace), on every mix so far (accumulate), on a "
        "sample of every mix so far the size of one generation's (accumulate_subsample), or real text only")
    domain: str | None = None
    domain_corpus: str | None = Field(None, description="a text corpus of this domain (as the paper's per-topic files)")
    domain_keywords: list[str] | None = Field(None, description="keep only real texts mentioning one of these")


class SamplingConfig(Strict):
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 = no top-k filtering")
    repetition_penalty: float = Field(1.0, gt=0.0)
    batch_size: int = Field(64, ge=1)
    keep_prompt: bool = Field(False, description="train on prompt + continuation instead of the continuation alone")


class ChatConfig(Strict):
    use_template: bool = True
    system_prompt: str = (
        "Continue the following text. Write only the continuation, as plain text, with no introduction or comments."
    )


class TrainConfig(Strict):
    method: Literal["full", "lora"] = "full"
    lr: float = Field(1e-5, gt=0.0)
    epochs: float = Field(0.5, gt=0.0)
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs when set")
    chunk_tokens: int = Field(512, ge=8)
    batch_size: int = Field(1, ge=1)
    grad_accum: int = Field(4, ge=1)
    weight_decay: float = Field(0.01, ge=0.0)
    warmup_ratio: float = Field(0.0, ge=0.0, le=1.0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    max_grad_norm: float = Field(1.0, gt=0.0)
    gradient_checkpointing: bool = True
    packing: bool = Field(True, description="texts joined and cut into full chunks; false: one text per sequence, "
                          "trained in bins of chunk_tokens, each text attending only to itself")
    mixed_precision: Literal["no", "bf16"] = Field(
        "no", description="bf16: a float32 model's matmuls run in bfloat16 under autocast; weights, gradients and the "
                          "optimizer stay float32 (kcollapse bench states the loss and gradient agreement with float32)")
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    lora_target_modules: list[str] | None = None

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value):
        return "no" if value is False else value  # YAML reads a bare `no` as false


class EvalConfig(Strict):
    benchmark: str = Field("organism", description="organism | local .jsonl/.csv file or dir | hf:<dataset name>")
    subjects: list[str] | None = Field(None, description="None: every subject of the benchmark (MMLU: the paper's six)")
    formats: list[str] = Field(default_factory=lambda: PAPER_FORMATS + ["cloze"])
    formats_file: str | None = Field(None, description="YAML file with extra instruction formats")
    limit: int | None = Field(100, ge=1, description="questions per subject")
    split: str | None = Field(None, description="only questions of this benchmark split (e.g. heldout)")
    scoring: Literal["reference", "loglik"] = "reference"
    permutation: bool = Field(False, description="also ask each question with its options rotated (position-bias "
                              "control; doubles option scoring of the formats that list options: +40% evaluation time "
                              "on the organism, hence off by default)")
    few_shot_k: int = Field(3, ge=0)
    few_shot_file: str | None = None
    free_text: bool = True
    free_text_tokens: int = Field(64, ge=1)
    batch_size: int = Field(32, ge=1)
    perplexity_stride: int = Field(256, ge=1)
    judge_model: str | None = None
    gibberish_model: str | None = None
    embedding_judge: bool = False

    @model_validator(mode="after")
    def _check_files_and_formats(self):
        """Caught when the config is read, not hours later when generation 0 is evaluated."""
        for field in ("formats_file", "few_shot_file"):
            value = getattr(self, field)
            if value is not None and not Path(value).expanduser().is_file():
                raise ValueError(f"{field}: {value} does not exist (expected a file)")
        if not self.formats:
            raise ValueError("formats: empty list, expected at least one instruction format")
        from kcollapse.evaluate.formats import load_formats  # deferred: kcollapse.evaluate imports torch (and config)

        try:
            known = load_formats(self.formats_file)
            if self.few_shot_file is not None:
                from kcollapse.evaluate.benchmark import load_few_shot_file  # deferred: as above

                load_few_shot_file(Path(self.few_shot_file).expanduser())
        except UserError as e:
            raise ValueError(str(e)) from None
        except UnicodeDecodeError:
            raise ValueError(f"formats_file: {self.formats_file}: not UTF-8 text") from None
        unknown = [f for f in self.formats if f not in known]
        if unknown:
            raise ValueError(f"formats: unknown format '{unknown[0]}', expected one of {', '.join(known)}")
        for name in self.formats:
            _check_template(known[name], self.formats_file or "formats.yaml")
        return self


def _check_template(fmt, source: str) -> None:
    """A placeholder the renderer cannot fill would be a KeyError at the first evaluation, hours into a run."""
    from kcollapse.evaluate.formats import PLACEHOLDERS  # deferred: kcollapse.evaluate imports torch (and config)

    for part, allowed in (("template", PLACEHOLDERS), ("example", PLACEHOLDERS | {"letter", "answer_text"})):
        text = getattr(fmt, part, None)
        if not text:
            continue
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
        except ValueError as e:
            raise ValueError(f"formats: {source}: format '{fmt.name}' {part}: {e} (write {{{{ and }}}} for braces)") from None
        bad = [f for f in fields if f.split(".")[0].split("[")[0] not in allowed or f != f.split(".")[0].split("[")[0]]
        if bad:
            raise ValueError(f"formats: {source}: format '{fmt.name}' {part} has unknown placeholder {{{bad[0]}}}, "
                             f"expected some of {', '.join('{' + p + '}' for p in sorted(allowed))}")


class LetterSkill(Strict):
    """Generation 0's letter-answer training (organism/letters.py): two or three drill phases, then the corpus mixed
    with fresh letter items, each phase one `finetune`, one text per sequence (trained in bins, no text attending to
    another).
    With `facts_first` the standard generation-0 training (the organism's `steps`, `lr`, `batch_size`) comes first."""

    two_option_steps: int = Field(0, ge=0, description="a first drill in the no_instruction layout on two-option "
                                  "items (at most, with drill_target), 0: none. A curriculum: the four-option bare "
                                  "drill then formed in 1,500 steps after 1,750 on two, instead of 5,500 (docs/LETTERS.md)")
    bare_drill_steps: int = Field(8000, ge=0, description="drill in the no_instruction layout alone (at most, with "
                                  "drill_target)")
    drill_steps: int = Field(4000, ge=0, description="drill in every letter layout (at most, with drill_target)")
    drill_target: float | None = Field(0.98, ge=0.0, le=1.0, description="end a drill phase once fresh drill items "
                                       "are answered this well in each of its layouts (checked every 250 steps); "
                                       "null: every step runs")
    facts_first: bool = Field(True, description="train the facts as the default organism does before the drill "
                              "(the drill then forms sooner)")
    drill_loss: Literal["text", "answer"] = Field(
        "text", description="what a drill text is trained on: every token, or its answer alone (measured with 2,400 "
        "facts steps: the bare drill formed in 3,500 steps instead of 5,500 and held-out letters reached 0.80-0.85, "
        "but alpha 1.0 then lost at most 0.11 in any format; docs/LETTERS.md)")
    drill_lr: float = Field(1e-3, gt=0.0)
    drill_batch_size: int = Field(16, ge=1, description="texts per step (one per row)")
    joint_steps: int = Field(2500, ge=1, description="the last phase, corpus + letter texts (six layers: held-out letters "
                             "0.77-0.81 after 2,500 steps, 0.83-0.90 after 7,500, whose facts barely collapsed)")
    joint_lr: float = Field(2e-3, gt=0.0)
    joint_batch_size: int = Field(16, ge=1, description="texts per step (one per row)")
    mix: dict[str, float] = Field(
        default_factory=lambda: {"corpus": 0.6, "drill": 0.2, "exercise": 0.13, "bridge": 0.07},
        description="shares of the joint phase's texts: corpus | drill | exercise | bridge")
    pool_share: float | None = Field(None, ge=0.0, lt=1.0, description="share of letter texts among the loop's real "
                                     "pool texts (null: the joint phase's, 1 - mix.corpus); not part of generation 0")

    @field_validator("mix")
    @classmethod
    def _mix(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - {"corpus", "drill", "exercise", "bridge"})
        if unknown:
            raise ValueError(f"unknown kind(s) {unknown}, expected some of corpus, drill, exercise, bridge")
        if any(v < 0 for v in value.values()) or sum(value.values()) <= 0:
            raise ValueError(f"shares must be >= 0 with a positive sum, got {value}")
        return value


class OrganismConfig(Strict):
    """The offline model organism: a tiny GPT-2 trained from scratch on prose about real facts."""

    domains: list[str] = Field(default_factory=lambda: ["geography", "us_states", "chemistry"])
    relations: list[str] | None = Field(None, description="facts kept, by relation (null: every relation of the domains)")
    paragraphs_per_entity: int = Field(8, ge=1, description="prose paragraphs per entity, each its own paraphrase mix")
    qa_exercises: dict[str, float] = Field(
        default_factory=lambda: {"short_answer": 1.0, "cloze": 1.0, "multiple_choice": 0.34,
                                 "multiple_choice_few_shot": 0.33, "no_instruction": 0.33},
        description="instruction format -> share of the training facts solved once in it")
    heldout_share: float = Field(0.5, ge=0.0, lt=1.0, description="facts never asked as QA exercises")
    vocab_size: int = Field(1024, ge=64, description="a floor: the vocabulary is every word of the world (~1.5k)")
    n_embd: int = Field(128, ge=8)
    n_layer: int = Field(4, ge=1)
    n_head: int = Field(4, ge=1)
    n_positions: int = Field(128, ge=16)
    steps: int = Field(2400, ge=1, description="many small steps at a high lr (the facts need updates more than "
                       "tokens); after 3200 one build's alpha 1.0 lost 0.14-0.24 of held-out short answers in 10 "
                       "generations across four loop seeds (another build 0.49), after 2400 three builds lost 0.28-0.43 at "
                       "temperature 1.0 and a fourth 0.10-0.12, 0.21-0.30 at the default's 1.2 (README, 'How much one "
                       "run tells')")
    batch_size: int = Field(8, ge=1)
    lr: float = Field(4e-3, gt=0.0)
    seed: int = 0
    train_threads: int = Field(2, ge=1, description="CPU threads generation 0 trains on, however many the machine has: "
                               "its weights depend on how float sums split across threads, so the count is fixed and "
                               "in the cache key (a 1-thread and a 2-thread build of the letter-skilled organism "
                               "differed by up to 0.1 in held-out letter accuracy)")
    letter_skill: LetterSkill | None = Field(None, description="train generation 0 to answer with letters (slower)")
    mixed_precision: Literal["no", "bf16"] = Field(
        "no", description="generation 0's training: bf16 = matmuls in bfloat16 under autocast and eager attention "
        "(SDPA's bf16 backward is slow at these shapes); a different model, in the cache key when set. Letters "
        "preset, measured: generation 0 in 836 s instead of ~1,040, held-out letters 0.83-0.86, but its alpha 0 "
        "control's few-shot accuracy drifted 0.089 over 10 generations (fp32: 0.032), so presets train in float32")

    @field_validator("qa_exercises")
    @classmethod
    def _shares(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in value.items() if not 0.0 <= v <= 1.0}
        if bad:
            raise ValueError(f"shares must be between 0 and 1, got {bad}")
        return value


class StageRules(Strict):
    """Thresholds of the stage rule (see the module docstring)."""

    subject: str | None = Field(None, description="questions classified: null = all, a subject, or split:<name>")
    accuracy: str = Field("accuracy", pattern="^(accuracy|judged_accuracy)$",
                          description="accuracy = scored option; judged_accuracy = the free-text answer's option")
    chance: float | None = Field(None, ge=0.0, lt=1.0, description="null: 1 / number of choices (0.25 without answers)")
    min_margin: float = Field(0.05, ge=0.0, description="baseline accuracy must exceed chance by this to measure retention")
    retention_b: float = Field(0.8, gt=0.0, description="B when retention of above-chance accuracy is below this")
    min_drop: float = Field(0.05, ge=0.0, description="without answers: smallest accuracy drop that counts")
    format_signal: Literal["answer_wellformed", "format_adherence"] = Field(
        "answer_wellformed", description="C reads the format off this: a short answer of the asked kind (wrong "
        "answers included: that is B), or an answer naming an option")
    format_drop: float = Field(0.2, gt=0.0, description="C: absolute drop of format_signal")
    repetition_rise: float = Field(0.2, gt=0.0, description="C: absolute rise of answer repetition")
    words_factor: float = Field(2.0, gt=1.0, description="C: answer length changed by more than this factor "
                                "while the format signal did not rise")
    fluency_drop: float = Field(0.2, gt=0.0, description="C: relative drop of fluency")
    confident_threshold: float = Field(0.5, gt=0.0, le=1.0, description="confident-wrong: wrong with confidence >= this")
    position_bias: float = Field(0.2, gt=0.0, le=1.0, description="flag position bias (eval.permutation answers) when "
                                 "position_bias >= this and the picks keep their letter more often than their option")
    ci: float = Field(0.95, gt=0.5, lt=1.0)
    n_boot: int = Field(1000, ge=50)
    seed: int = 0
    persist: int = Field(2, ge=1, description="generations in a row that confirm an onset")
    model_subject: str | None = Field("synthetic", description="text-metric rows watched (fallback: null = whole mix)")
    model_signals: dict[str, float] = Field(
        default_factory=lambda: {"perplexity_heldout": 0.2, "entropy": -0.1, "distinct_1": -0.1, "distinct_2": -0.1,
                                 "repetition_rate": 0.5},
        description="metric -> relative change vs model 0 that is a warning (sign = direction of collapse); text "
        "statistics are those of the text each model wrote (model 0's: generation 1's synthetic mix)",
    )


class ExperimentConfig(Strict):
    model: str = Field("organism", description="HF model id, local checkpoint dir, a .gguf file, 'gemma3-270m' (packaged weights) or 'organism'")
    tokenizer: str | None = None
    trust_remote_code: bool = False
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    block_tokens: int = Field(64, ge=2)
    prompt_tokens: int | None = Field(None, ge=1, description="prompt = first prompt_tokens of a block; None: the whole block")
    new_tokens: int = Field(64, ge=1)
    samples_per_generation: int = Field(8000, ge=1)
    generations: int = Field(16, ge=1)
    arms: list[ArmConfig] = Field(
        default_factory=lambda: [
            ArmConfig(name="alpha_0.25", synthetic_ratio=0.25),
            ArmConfig(name="alpha_0.5", synthetic_ratio=0.5),
            ArmConfig(name="alpha_1.0", synthetic_ratio=1.0),
        ],
        min_length=1,
    )
    train: TrainConfig = Field(default_factory=TrainConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    chat: ChatConfig = Field(default_factory=ChatConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    organism: OrganismConfig = Field(default_factory=OrganismConfig)
    stages: StageRules = Field(default_factory=StageRules)
    seed: int = 0
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    keep_checkpoints: Literal["first_last", "all"] = "first_last"
    parallel_arms: int = Field(1, ge=1, description="arms fine-tuned at once, in separate processes (CPU)")
    threads: int | None = Field(None, ge=1, description="torch threads per process; None: all cores (generation 0), all cores / parallel_arms in arm workers")
    cache_dir: str | None = Field(None, description="where the organism's generation-0 model is cached")

    @field_validator("corpus", mode="before")
    @classmethod
    def _corpus_from_string(cls, value: Any):
        return {"path": value} if isinstance(value, (str, Path)) else value

    @model_validator(mode="after")
    def _check(self):
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arms: names must be unique, got {names}")
        if self.prompt_tokens is not None and self.prompt_tokens > self.block_tokens:
            raise ValueError("prompt_tokens must be <= block_tokens")
        self._resolve_corpus_filters()
        return self

    def _resolve_corpus_filters(self) -> None:
        """The corpus filters' nulls, resolved so config.yaml shows what ran. The organism trained on its own corpus
        keeps every text whole (its real pool is what generation 0 trained on, in the same proportions: the short
        cloze exercises and one-fact paragraphs included); any other corpus gets the paper's filters."""
        own = self.model == "organism" and self.corpus.path == "organism" and not self.corpus.dataset
        if self.corpus.min_chars is None:
            self.corpus.min_chars = 0 if own else PAPER_MIN_CHARS
        if self.corpus.min_block_tokens is None:
            self.corpus.min_block_tokens = 1 if own else paper_min_block_tokens(self.block_tokens)


# Fields that only change how fast a run goes, not what it computes: a resumed run may change them.
RUNTIME_FIELDS = {"device", "parallel_arms", "threads", "cache_dir", "eval.batch_size", "sampling.batch_size"}


def _short_repr(value: Any) -> str:
    """repr of user input, bounded in depth and length (a YAML alias bomb would take hours in repr())."""
    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxstring, r.maxother = 2, 4, 4, 4, 60, 60
    return r.repr(value)[:60]


def format_validation_error(err: ValidationError, source: str) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"]) or "config"
    if e["type"] == "extra_forbidden":
        return f"{source}: unknown key '{loc}'"
    found = e.get("input")
    found_s = "" if isinstance(found, dict) or e["type"] == "missing" else f" (found {_short_repr(found)})"
    msg = e["msg"].removeprefix("Value error, ")
    return f"{source}: {loc}: {msg}{found_s}"


def validate(data: dict, source: str = "config") -> ExperimentConfig:
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping of config keys, found {type(data).__name__}")
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise UserError(format_validation_error(err, source)) from None
    except RecursionError:
        raise UserError(f"{source}: values nested too deeply") from None


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a YAML config file")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read config file ({e.__class__.__name__})") from None
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise UserError(f"{path}: YAML nested too deeply to be a config") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path}: YAML syntax error{where}: {problem}") from None
    return {} if data is None else data


def recipe_path(name: str) -> Path:
    path = resources.files("kcollapse") / "recipes" / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.name.removesuffix(".yaml") for p in (resources.files("kcollapse") / "recipes").iterdir() if p.name.endswith(".yaml"))
        raise UserError(f"--preset {name}: unknown preset, expected one of {', '.join(available)}")
    return Path(str(path))


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `key.path=value` overrides to a full config dict (every field present), values parsed as YAML."""
    data = copy.deepcopy(data)
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"--set {item}: expected key.path=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except (yaml.YAMLError, RecursionError):
            value = raw
        parts = key.strip().split(".")
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise UserError(f"--set {key}: '{part}' is not an index of this list (0..{len(node) - 1})")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if part not in node:
                    raise UserError(f"--set {key}: no such field '{'.'.join(parts[: i + 1])}'")
                if last:
                    node[part] = value
                elif node[part] is None:
                    raise UserError(f"--set {key}: '{'.'.join(parts[: i + 1])}' is not a section")
                else:
                    node = node[part]
            else:
                raise UserError(f"--set {key}: '{'.'.join(parts[:i])}' is not a section")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, preset: str | None = None) -> ExperimentConfig:
    """CONFIG file, or a built-in preset (default: the organism experiment), then --set overrides."""
    if path is not None and preset is not None:
        raise UserError("give either a CONFIG file or --preset, not both")
    source = str(path) if path is not None else f"preset '{preset or 'default'}'"
    data = read_yaml(path if path is not None else recipe_path(preset or "default"))
    config = validate(data, source)
    if overrides:
        config = validate(apply_overrides(config.model_dump(mode="json"), overrides), "--set")
    return config


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): data}


def differing_fields(old: dict, new: dict) -> list[str]:
    a, b = flatten(old), flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RUNTIME_FIELDS)
