"""Instruction formats: how a benchmark question is put to the model, kept as data (formats.yaml).

The reference paper asks the same MMLU questions in four formats and finds that knowledge collapse arrives at
different generations in each; `cloze` (a bare statement to complete) adds a probe that needs no instruction
following at all. A format is a template plus the shape of its answer (a letter, or the choice text). The scoring
engine, the free-text judge and the organism's QA exercises all render prompts through this one module.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import yaml

from kcollapse.errors import UserError

LETTERS = "ABCDEFGHIJ"
PLACEHOLDERS = {"subject", "question", "choices_lettered", "choices_slash", "choices_inline", "statement", "examples"}


@dataclass(frozen=True)
class Format:
    name: str
    template: str
    answer: str = "letter"  # "letter" | "text"
    example: str | None = None  # how one solved few-shot example is written
    needs: str | None = None  # an item field the format cannot do without (e.g. "statement")

    def applies_to(self, item: dict) -> bool:
        return not self.needs or bool(item.get(self.needs))


def _parse(name: str, spec: dict, source: str) -> Format:
    if not isinstance(spec, dict) or not isinstance(spec.get("template"), str):
        raise UserError(f"{source}: format '{name}' needs a 'template' string")
    unknown = set(spec) - {"template", "answer", "example", "needs"}
    if unknown:
        raise UserError(f"{source}: format '{name}' has unknown key(s) {sorted(unknown)}")
    if spec.get("answer", "letter") not in ("letter", "text"):
        raise UserError(f"{source}: format '{name}': answer must be 'letter' or 'text', found {spec.get('answer')!r}")
    return Format(name=name, **spec)


@lru_cache(maxsize=8)
def load_formats(extra_file: str | None = None) -> dict[str, Format]:
    """The built-in formats, plus (or overridden by) those in `extra_file`."""
    builtin = yaml.safe_load((resources.files("kcollapse") / "evaluate" / "formats.yaml").read_text())
    formats = {n: _parse(n, s, "formats.yaml") for n, s in builtin.items()}
    if extra_file:
        path = Path(extra_file)
        try:
            extra = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise UserError(f"{path}: cannot read formats file ({e.__class__.__name__})") from None
        if not isinstance(extra, dict):
            raise UserError(f"{path}: expected a mapping of format name -> {{template, answer}}")
        formats.update({n: _parse(n, s, str(path)) for n, s in extra.items()})
    return formats


def get_format(name: str, extra_file: str | None = None) -> Format:
    formats = load_formats(extra_file)
    if name not in formats:
        raise UserError(f"unknown format '{name}', expected one of {', '.join(formats)}")
    return formats[name]


def _fields(item: dict, subject: str | None = None) -> dict[str, str]:
    choices = [str(c) for c in item["choices"]]
    subject = subject or item.get("subject") or "general knowledge"
    return {
        "subject": str(subject).replace("_", " "),
        "question": str(item["question"]).strip(),
        "choices_lettered": "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)),
        "choices_slash": " / ".join(choices),
        "choices_inline": "  ".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices)),
        "statement": str(item.get("statement") or ""),
    }


def render(fmt: Format, item: dict, examples: list[dict] = ()) -> str:
    """The prompt for one item; `examples` are solved items for few-shot formats."""
    fields = _fields(item)
    shots = ""
    if fmt.example:
        for ex in examples:
            ef = _fields(ex)
            ef["letter"] = LETTERS[int(ex["answer"])]
            ef["answer_text"] = str(ex["choices"][int(ex["answer"])])
            shots += fmt.example.format(**ef)
    return fmt.template.format(examples=shots, **fields)


def option_targets(fmt: Format, item: dict) -> list[str]:
    """What each option looks like as an answer: its bare letter, or its text."""
    if fmt.answer == "letter":
        return [LETTERS[i] for i in range(len(item["choices"]))]
    return [str(c) for c in item["choices"]]


def solved(fmt: Format, item: dict, examples: list[dict] = ()) -> str:
    """Prompt plus the gold answer, as a training exercise (the organism's QA pool) or a few-shot example."""
    target = option_targets(fmt, item)[int(item["answer"])]
    if fmt.answer == "letter":
        target = f"{target}. {item['choices'][int(item['answer'])]}"
    return f"{render(fmt, item, examples)} {target}"
