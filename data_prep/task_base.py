"""What every verifiable task is: a space of problems split by prompt hash, and how a completion
is read and graded. The generated families (data_prep.tasks) and the user's JSONL tasks
(data_prep.user_tasks) both build on it; it lives apart so that the union of all of them
(data_prep.tasks.TaskConfig) imports both without a cycle.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator
from typing import Any, ClassVar

from pydantic import Field

from pipeline.engine.config import Strict

ANSWER = re.compile(r"\s*(-?\d+)")
BARE_ANSWER = re.compile(r"\s*-?\d+\s*")

Key = tuple[Any, ...]


class TaskBase(Strict):
    """Options every task family has: which share of the space is held out."""

    test_percent: int = Field(
        10, ge=1, le=90, description="percent of the problem space held out (by prompt hash)"
    )

    FAMILY: ClassVar[str] = ""
    GROW: ClassVar[str] = "widen the task's options"  # the fix when a split is too small

    def all_keys(self) -> Iterator[Key]:
        """Every problem of the space, in a fixed order."""
        raise NotImplementedError

    def size(self) -> int:
        """Number of problems in the space."""
        raise NotImplementedError

    def sample_key(self, rng: random.Random) -> Key:
        """One problem drawn uniformly from the space."""
        raise NotImplementedError

    def prompt(self, key: Key) -> str:
        raise NotImplementedError

    def answer(self, key: Key) -> str:
        raise NotImplementedError

    def subtask(self, key: Key) -> str:
        """The slice of the space a problem belongs to, for per-subtask accuracy."""
        raise NotImplementedError

    def partial_credit(self, got: str, want: str) -> float:
        """Credit in [0, 1] for a wrong answer; 1 only for the right one."""
        raise NotImplementedError

    def near_miss(self, key: Key, rng: random.Random) -> str:
        """A plausible wrong answer (for preference pairs and multiple choice)."""
        raise NotImplementedError

    def split_of(self, key: Key) -> str:
        """The split a problem belongs to: a pure function of its prompt."""
        digest = hashlib.sha256(self.prompt(key).encode()).digest()
        return "test" if int.from_bytes(digest[:8], "big") % 100 < self.test_percent else "train"

    def problem(self, key: Key) -> dict[str, Any]:
        """One problem as {"prompt", "completion", "answer", "subtask"}."""
        answer = self.answer(key)
        return {
            "prompt": self.prompt(key),
            "completion": f" {answer}",
            "answer": answer,
            "subtask": self.subtask(key),
        }

    def parse(self, completion: Any) -> str | None:
        """The answer a completion gives, or None (generated tasks: its leading digit string)."""
        return parse_answer(completion)

    def is_bare(self, completion: Any) -> bool:
        """True when the completion is only an answer (surrounding whitespace allowed)."""
        return is_bare_answer(completion)

    def grade(
        self, completion: Any, answer: Any, problem: dict[str, Any] | None = None
    ) -> tuple[float, float]:
        """(exact, partial credit) of one completion against the right answer; `problem` (the
        problem's row, when the caller has it) is for tasks whose scorer reads more than the
        answer."""
        got = parse_answer(completion)
        want = str(answer).strip()
        if got is None or not want:
            return 0.0, 0.0
        if got == want:
            return 1.0, 1.0
        try:
            return 0.0, self.partial_credit(got, want)
        except ValueError:  # an answer that is not a number where the family needs one
            return 0.0, 0.0

    def check_inputs(self) -> None:
        """Check the files the task reads before any stage runs (generated tasks read none)."""

    def signature(self) -> dict[str, Any]:
        """What the task reads beyond its options (file versions), for stage fingerprints."""
        return {}


def task_file_signature(task: TaskBase | None) -> dict[str, Any]:
    """`{"task_file": ...}` for a task read from a file (its stat, for fingerprints), else {}."""
    signed = task.signature() if task is not None else {}
    return {"task_file": signed} if signed else {}


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or the last message's content of a conversation."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content")
        return content if isinstance(content, str) else ""
    return ""


def parse_answer(completion: Any) -> str | None:
    """The digit string (with an optional minus) a completion starts with, or None."""
    match = ANSWER.match(completion_text(completion))
    return match.group(1) if match else None


def is_bare_answer(completion: Any) -> bool:
    """True when the completion is only an answer (surrounding whitespace allowed)."""
    return BARE_ANSWER.fullmatch(completion_text(completion)) is not None
