"""What every verifiable task is: a space of problems split by prompt hash, and how a completion
is read and graded. The generated families (data_prep.tasks, data_prep.tasks_reasoning) and the
user's JSONL tasks (data_prep.user_tasks) all build on it; it lives apart so that the union of
all of them (data_prep.tasks.TaskConfig) imports each without a cycle.

A generated task (GeneratedTask) also writes a worked solution for every problem (`format: cot`,
data_prep.thinking) and has an out-of-distribution space beside its own (longer operands, more
numbers), fixed by its options.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer

from data_prep.thinking import after_think, cot_completion, think_text, well_formed_answer
from pipeline.engine.config import Strict
from pipeline.engine.errors import PipelineError

ENUMERATE_LIMIT = 200_000  # larger problem spaces are sampled instead of listed
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

    def sample_key(self, rng: random.Random, even: bool = False) -> Key:
        """One problem drawn uniformly from the space (or from a bound of it that `in_space`
        narrows); `even`: each subtask of a length-based family equally likely instead."""
        raise NotImplementedError

    def balanced_rows(self) -> bool:
        """Whether training rows are drawn evenly over subtasks (GeneratedTask.balance)."""
        return False

    def even_held_out(self) -> bool:
        """Whether held-out problems are drawn evenly over subtasks (GeneratedTask.held_out)."""
        return False

    def in_space(self, key: Key) -> bool:
        """Whether a drawn key is a problem of the space: checked after the cheap split test, for
        spaces costly to test (countdown solves each draw)."""
        return True

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

    def completion(self, key: Key, answer: str) -> str:
        """The completion that gives `answer` to problem `key` (the right one or a near miss)."""
        return f" {answer}"

    def problem(self, key: Key) -> dict[str, Any]:
        """One problem as {"prompt", "completion", "answer", "subtask"}."""
        answer = self.answer(key)
        return {
            "prompt": self.prompt(key),
            "completion": self.completion(key, answer),
            "answer": answer,
            "subtask": self.subtask(key),
        }

    def reference_length(self, prompt: str, answer: str) -> int:
        """Characters of the reference completion of the problem with `prompt` and `answer`."""
        return len(f" {answer}")

    def ood_task(self) -> TaskBase:
        """The task over the out-of-distribution space (test_percent kept): problems no option
        of this task's own space reaches."""
        raise PipelineError(
            f"task {self.FAMILY} has no out-of-distribution split; use a generated task "
            "(arithmetic, sort, reverse, addition, countdown) or the test split"
        )

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
        got = self.parse(completion)
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


class GeneratedTask(TaskBase):
    """A task whose problems a rule generates: it can write each one's worked solution and has
    an out-of-distribution space beside its own."""

    format: Literal["direct", "cot"] = Field(
        "direct",
        description="direct: the completion is ` answer` | cot: ` <think>worked steps</think> "
        "answer`, the answer read after </think> only",
    )

    balance: bool | None = Field(
        None,
        description="draw training rows evenly over subtasks (operand lengths, how many "
        "numbers) instead of uniformly over problems, where subtask sizes differ by orders of "
        "magnitude; held-out splits stay uniform. Default: on for addition and countdown, off "
        "for sort, reverse and arithmetic (their recipes' results are kept)",
    )

    held_out: Literal["uniform", "even"] = Field(
        "uniform",
        description="how the test and ood problems that eval scores are drawn: uniform over "
        "problems, or even over subtasks (each subtask the same share, so each one's accuracy and "
        "the macro average are measured on as many problems as the micro average)",
    )

    BALANCE: ClassVar[bool] = False  # the family's default for `balance`

    def balanced_rows(self) -> bool:
        return self.BALANCE if self.balance is None else self.balance

    def even_held_out(self) -> bool:
        return self.held_out == "even"

    @model_serializer(mode="wrap")
    def _without_new_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """The task's fields, less `format`, `balance`, `held_out` and the `ood_*` options at
        their defaults: they came after runs existed, and a stage's fingerprint hashes its config,
        so runs made before them keep their fingerprints (and skip what is up to date)."""
        data = handler(self)
        for name, field in type(self).model_fields.items():
            new = name in ("format", "balance", "held_out") or name.startswith("ood_")
            if new and name in data and getattr(self, name) == field.default:
                del data[name]
        return data

    UNIQUE_STEPS: ClassVar[bool] = True  # one right worked solution per problem (not countdown)

    def steps(self, key: Key) -> str:
        """The worked solution of problem `key` (what the think block holds)."""
        raise NotImplementedError

    def step_credit(self, prompt: str, completion: Any) -> float:
        """The share of the worked solution's steps (space-separated) that the completion's one
        think block writes, in order, before its first wrong one; 0 without a think block or
        for a prompt of another family."""
        key = self.key_of(prompt)
        think = think_text(completion_text(completion) or "")
        if key is None or think is None:
            return 0.0
        reference = self.steps(key).split()
        right = 0
        for got, want in zip(think.split(), reference, strict=False):
            if got != want:
                break
            right += 1
        return right / len(reference)

    def key_of(self, prompt: str) -> Key | None:
        """The problem whose prompt `prompt` is, or None when it is no prompt of this family."""
        raise NotImplementedError

    def parse_text(self, text: str) -> str | None:
        """The answer a text starts with (a digit string with an optional minus), or None."""
        return parse_answer(text)

    def is_bare_text(self, text: str) -> bool:
        """True when a text is only an answer (surrounding whitespace allowed)."""
        return is_bare_answer(text)

    def completion(self, key: Key, answer: str) -> str:
        if self.format == "cot":
            return cot_completion(self.steps(key), answer)
        return f" {answer}"

    def reference_length(self, prompt: str, answer: str) -> int:
        key = self.key_of(prompt) if self.format == "cot" else None
        if key is None:
            return super().reference_length(prompt, answer)
        return len(self.completion(key, self.answer(key)))

    def parse(self, completion: Any) -> str | None:
        """The answer a completion gives: what it starts with (direct), or what the text after
        its one `</think>` starts with (cot); None if none."""
        text: str | None = completion_text(completion)
        if self.format == "cot":
            text = after_think(text or "")
        return None if text is None else self.parse_text(text)

    def is_bare(self, completion: Any) -> bool:
        """Direct: only an answer. Cot: one well-formed think block with steps, then only one
        answer."""
        text: str | None = completion_text(completion)
        if self.format == "cot":
            text = well_formed_answer(text or "")
        return text is not None and self.is_bare_text(text)


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
