"""Verifiable tasks: generated problems with exact answers, for pretraining text, SFT, RL and eval.

One registry of task families (arithmetic, reverse, sort here; addition and countdown in
data_prep.tasks_reasoning), each a typed config with its own difficulty knobs. Answers are digit
strings (an integer for arithmetic and addition; an expression for countdown, checked by its own
scorer), and a digit-splitting tokenizer sees one token per digit. Every generated family writes
its answers directly or after a worked solution (`format: cot`, `<think>steps</think> answer`).
The user's own problems come from a JSONL file (data_prep.user_tasks.JsonlTask, `name: jsonl`)
with a scorer of their choosing; everything below treats both alike.

Every problem belongs to the train or the test split by a hash of its prompt alone, never of a
seed or an option: changing a difficulty knob, a count or a seed never moves a problem across the
split, so no stage ever trains on a problem that eval scores. The out-of-distribution split
("ood") holds the test-split problems of a space beside the task's own (longer operands, more
numbers; data_prep.task_base.GeneratedTask.ood_task): outside the task's space, so never trained
on, and held out by hash too, so a task widened to reach them never trains on them either.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Callable, Iterator
from functools import cache
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

# completion_text, is_bare_answer, parse_answer: re-exported, callers import them from here.
from data_prep.task_base import (  # noqa: F401
    ENUMERATE_LIMIT,
    GeneratedTask,
    Key,
    TaskBase,
    completion_text,
    is_bare_answer,
    parse_answer,
)
from data_prep.tasks_reasoning import AdditionTask, CountdownTask
from data_prep.user_tasks import JsonlTask
from data_prep.worked import arithmetic_steps, counting_steps, reversing_steps
from pipeline.engine.errors import PipelineError

SPLITS = ("train", "test", "ood")
PROBLEMS_PER_DOCUMENT = 16
SAMPLE_TRIES = 100  # draws per problem (plus a floor) before a sampled split counts as too small
ARITHMETIC_PROMPT = re.compile(r"What is (\d+) ([-+*]) (\d+)\?")
# Bump when a family's problem space or text format changes (part of source fingerprints).
GENERATOR_VERSION = 3


class ArithmeticTask(GeneratedTask):
    """`What is a op b?` with operands in [min_operand, max_operand]; subtask: the operator.
    Cot: columns with carries or borrows, or partial products and their sum."""

    FAMILY = "arithmetic"
    name: Literal["arithmetic"] = "arithmetic"
    min_operand: int = Field(0, ge=0, description="smallest operand")
    max_operand: int = Field(99, ge=0, description="largest operand")
    operators: list[Literal["+", "-", "*"]] = Field(
        ["+", "-", "*"], min_length=1, description="operators to draw from"
    )
    ood_max_operand: int | None = Field(
        None, ge=1,
        description="out-of-distribution split: operands in max_operand+1..this; default one "
        "digit more (10 x max_operand + 9)",
    )  # fmt: skip

    @model_validator(mode="after")
    def _check_range(self) -> ArithmeticTask:
        if self.max_operand < self.min_operand:
            raise ValueError(
                f"max_operand {self.max_operand} < min_operand {self.min_operand}; raise "
                "max_operand or lower min_operand"
            )
        if len(set(self.operators)) != len(self.operators):
            raise ValueError(f"operators {self.operators} repeat an operator; list each once")
        if self.ood_max_operand is not None and self.ood_max_operand <= self.max_operand:
            raise ValueError(
                f"ood_max_operand {self.ood_max_operand} must exceed max_operand "
                f"{self.max_operand} (out-of-distribution operands are larger); raise it or "
                "leave it out"
            )
        return self

    def all_keys(self) -> Iterator[Key]:
        operands = range(self.min_operand, self.max_operand + 1)
        for op in self.operators:
            for a, b in itertools.product(operands, operands):
                yield (a, op, b)

    def size(self) -> int:
        return len(self.operators) * (self.max_operand - self.min_operand + 1) ** 2

    def sample_key(self, rng: random.Random, even: bool = False) -> Key:
        lo, hi = self.min_operand, self.max_operand
        return (rng.randint(lo, hi), rng.choice(self.operators), rng.randint(lo, hi))

    def prompt(self, key: Key) -> str:
        a, op, b = key
        return f"What is {a} {op} {b}?"

    def key_of(self, prompt: str) -> Key | None:
        match = ARITHMETIC_PROMPT.search(prompt)
        return (int(match.group(1)), match.group(2), int(match.group(3))) if match else None

    def answer(self, key: Key) -> str:
        a, op, b = key
        return str(a + b if op == "+" else a - b if op == "-" else a * b)

    def steps(self, key: Key) -> str:
        return arithmetic_steps(*key)

    def signature(self) -> dict[str, Any]:
        """The version of the worked steps, for fingerprints: 2 since `*` is long multiplication
        in one-digit steps (runs made with the one-step partial products rerun)."""
        return {"cot_steps": 2} if self.format == "cot" else {}

    def subtask(self, key: Key) -> str:
        return key[1]

    def ood_task(self) -> ArithmeticTask:
        """Both operands in max_operand+1..ood_max_operand."""
        top = self.ood_max_operand or 10 * self.max_operand + 9
        return self.model_copy(update={"min_operand": self.max_operand + 1, "max_operand": top})

    def partial_credit(self, got: str, want: str) -> float:
        return 1.0 / (1.0 + abs(int(got) - int(want)))

    def near_miss(self, key: Key, rng: random.Random) -> str:
        """Off by one or ten, or the last digit changed; never the right answer."""
        answer = int(self.answer(key))
        candidates = [answer + d for d in (-10, -1, 1, 10)] + [
            answer - answer % 10 + (answer + 3) % 10
        ]
        return str(rng.choice([c for c in candidates if c != answer]))


class DigitStringTask(GeneratedTask):
    """Base of tasks on a string of `min_length`..`max_length` digits; subtask: the length."""

    min_length: int = Field(3, ge=1, le=12, description="fewest digits in the input")
    max_length: int = Field(6, ge=1, le=12, description="most digits in the input")
    digits: str = Field("0123456789", min_length=2, description="digits the input is drawn from")
    ood_max_length: int | None = Field(
        None, ge=2, le=16,
        description="out-of-distribution split: inputs of max_length+1 to this many digits; "
        "default max_length + 2",
    )  # fmt: skip

    VERB: ClassVar[str] = ""

    @model_validator(mode="after")
    def _check_lengths(self) -> DigitStringTask:
        if self.max_length < self.min_length:
            raise ValueError(
                f"max_length {self.max_length} < min_length {self.min_length}; raise max_length "
                "or lower min_length"
            )
        if not self.digits.isdigit() or len(set(self.digits)) != len(self.digits):
            raise ValueError(
                f"digits {self.digits!r} must be distinct decimal digits; e.g. '0123456789'"
            )
        if self.ood_max_length is not None and self.ood_max_length <= self.max_length:
            raise ValueError(
                f"ood_max_length {self.ood_max_length} must exceed max_length {self.max_length} "
                "(out-of-distribution inputs are longer); raise it or leave it out"
            )
        return self

    def all_keys(self) -> Iterator[Key]:
        for length in range(self.min_length, self.max_length + 1):
            for chars in itertools.product(self.digits, repeat=length):
                yield ("".join(chars),)

    def size(self) -> int:
        base = len(self.digits)
        return sum(base**n for n in range(self.min_length, self.max_length + 1))

    def sample_key(self, rng: random.Random, even: bool = False) -> Key:
        # Lengths weighted by how many strings they have, so every string is equally likely.
        lengths = range(self.min_length, self.max_length + 1)
        weights = [1 if even else len(self.digits) ** n for n in lengths]
        length = rng.choices(lengths, weights=weights)[0]
        return ("".join(rng.choice(self.digits) for _ in range(length)),)

    def prompt(self, key: Key) -> str:
        return f"{self.VERB} {key[0]}:"

    def key_of(self, prompt: str) -> Key | None:
        match = re.search(rf"{self.VERB} (\d+):", prompt)
        return (match.group(1),) if match else None

    def subtask(self, key: Key) -> str:
        return f"length {len(key[0])}"

    def ood_task(self) -> DigitStringTask:
        """Inputs of max_length+1 to ood_max_length digits."""
        top = self.ood_max_length or self.max_length + 2
        return self.model_copy(update={"min_length": self.max_length + 1, "max_length": top})

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

    def steps(self, key: Key) -> str:
        return reversing_steps(key[0])


class SortTask(DigitStringTask):
    """`Sort 3815:` -> ` 1358`."""

    FAMILY = "sort"
    VERB = "Sort"
    name: Literal["sort"] = "sort"

    def answer(self, key: Key) -> str:
        return "".join(sorted(key[0]))

    def steps(self, key: Key) -> str:
        return counting_steps(key[0], self.digits)

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
    t.FAMILY: t
    for t in (ArithmeticTask, ReverseTask, SortTask, AdditionTask, CountdownTask, JsonlTask)
}
TaskConfig = Annotated[
    ArithmeticTask | ReverseTask | SortTask | AdditionTask | CountdownTask | JsonlTask,
    Field(discriminator="name"),
]


def split_space(task: TaskBase, split: str) -> tuple[TaskBase, str]:
    """The space a split's problems come from and the hash split they belong to there: the
    task's own, or for "ood" the test split of its out-of-distribution space."""
    return (task.ood_task(), "test") if split == "ood" else (task, split)


@cache
def _pool(task_json: str, signature_json: str, split: str) -> tuple[Key, ...]:
    """Every problem key of a split of an enumerable task (cached per task options and, for a
    task read from a file, per version of the file)."""
    task = _from_json(task_json)
    space, hashed = split_space(task, split)
    return tuple(key for key in space.all_keys() if task.split_of(key) == hashed)


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
    space, hashed = split_space(task, split)
    # Even over subtasks (training rows with `balance`, held-out ones with `held_out: even`), as
    # far as each subtask's distinct problems allow (the small ones run out, the rest fill up).
    even = task.balanced_rows() if split == "train" else task.even_held_out()
    if space.size() <= ENUMERATE_LIMIT:
        pool = list(_split_pool(task, split))
        if num > len(pool):
            raise PipelineError(
                f"task {task.FAMILY}: the {split} split has {len(pool)} problems, cannot draw "
                f"{num}; ask for fewer or {task.GROW}"
            )
        rng.shuffle(pool)
        return (round_robin(pool, space.subtask) if even else pool)[:num]
    keys: dict[Key, None] = {}
    for _ in range(SAMPLE_TRIES * num + ENUMERATE_LIMIT):
        if len(keys) == num:
            return list(keys)
        key = space.sample_key(rng, even)
        if key not in keys and task.split_of(key) == hashed and space.in_space(key):
            keys[key] = None
    if len(keys) == num:
        return list(keys)
    raise PipelineError(
        f"task {task.FAMILY}: found only {len(keys)} distinct problems of the {split} split in "
        f"{SAMPLE_TRIES * num + ENUMERATE_LIMIT} draws, cannot draw {num}; ask for fewer or "
        f"{task.GROW}"
    )


def round_robin(keys: list[Key], subtask: Callable[[Key], str]) -> list[Key]:
    """`keys` reordered to take one of each subtask in turn (each subtask's keys in their order),
    so any prefix is as even over subtasks as their sizes allow."""
    groups: dict[str, list[Key]] = {}
    for key in keys:
        groups.setdefault(subtask(key), []).append(key)
    turns = itertools.zip_longest(*groups.values())
    return [key for turn in turns for key in turn if key is not None]


def task_problems(task: TaskBase, split: str, num: int, seed: int) -> list[dict[str, Any]]:
    """`num` distinct problems of `split` as dicts (see TaskBase.problem)."""
    return [task.problem(key) for key in problem_keys(task, split, num, seed)]


def split_size(task: TaskBase, split: str) -> int:
    """Problems in a split (estimated from the hash share for spaces too large to list)."""
    space, hashed = split_space(task, split)
    if space.size() <= ENUMERATE_LIMIT:
        return len(_split_pool(task, split))
    share = task.test_percent / 100
    return int(space.size() * (share if hashed == "test" else 1 - share))


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
    """`num` problems as {"prompt", "chosen", "rejected", "answer"}: right answer vs. a near miss
    (for a cot task both after the problem's worked steps: the pair teaches the answer to follow
    from them)."""
    rng = random.Random(seed)
    return [
        {
            "prompt": task.prompt(key),
            "chosen": task.completion(key, task.answer(key)),
            "rejected": task.completion(key, task.near_miss(key, rng)),
            "answer": task.answer(key),
        }
        for key in problem_keys(task, split, num, seed)
    ]


def score(
    task: TaskBase, completion: Any, answer: Any, problem: dict[str, Any] | None = None
) -> tuple[float, float]:
    """(exact, partial credit) of one completion against the right answer (by the task's scorer)."""
    return task.grade(completion, answer, problem)
