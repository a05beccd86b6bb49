"""The `<think>steps</think> answer` format of worked solutions (chain of thought): where its
answer is and whether its tags are well formed.

The answer is read after the closing tag only, so an answer written inside the thinking never
counts; a completion with no closing tag, or more than one, has no answer. Well formed (what the
format reward and the eval's format rate check) is stricter: one think block first, with steps in
it, and nothing after it but the answer.
"""

from __future__ import annotations

OPEN = "<think>"
CLOSE = "</think>"


def cot_completion(steps: str, answer: str) -> str:
    """A worked completion: ` <think>steps</think> answer` (the leading space as direct ones)."""
    return f" {OPEN}{steps}{CLOSE} {answer}"


def after_think(text: str) -> str | None:
    """The text after the one `</think>` of a completion, or None (no closing tag, or several)."""
    if text.count(CLOSE) != 1:
        return None
    return text.partition(CLOSE)[2]


def think_text(text: str) -> str | None:
    """The steps inside a completion's one think block (one `<think>`, before the one
    `</think>`), or None."""
    if text.count(OPEN) != 1 or text.count(CLOSE) != 1:
        return None
    _, opened, steps = text.partition(CLOSE)[0].partition(OPEN)
    return steps if opened else None


def well_formed_answer(text: str) -> str | None:
    """The text after the think block when the completion is one think block with non-blank
    steps and no tags inside, then the rest (blank space before the block allowed); else None."""
    stripped = text.lstrip()
    if not stripped.startswith(OPEN) or text.count(OPEN) != 1 or text.count(CLOSE) != 1:
        return None
    steps, _, rest = stripped[len(OPEN) :].partition(CLOSE)
    return rest if steps.strip() else None
