"""The task families made for reasoning: `addition` (n-digit operands, the classic scratchpad
task) and `countdown` (reach a target from a few numbers; any right expression counts)."""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import Field, model_validator

from data_prep import countdown
from data_prep.task_base import ENUMERATE_LIMIT, GeneratedTask, Key
from data_prep.worked import addition_steps

ADDITION_PROMPT = re.compile(r"Add (\d+) \+ (\d+):")
COUNTDOWN_PROMPT = re.compile(r"Make (\d+) from (\d+(?: \d+)*):")
EXPRESSION = re.compile(r"\s*([\d+\-*/() ]*[\d)])")
BARE_EXPRESSION = re.compile(r"\s*[\d+\-*/() ]*[\d)]\s*")
MAX_NUMBERS = 5  # the most a countdown problem gives (out-of-distribution ones included)


def operand_range(digits: int) -> range:
    """The operands with exactly `digits` digits (0 counts as one digit)."""
    return range(0 if digits == 1 else 10 ** (digits - 1), 10**digits)


class AdditionTask(GeneratedTask):
    """`Add 457 + 168:` -> ` 625`, both operands of one length in min_digits..max_digits;
    subtask: that length. Cot: column by column with carries."""

    FAMILY = "addition"
    BALANCE = True
    name: Literal["addition"] = "addition"
    min_digits: int = Field(1, ge=1, le=30, description="fewest digits of each operand")
    max_digits: int = Field(5, ge=1, le=30, description="most digits of each operand")
    ood_max_digits: int | None = Field(
        None, ge=2, le=40,
        description="out-of-distribution split: operands of max_digits+1 to this many digits; "
        "default max_digits + 2",
    )  # fmt: skip

    @model_validator(mode="after")
    def _check_digits(self) -> AdditionTask:
        if self.max_digits < self.min_digits:
            raise ValueError(
                f"max_digits {self.max_digits} < min_digits {self.min_digits}; raise max_digits "
                "or lower min_digits"
            )
        if self.ood_max_digits is not None and self.ood_max_digits <= self.max_digits:
            raise ValueError(
                f"ood_max_digits {self.ood_max_digits} must exceed max_digits {self.max_digits} "
                "(the out-of-distribution operands are longer); raise it or leave it out"
            )
        return self

    def _lengths(self) -> range:
        return range(self.min_digits, self.max_digits + 1)

    def all_keys(self) -> Iterator[Key]:
        for digits in self._lengths():
            yield from itertools.product(operand_range(digits), repeat=2)

    def size(self) -> int:
        return sum(len(operand_range(n)) ** 2 for n in self._lengths())

    def sample_key(self, rng: random.Random, even: bool = False) -> Key:
        # Lengths weighted by how many problems they have, so every problem is equally likely.
        lengths = self._lengths()
        weights = [1 if even else len(operand_range(n)) ** 2 for n in lengths]
        digits = rng.choices(lengths, weights=weights)[0]
        operands = operand_range(digits)
        return (rng.choice(operands), rng.choice(operands))

    def prompt(self, key: Key) -> str:
        return f"Add {key[0]} + {key[1]}:"

    def key_of(self, prompt: str) -> Key | None:
        match = ADDITION_PROMPT.search(prompt)
        return (int(match.group(1)), int(match.group(2))) if match else None

    def answer(self, key: Key) -> str:
        return str(key[0] + key[1])

    def steps(self, key: Key) -> str:
        return addition_steps(*key)

    def subtask(self, key: Key) -> str:
        return f"{len(str(key[0]))} digits"

    def partial_credit(self, got: str, want: str) -> float:
        """Share of right digits counted from the right (place values), over the longer."""
        same = sum(g == w for g, w in zip(reversed(got), reversed(want), strict=False))
        return same / max(len(got), len(want))

    def near_miss(self, key: Key, rng: random.Random) -> str:
        """The sum with its carries forgotten (column sums mod 10), or one digit changed."""
        a, b = (str(n).zfill(len(str(max(key)))) for n in key)
        no_carry = str(int("".join(str((int(x) + int(y)) % 10) for x, y in zip(a, b, strict=True))))
        answer = self.answer(key)
        if no_carry != answer and rng.random() < 0.5:
            return no_carry
        digits = list(answer)
        i = rng.randrange(len(digits))
        digits[i] = rng.choice([d for d in "123456789" if d != digits[i]] if i == 0 else
                               [d for d in "0123456789" if d != digits[i]])  # fmt: skip
        return "".join(digits)

    def ood_task(self) -> AdditionTask:
        """Operands of max_digits+1 to ood_max_digits digits."""
        top = self.ood_max_digits or self.max_digits + 2
        return self.model_copy(update={"min_digits": self.max_digits + 1, "max_digits": top})


class CountdownTask(GeneratedTask):
    """`Make 46 from 3 7 25 2:` -> ` (25-3)*2+2`: min_numbers..max_numbers numbers in
    1..max_number and a target in 1..max_target that some of them reach; any expression with
    + - * / (exact division) using each given number at most once that equals the target is
    right (checked by data_prep.countdown, never run). Subtask: how many numbers."""

    FAMILY = "countdown"
    BALANCE = True
    UNIQUE_STEPS = False  # many expressions reach a target; the reference is one of them
    name: Literal["countdown"] = "countdown"
    min_numbers: int = Field(3, ge=2, le=4, description="fewest numbers given")
    max_numbers: int = Field(4, ge=2, le=4, description="most numbers given")
    max_number: int = Field(25, ge=2, le=100, description="largest number given")
    max_target: int = Field(100, ge=1, le=1000, description="largest target")
    ood_max_numbers: int | None = Field(
        None, ge=3, le=MAX_NUMBERS,
        description="out-of-distribution split: max_numbers+1 to this many numbers; default "
        "max_numbers + 1",
    )  # fmt: skip

    @model_validator(mode="after")
    def _check_numbers(self) -> CountdownTask:
        if self.max_numbers < self.min_numbers:
            raise ValueError(
                f"max_numbers {self.max_numbers} < min_numbers {self.min_numbers}; raise "
                "max_numbers or lower min_numbers"
            )
        if self.ood_max_numbers is not None and self.ood_max_numbers <= self.max_numbers:
            raise ValueError(
                f"ood_max_numbers {self.ood_max_numbers} must exceed max_numbers "
                f"{self.max_numbers} (out-of-distribution problems give more numbers); raise it "
                "or leave it out"
            )
        return self

    def _counts(self) -> range:
        return range(self.min_numbers, self.max_numbers + 1)

    def _bound(self) -> int:
        """Problems if every target were reachable from every choice of numbers."""
        return sum(self.max_number**n for n in self._counts()) * self.max_target

    def all_keys(self) -> Iterator[Key]:
        for count in self._counts():
            for numbers in itertools.product(range(1, self.max_number + 1), repeat=count):
                for target in range(1, self.max_target + 1):
                    if self.in_space((numbers, target)):
                        yield (numbers, target)

    def size(self) -> int:
        """The exact count where the space is listed, else an upper bound (sampled spaces)."""
        bound = self._bound()
        return bound if bound > ENUMERATE_LIMIT else sum(1 for _ in self.all_keys())

    def sample_key(self, rng: random.Random, even: bool = False) -> Key:
        """Numbers and a target drawn uniformly from the bound (`in_space` keeps the reachable
        ones: uniform over the problems)."""
        counts = self._counts()
        weights = [1 if even else self.max_number**n for n in counts]
        count = rng.choices(counts, weights=weights)[0]
        numbers = tuple(rng.randint(1, self.max_number) for _ in range(count))
        return (numbers, rng.randint(1, self.max_target))

    def in_space(self, key: Key) -> bool:
        return countdown.reference(tuple(sorted(key[0])), key[1]) is not None

    def prompt(self, key: Key) -> str:
        numbers, target = key
        return f"Make {target} from {' '.join(map(str, numbers))}:"

    def key_of(self, prompt: str) -> Key | None:
        """The numbers and target of a prompt, when it is a countdown problem (at most
        MAX_NUMBERS numbers, a reachable target)."""
        match = COUNTDOWN_PROMPT.search(prompt)
        if match is None:
            return None
        numbers, target = tuple(int(n) for n in match.group(2).split()), int(match.group(1))
        key = (numbers, target)
        return key if len(numbers) <= MAX_NUMBERS and self.in_space(key) else None

    def _tree(self, key: Key) -> countdown.Tree:
        tree = countdown.reference(tuple(sorted(key[0])), key[1])
        if tree is None:
            raise ValueError(f"{key[0]} do not reach {key[1]}: no problem of this task")
        return tree

    def answer(self, key: Key) -> str:
        """A reference expression (one using the fewest numbers); any right one counts."""
        return countdown.render(self._tree(key))

    def steps(self, key: Key) -> str:
        return countdown.steps(self._tree(key))

    def subtask(self, key: Key) -> str:
        return f"{len(key[0])} numbers"

    def parse_text(self, text: str) -> str | None:
        """The expression a text starts with (numbers, operators, parentheses), or None."""
        match = EXPRESSION.match(text)
        return match.group(1).strip() if match else None

    def is_bare_text(self, text: str) -> bool:
        return BARE_EXPRESSION.fullmatch(text) is not None

    def grade(
        self, completion: Any, answer: Any, problem: dict[str, Any] | None = None
    ) -> tuple[float, float]:
        """(exact, partial): exact when the expression uses given numbers at most once each and
        equals the target; partial 1 / (1 + |value - target|) for a legal one. The numbers and
        target come from the problem's prompt, else from the reference answer (its numbers)."""
        got = self.parse(completion)
        prompt = (problem or {}).get("prompt")
        key = self.key_of(prompt) if isinstance(prompt, str) else None
        if key is None:
            tree = countdown.parse_expression(str(answer))
            value = countdown.evaluate(tree) if tree is not None else None
            if tree is None or value is None:
                return 0.0, 0.0
            key = (tuple(countdown.leaves(tree)), value)
        value = countdown.expression_value(got, key[0]) if got is not None else None
        if value is None:
            return 0.0, 0.0
        return float(value == key[1]), 1.0 / (1.0 + abs(value - key[1]))

    def partial_credit(self, got: str, want: str) -> float:
        return self.grade(got, want)[1]

    def near_miss(self, key: Key, rng: random.Random) -> str:
        """An expression of the given numbers that reaches a value near the target, not it."""
        reached = countdown.solutions(tuple(sorted(key[0])))
        target = key[1]
        near = [v for v in reached if v != target and abs(v - target) <= 10]
        value = rng.choice(near or [v for v in reached if v != target])
        return countdown.render(reached[value])

    def ood_task(self) -> CountdownTask:
        """Problems of max_numbers+1 to ood_max_numbers numbers."""
        top = self.ood_max_numbers or self.max_numbers + 1
        return self.model_copy(update={"min_numbers": self.max_numbers + 1, "max_numbers": top})
