"""Countdown's arithmetic: a checker for the expressions a model writes, and a solver that finds
which targets some numbers reach (for the task's problems and reference answers).

The checker never runs the text it reads: a tokenizer of its own (numbers, `+ - * /` and
parentheses, nothing else) and a recursive-descent parser build a tree of integers and operators,
whose leaves are checked against the given numbers before anything is computed. Division must be
exact (no remainder), as in the game; intermediate values may be negative.
"""

from __future__ import annotations

import re
from functools import lru_cache

# An expression: a number, or (operator, left, right).
Tree = int | tuple[str, "Tree", "Tree"]

TOKEN = re.compile(r"\s*(?:(0|[1-9]\d{0,5})|([-+*/()]))")
MAX_TOKENS = 64  # bounds the parser's recursion and the work per completion
PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
ATOM = 3  # a number binds tighter than any operator
VALUE_LIMIT = 100_000  # the solver drops larger intermediate values (the problem stays solvable)


def tokens(text: str) -> list[str] | None:
    """The tokens of an expression, or None when it holds anything else (or too many)."""
    found: list[str] = []
    position, end = 0, len(text.rstrip())
    while position < end:
        match = TOKEN.match(text, position)
        if match is None or len(found) == MAX_TOKENS:
            return None
        found.append(match.group(1) or match.group(2))
        position = match.end()
    return found


def parse_expression(text: str) -> Tree | None:
    """The tree of an expression over integers with + - * / and parentheses, or None."""
    found = tokens(text)
    if not found:
        return None
    parser = _Parser(found)
    try:
        tree = parser.sum()
    except ValueError:
        return None
    return tree if parser.position == len(found) else None


class _Parser:
    """Recursive descent: sum := product (('+'|'-') product)*; product := atom (('*'|'/')
    atom)*; atom := number | '(' sum ')'. Left-associative, as written arithmetic is."""

    def __init__(self, found: list[str]) -> None:
        self.found = found
        self.position = 0

    def _peek(self) -> str | None:
        return self.found[self.position] if self.position < len(self.found) else None

    def _binary(self, operators: str, operand: str) -> Tree:
        tree = getattr(self, operand)()
        while (op := self._peek()) is not None and op in operators:
            self.position += 1
            tree = (op, tree, getattr(self, operand)())
        return tree

    def sum(self) -> Tree:
        return self._binary("+-", "product")

    def product(self) -> Tree:
        return self._binary("*/", "atom")

    def atom(self) -> Tree:
        token = self._peek()
        if token is None:
            raise ValueError("the expression ends early")
        self.position += 1
        if token.isdigit():
            return int(token)
        if token != "(":
            raise ValueError(f"unexpected {token!r}")
        tree = self.sum()
        if self._peek() != ")":
            raise ValueError("unclosed parenthesis")
        self.position += 1
        return tree


def leaves(tree: Tree) -> list[int]:
    """The numbers an expression uses, in order."""
    if isinstance(tree, int):
        return [tree]
    return leaves(tree[1]) + leaves(tree[2])


def evaluate(tree: Tree) -> int | None:
    """The value of an expression, or None when it divides by zero or with a remainder."""
    if isinstance(tree, int):
        return tree
    op, left, right = tree
    a, b = evaluate(left), evaluate(right)
    if a is None or b is None:
        return None
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return a // b if b != 0 and a % b == 0 else None


def uses_given(tree: Tree, numbers: tuple[int, ...]) -> bool:
    """True when the expression uses only given numbers, each at most as often as given."""
    available = list(numbers)
    for number in leaves(tree):
        if number not in available:
            return False
        available.remove(number)
    return True


def expression_value(text: str, numbers: tuple[int, ...]) -> int | None:
    """The value of `text` when it is an expression over the given numbers (each used at most
    once) with exact divisions, else None."""
    tree = parse_expression(text)
    if tree is None or not uses_given(tree, numbers):
        return None
    return evaluate(tree)


def render(tree: Tree) -> str:
    """An expression's text with only the parentheses it needs: `(25-3)*2`."""
    if isinstance(tree, int):
        return str(tree)
    op, left, right = tree
    level = PRECEDENCE[op]
    left_text, right_text = render(left), render(right)
    if _level(left) < level:
        left_text = f"({left_text})"
    if _level(right) < level or (_level(right) == level and op in "-/"):
        right_text = f"({right_text})"
    return f"{left_text}{op}{right_text}"


def _level(tree: Tree) -> int:
    return ATOM if isinstance(tree, int) else PRECEDENCE[tree[0]]


def steps(tree: Tree) -> str:
    """The worked solution of an expression, one operation per step in the order computed:
    `25-3=22 22*2=44` for (25-3)*2."""
    if isinstance(tree, int):
        return str(tree)
    done: list[str] = []
    _steps(tree, done)
    return " ".join(done)


def _steps(tree: Tree, done: list[str]) -> int:
    if isinstance(tree, int):
        return tree
    op, left, right = tree
    a, b = _steps(left, done), _steps(right, done)
    value = evaluate((op, a, b))
    done.append(f"{a}{op}{b}={value}")
    return value  # type: ignore[return-value]  # the solver's trees divide exactly


@lru_cache(maxsize=16384)  # a problem's tree, kept from the draw that tested it to its answer
def reference(numbers: tuple[int, ...], target: int) -> Tree | None:
    """An expression of some of `numbers` (sorted) that reaches `target`, or None."""
    return solutions(numbers).get(target)


@lru_cache(maxsize=256)  # five numbers reach ~2000 values: ~150 kB each
def solutions(numbers: tuple[int, ...]) -> dict[int, Tree]:
    """Every value >= 0 some of `numbers` (each at most once) reach with + - * / through
    values >= 0 and exact divisions, with one expression for each: the first found using the
    fewest numbers (so reference answers are short)."""
    size = len(numbers)
    by_subset: dict[int, dict[int, Tree]] = {}
    reached: dict[int, Tree] = {}
    for subset in sorted(range(1, 1 << size), key=lambda s: (s.bit_count(), s)):
        if subset.bit_count() == 1:
            number = numbers[subset.bit_length() - 1]
            values: dict[int, Tree] = {number: number}
        else:
            values = {}
            part = (subset - 1) & subset
            while part:
                rest = subset ^ part
                if part < rest:  # each split of the subset once
                    _combine(by_subset[part], by_subset[rest], values)
                part = (part - 1) & subset
        by_subset[subset] = values
        for value, tree in values.items():
            reached.setdefault(value, tree)
    return reached


def _combine(lefts: dict[int, Tree], rights: dict[int, Tree], into: dict[int, Tree]) -> None:
    """Every value one operation makes of a left and a right value, into `into` (first kept;
    each tested before its tree is built, the solver's inner loop)."""
    for a, left in lefts.items():
        for b, right in rights.items():
            total, product = a + b, a * b
            if total not in into and total <= VALUE_LIMIT:
                into[total] = ("+", left, right)
            if product not in into and product <= VALUE_LIMIT:
                into[product] = ("*", left, right)
            if a >= b:
                if a - b not in into:
                    into[a - b] = ("-", left, right)
            elif b - a not in into:
                into[b - a] = ("-", right, left)
            if b and a % b == 0 and a // b not in into:
                into[a // b] = ("/", left, right)
            if a and b % a == 0 and b // a not in into:
                into[b // a] = ("/", right, left)
