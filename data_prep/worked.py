"""Worked solutions of the generated tasks, the steps a `format: cot` completion thinks through:
each step is one small operation a small model can learn (one column, one digit, one count), as
in the scratchpads of Nye et al. 2021 ("Show Your Work").
"""

from __future__ import annotations


def addition_steps(a: int, b: int) -> str:
    """Column by column from the right, each `x+y+carry=sum`: `7+8+0=15 5+6+1=12 4+0+1=5` for
    457 + 68 = 525 (the answer's digits are the sums' last digits, the final carry first)."""
    right_a, right_b = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for column in range(max(len(right_a), len(right_b))):
        x = int(right_a[column]) if column < len(right_a) else 0
        y = int(right_b[column]) if column < len(right_b) else 0
        total = x + y + carry
        steps.append(f"{x}+{y}+{carry}={total}")
        carry = total // 10
    return " ".join(steps)


def subtraction_steps(a: int, b: int) -> str:
    """Column by column from the right with borrows, each `x-y-borrow=d` (and `+10=d'` when d
    is negative, which borrows from the next column); `-(b-a)` first when a < b."""
    swapped = a < b
    big, small = (b, a) if swapped else (a, b)
    right_big, right_small = str(big)[::-1], str(small)[::-1]
    steps, borrow = [f"-({big}-{small})"] if swapped else [], 0
    for column in range(len(right_big)):
        x = int(right_big[column])
        y = int(right_small[column]) if column < len(right_small) else 0
        digit = x - y - borrow
        steps.append(f"{x}-{y}-{borrow}={digit}" + (f"+10={digit + 10}" if digit < 0 else ""))
        borrow = int(digit < 0)
    return " ".join(steps)


def digit_product_steps(a: int, d: int) -> str:
    """a times one digit d, digit by digit from the right, each `x*d+carry=v`: `7*4+0=28 2*4+2=10`
    for 27 * 4 = 108 (the product's digits are the steps' last digits, the final carry first)."""
    steps, carry = [], 0
    for x in map(int, reversed(str(a))):
        value = x * d + carry
        steps.append(f"{x}*{d}+{carry}={value}")
        carry = value // 10
    return " ".join(steps)


def multiplication_steps(a: int, b: int) -> str:
    """Long multiplication in one-digit steps: for each digit of b from the right, a times it
    digit by digit and the partial product shifted into place (`=810`); then each partial added
    to the running sum column by column (addition's steps) with the sum written out (`=918`).
    27 * 34: `7*4+0=28 2*4+2=10 =108 7*3+0=21 2*3+2=8 =810 8+0+0=8 0+1+0=1 1+8+0=9 =918`."""
    steps, total = [], None
    for power, d in enumerate(map(int, reversed(str(b)))):
        partial = a * d * 10**power
        steps += [digit_product_steps(a, d), f"={partial}"]
        if total is not None:
            steps += [addition_steps(total, partial), f"={total + partial}"]
        total = partial if total is None else total + partial
    return " ".join(steps)


def arithmetic_steps(a: int, op: str, b: int) -> str:
    """The worked solution of `a op b` for op in + - *."""
    if op == "+":
        return addition_steps(a, b)
    if op == "-":
        return subtraction_steps(a, b)
    return multiplication_steps(a, b)


def counting_steps(text: str, digits: str) -> str:
    """Sorting by counting: how often each digit of the alphabet occurs, in order (`0:0 1:1 ...`);
    the answer writes each digit that many times."""
    return " ".join(f"{d}:{text.count(d)}" for d in sorted(digits))


def reversing_steps(text: str) -> str:
    """Reversing digit by digit from the last position: `4:5 3:1 2:8 1:3` for 3815 (position,
    then the digit there)."""
    return " ".join(f"{position}:{text[position - 1]}" for position in range(len(text), 0, -1))
