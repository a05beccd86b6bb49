"""Verifiable tasks: generated problems with exact answers, for pretraining text, SFT, RL and eval.

One registry of task families (arithmetic, reverse, sort), each a typed config with its own
difficulty knobs. Every answer is a digit string (an integer for arithmetic), so one parser and
one format check serve every family, and a digit-splitting tokenizer sees one token per digit.
The user's own problems come from a JSONL file (data_prep.user_tasks.JsonlTask, `name: jsonl`)
with a scorer of their choosing; everything below treats both alike.

Every problem belongs to the train or the test split by a hash of its prompt alone, never of a
seed or an option: changing a difficulty knob, a count or a seed never moves a problem across the
split, so no stage ever trains on a problem that eval scores.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator
from functools import cache
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

# completion_text, is_bare_answer, parse_answer: re-exported, callers import them from here.
from data_prep.task_base import (  # noqa: F401
    Key,
    TaskBase,
    completion_text,
    is_bare_answer,
    parse_answer,
)
from data_prep.user_tasks import JsonlTask
from pipeline.engine.errors import PipelineError

SPLITS = ("train", "test")
PROBLEMS_PER_DOCUMENT = 16
ENUMERATE_LIMIT = 200_000  # larger problem spaces are sampled instead of listed
# Bump when a family's problem space or text format changes (part of source fingerprints).
GENERATOR_VERSION = 3


class ArithmeticTask(TaskBase):
    """`What is a op b?` with operands in [min_operand, max_operand]; subtask: the operator."""

    FAMILY = "arithmetic"
    name: Literal["arithmetic"] = "arithmetic"
    min_operand: int = Field(0, ge=0, description="smallest operand")
    max_operand: int = Field(99, ge=0, description="largest operand")
    operators: list[Literal["+", "-", "*"]] = Field(
        ["+", "-", "*"], min_length=1, description="operators to draw from"
    )

    @model_validator(mode="after")
    def _check_range(self) -> ArithmeticTask:
        if self.max_operand < self.min_operand:
            raise ValueError(f"max_operand {self.max_operand} < min_operand {self.min_operand}")
        if len(set(self.operators)) != len(self.operators):
            raise ValueError(f"operators {self.operators} repeat an operator")
        return self

    def all_keys(self) -> Iterator[Key]:
        operands = range(self.min_operand, self.max_operand + 1)
        for op in self.operators:
            for a, b in itertools.product(operands, operands):
                yield (a, op, b)

    def size(self) -> int:
        return len(self.operators) * (self.max_operand - self.min_operand + 1) ** 2

    def sample_key(self, rng: random.Random) -> Key:
        lo, hi = self.min_operand, self.max_operand
        return (rng.randint(lo, hi), rng.choice(self.operators), rng.randint(lo, hi))

    def prompt(self, key: Key) -> str:
        a, op, b = key
        return f"What is {a} {op} {b}?"

    def answer(self, key: Key) -> str:
        a, op, b = key
        return str(a + b if op == "+" else a - b if op == "-" else a * b)

    def subtask(self, key: Key) -> str:
        return key[1]

    def partial_credit(self, got: str, want: str) -> float:
        return 1.0 / (1.0 + abs(int(got) - int(want)))

    def near_miss(self, key: Key, rng: random.Random) -> str:
        """Off by one or ten, or the last digit changed; never the right answer."""
        answer = int(self.answer(key))
        candidates = [answer + d for d in (-10, -1, 1, 10)] + [
            answer - answer % 10 + (answer + 3) % 10
        ]
        return str(rng.choice([c for c in candidates if c != answer]))


class DigitStringTask(TaskBase):
    """Base of tasks on a string of `min_length`..`max_length` digits; subtask: the length."""

    min_length: int = Field(3, ge=1, le=12, description="fewest digits in the input")
    max_length: int = Field(6, ge=1, le=12, description="most digits in the input")
    digits: str = Field("0123456789", min_length=2, description="digits the input is drawn from")

    VERB: ClassVar[str] = ""

    @model_validator(mode="after")
    def _check_lengths(self) -> DigitStringTask:
        if self.max_length < self.min_length:
            raise ValueError(f"max_length {self.max_length} < min_length {self.min_length}")
        if not self.digits.isdigit() or len(set(self.digits)) != len(self.digits):
            raise ValueError(f"digits {self.digits!r} must be distinct decimal digits")
        return self

    def all_keys(self) -> Iterator[Key]:
        for length in range(self.min_length, self.max_length + 1):
            for chars in itertools.product(self.digits, repeat=length):
                yield ("".join(chars),)

    def size(self) -> int:
        base = len(self.digits)
        return sum(base**n for n in range(self.min_length, self.max_length + 1))

    def sample_key(self, rng: random.Random) -> Key:
        # Lengths weighted by how many strings they have, so every string is equally likely.
        lengths = range(self.min_length, self.max_length + 1)
        length = rng.choices(lengths, weights=[len(self.digits) ** n for n in lengths])[0]
        return ("".join(rng.choice(self.digits) for _ in range(length)),)

    def prompt(self, key: Key) -> str:
        return f"{self.VERB} {key[0]}:"

    def subtask(self, key: Key) -> str:
        return f"length {len(key[0])}"

    def partial_credit(self, got: str, want: str) -> float:
        """Share of positions holding the right digit, over the longer of the two strings."""
        same = sum(g == w for g, w in zip(got, want, strict=False))
        return same / max(len(got), len(want))

    def near_miss(self, key: Key, rng: random.Random) -> str:
        """The answer with two different neighbouring digits swapped, or one digit changed."""
        answer = list(self.answer(key))
        swaps = [i for i in range(len(answer) - 1) if answer[i] != answer[i + 1]]
        if swaps:
            i = rng.choice(swaps)
            answer[i], answer[i + 1] = answer[i + 1], answer[i]
        else:
            i = rng.randrange(len(answer))
            answer[i] = rng.choice([d for d in self.digits if d != answer[i]])
        return "".join(answer)


class ReverseTask(DigitStringTask):
    """`Reverse 3815:` -> ` 5183`."""

    FAMILY = "reverse"
    VERB = "Reverse"
    name: Literal["reverse"] = "reverse"

    def answer(self, key: Key) -> str:
        return key[0][::-1]


class SortTask(DigitStringTask):
    """`Sort 3815:` -> ` 1358`."""

    FAMILY = "sort"
    VERB = "Sort"
    name: Literal["sort"] = "sort"

    def answer(self, key: Key) -> str:
        return "".join(sorted(key[0]))

    def near_miss(self, key: Key, rng: random.Random) -> str:
        """Half the time two neighbours swapped (unsorted), half the time sorted digits with one
        digit changed (sorted, but not these digits): a reward model has to check both."""
        if rng.random() < 0.5:
            return super().near_miss(key, rng)
        answer = list(self.answer(key))
        i = rng.randrange(len(answer))
        answer[i] = rng.choice([d for d in self.digits if d != answer[i]])
        return "".join(sorted(answer))


TASKS: dict[str, type[TaskBase]] = {
    t.FAMILY: t for t in (ArithmeticTask, ReverseTask, SortTask, JsonlTask)
}
TaskConfig = Annotated[
    ArithmeticTask | ReverseTask | SortTask | JsonlTask, Field(discriminator="name")
]


@cache
def _pool(task_json: str, signature_json: str, split: str) -> tuple[Key, ...]:
    """Every problem key of a split of an enumerable task (cached per task options and, for a
    task read from a file, per version of the file)."""
    task = _from_json(task_json)
    return tuple(key for key in task.all_keys() if task.split_of(key) == split)


def _split_pool(task: TaskBase, split: str) -> tuple[Key, ...]:
    return _pool(task.model_dump_json(), json.dumps(task.signature(), sort_keys=True), split)


def _from_json(task_json: str) -> TaskBase:
    from pydantic import TypeAdapter

    return TypeAdapter(TaskConfig).validate_json(task_json)


def problem_keys(task: TaskBase, split: str, num: int, seed: int) -> list[Key]:
    """`num` distinct problem keys of `split`, in an order fixed by `seed`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(seed)
    if task.size() <= ENUMERATE_LIMIT:
        pool = list(_split_pool(task, split))
        if num > len(pool):
            raise PipelineError(
                f"task {task.FAMILY}: the {split} split has {len(pool)} problems, cannot draw "
                f"{num}; ask for fewer or {task.GROW}"
            )
        rng.shuffle(pool)
        return pool[:num]
    keys: dict[Key, None] = {}
    while len(keys) < num:
        key = task.sample_key(rng)
        if key not in keys and task.split_of(key) == split:
            keys[key] = None
    return list(keys)


def task_problems(task: TaskBase, split: str, num: int, seed: int) -> list[dict[str, Any]]:
    """`num` distinct problems of `split` as dicts (see TaskBase.problem)."""
    return [task.problem(key) for key in problem_keys(task, split, num, seed)]


def split_size(task: TaskBase, split: str) -> int:
    """Problems in a split (estimated from the hash share for spaces too large to list)."""
    if task.size() <= ENUMERATE_LIMIT:
        return len(_split_pool(task, split))
    share = task.test_percent / 100
    return int(task.size() * (share if split == "test" else 1 - share))


def format_problem(problem: dict[str, Any]) -> str:
    """The pretraining text of one problem: prompt, then completion."""
    return f"{problem['prompt']}{problem['completion']}"


def task_documents(task: TaskBase, num_problems: int | None = None, seed: int = 0) -> Iterator[str]:
    """Train problems (all of them by default) shuffled by `seed`, 16 lines per document."""
    num = split_size(task, "train") if num_problems is None else num_problems
    problems = task_problems(task, "train", num, seed)
    for start in range(0, len(problems), PROBLEMS_PER_DOCUMENT):
        yield "\n".join(format_problem(p) for p in problems[start : start + PROBLEMS_PER_DOCUMENT])


def preference_pairs(task: TaskBase, split: str, num: int, seed: int) -> list[dict[str, Any]]:
    """`num` problems as {"prompt", "chosen", "rejected", "answer"}: right answer vs. a near miss."""
    rng = random.Random(seed)
    return [
        {
            "prompt": task.prompt(key),
            "chosen": f" {task.answer(key)}",
            "rejected": f" {task.near_miss(key, rng)}",
            "answer": task.answer(key),
        }
        for key in problem_keys(task, split, num, seed)
    ]


def score(
    task: TaskBase, completion: Any, answer: Any, problem: dict[str, Any] | None = None
) -> tuple[float, float]:
    """(exact, partial credit) of one completion against the right answer (by the task's scorer)."""
    return task.grade(completion, answer, problem)
