"""Option-order control: every question asked a second time with its options in another order.

A model that "collapses" onto one answer may have lost the facts, or may just have drifted toward one option
position (always "A"). Asking each question again with its options cyclically shifted tells the two apart: a
model that knows (or believes) something picks the same option wherever it stands; a position-biased model picks
the same letter whatever stands there.

The shift is fixed per question (from its id alone, so every run, arm and generation asks the same permuted
question) and never 0, so the gold option always moves. In the permuted order, position k holds original option
(k + shift) % n. The permuted answer is added to the question's record as

    perm_shift, perm_predicted_position (the letter picked in the permuted prompt),
    perm_predicted_index (that option's index in the original order), perm_is_correct, perm_confidence

and metrics.py turns those into accuracy_permuted, consistent_correct, option_consistency, position_consistency
and position_bias.
"""

from __future__ import annotations

import hashlib

OPTION_PLACEHOLDERS = ("choices_lettered", "choices_slash", "choices_inline")


def shows_options(fmt) -> bool:
    """Only a format whose prompt lists the options has an order to permute (cloze does not)."""
    return any("{" + p in fmt.template for p in OPTION_PLACEHOLDERS)


def shift_for(item_id, n: int) -> int:
    """The question's fixed cyclic shift, 1..n-1 (0 when there is nothing to move)."""
    if n < 2:
        return 0
    digest = hashlib.sha256(f"kcollapse-permutation:{item_id}".encode()).hexdigest()
    return 1 + int(digest[:8], 16) % (n - 1)


def permuted(item: dict, shift: int) -> dict:
    """The item with its choices rotated: position k shows original option (k + shift) % n."""
    n = len(item["choices"])
    choices = [item["choices"][(k + shift) % n] for k in range(n)]
    return {**item, "choices": choices, "answer": (int(item["answer"]) - shift) % n}


def add_permuted(records: list[dict], shifts: list[int], scored: list[dict]) -> None:
    """Attach the permuted-order answer (scored on the permuted prompts) to each question's record, in place."""
    for r, shift, s in zip(records, shifts, scored):
        n = len(r["choices"])
        position = s["predicted_index"]
        index = (position + shift) % n
        r.update(perm_shift=shift, perm_predicted_position=position, perm_predicted_index=index,
                 perm_is_correct=index == r["correct_index"], perm_confidence=s["confidence"])


def gold_position(record: dict) -> int:
    """Where the gold option stood in the permuted prompt."""
    return (record["correct_index"] - record["perm_shift"]) % len(record["choices"])
