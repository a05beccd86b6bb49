"""Tasks with worked solutions (`format: cot`), the reasoning families (addition, countdown), the
out-of-distribution split and the rewards that read `<think>steps</think> answer` (no training)."""

from __future__ import annotations

import builtins
import hashlib
import itertools
import json
import random
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from data_prep import countdown
from data_prep.tasks import (
    AdditionTask,
    ArithmeticTask,
    CountdownTask,
    GeneratedTask,
    ReverseTask,
    SortTask,
    TaskConfig,
    preference_pairs,
    problem_keys,
    split_size,
    task_documents,
    task_problems,
)
from data_prep.user_tasks import JsonlTask
from pipeline.engine.errors import PipelineError
from pipeline.stages.rewards import NAMES, reward_functions

COT = [
    ArithmeticTask(format="cot"),
    SortTask(format="cot"),
    ReverseTask(format="cot"),
    AdditionTask(format="cot"),
    CountdownTask(format="cot"),
]
SMALL = [  # enumerated spaces (listed, not sampled), some with an enumerated OOD space too
    AdditionTask(min_digits=1, max_digits=2, format="cot"),
    CountdownTask(min_numbers=2, max_numbers=2, max_number=12, max_target=40, format="cot"),
    ReverseTask(min_length=2, max_length=4, digits="0123", format="cot"),
    ArithmeticTask(max_operand=30, format="cot"),
]
ADD = "Add 457 + 168:"
RIGHT = " <think>7+8+0=15 5+6+1=12 4+1+1=6</think> 625"


def _rewards(task: GeneratedTask, completions: list[Any], prompt: str, answer: str) -> list[list]:
    functions = reward_functions(["exact", "partial", "format", "overlong"], task, "stages.rlhf")
    prompts, answers = [prompt] * len(completions), [answer] * len(completions)
    return [f(prompts, completions, answer=answers) for f in functions]


def test_cot_rewards_read_the_answer_after_think_only() -> None:
    cot = AdditionTask(format="cot")
    assert cot.problem((457, 168))["completion"] == RIGHT
    cases = {  # completion: (exact, format)
        RIGHT: (1, 1),
        " <think>made up</think>\n625\n": (1, 1),
        " 625": (0, 0),  # missing tags: a direct answer is no cot answer
        "7+8+0=15</think> 625": (1, 0),  # no opening tag: the answer counts, the format not
        " <think>7+8+0=15 625": (0, 0),  # never closed
        " <think>625</think>": (0, 0),  # the answer inside the think block only
        " <think>625</think> ": (0, 0),
        " <think>x</think> 625 626": (1, 0),  # two answers: the first is read, format refused
        " <think>a</think> 624 <think>b</think> 625": (0, 0),  # two think blocks
        " <think>a</think> 625 because 7+8=15": (1, 0),  # text after the answer
        " <think></think> 625": (1, 0),  # no steps
        " <think><think>x</think> 625": (1, 0),  # a stray tag inside
        " <think>x</think> 626": (0, 1),
        "": (0, 0),
        None: (0, 0),
    }
    chat = [{"role": "assistant", "content": RIGHT}]
    exact, partial, form, _ = _rewards(cot, [*cases, chat], ADD, "625")
    assert list(zip(exact, form, strict=True)) == [*cases.values(), (1, 1)]
    assert partial[list(cases).index(" <think>x</think> 626")] == pytest.approx(2 / 3)
    # The direct task is unchanged: a think block is no answer there.
    exact, _, form, _ = _rewards(AdditionTask(), [" 625", RIGHT], ADD, "625")
    assert exact == [1, 0] and form == [1, 0]


def test_overlong_penalty_is_zero_up_to_the_reference_then_falls_to_minus_one() -> None:
    cot = AdditionTask(format="cot")
    budget = len(RIGHT)
    completions = [RIGHT, RIGHT + "x" * (budget // 2), RIGHT + "x" * (3 * budget), " 625", None]
    *_, overlong = _rewards(cot, completions, ADD, "625")
    assert overlong[0] == 0 and overlong[3] == 0 and overlong[4] == 0
    assert overlong[1] == pytest.approx(-(budget // 2) / budget)
    assert overlong[2] == -1.0
    # Direct tasks (and prompts of no known problem) measure against ` answer`.
    *_, direct = _rewards(SortTask(), [" 1358", " 1358 1358", " 13581358"], "Sort 3815:", "1358")
    assert direct == [0.0, -1.0, -0.8]
    assert "overlong" in NAMES


def test_countdown_checker_accepts_any_right_expression_and_runs_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[str] = []
    task = CountdownTask()
    prompt, numbers = "Make 46 from 3 7 25 2:", (3, 7, 25, 2)
    assert task.key_of(prompt) == (numbers, 46)
    marker = tmp_path / "ran"
    completions = {
        "25*2-7+3": 1, " (25*2)+3-7": 1, "3+25*2-7\n": 1, "2*(25-3)+2": 0,  # 2 used twice
        "25*2-4": 0,  # 4 not given
        "7*7-3": 0, "25+25-7+3": 0, "(7+3)/2*25-79": 0, "7/2*25": 0,  # inexact division
        "2**5+7+7": 0, "-3+49": 0, "25*2-7+3)": 0,  # unbalanced: no expression
        f"__import__('os').system('touch {marker}')": 0,
        "[x for x in ().__class__.__bases__]": 0, "": 0,
    }  # fmt: skip
    with monkeypatch.context() as patched:  # any way of running code is recorded, not run
        for name in ("eval", "exec", "compile", "__import__"):
            patched.setattr(builtins, name, lambda *args, _name=name, **_: ran.append(_name))
        got = [task.grade(c, "25*2-7+3", {"prompt": prompt})[0] for c in completions]
    assert got == list(completions.values())
    assert not ran and not marker.exists()
    assert countdown.expression_value("(25-3)*2", numbers) == 44
    assert countdown.expression_value("(25-3)*2", (25, 3)) is None
    assert countdown.parse_expression("1" + "+1" * 40) is None  # too long: refused, not parsed
    # Without the prompt, the numbers of the reference answer stand in for the given ones.
    assert task.grade(" 3+25*2-7", "25*2-7+3") == (1.0, 1.0)
    assert task.grade(" 3+25*2-7+0", "25*2-7+3") == (0.0, 0.0)


def test_steps_reward_credits_the_worked_steps_up_to_the_first_wrong_one() -> None:
    """`steps`: the share of the reference's steps written in order before the first wrong one,
    inside the one think block; what follows a wrong step never counts. Refused for countdown
    (many right expressions) and for direct answers."""
    from pipeline.stages.rlhf import Config as RlhfConfig

    (steps,) = reward_functions(["steps"], AdditionTask(format="cot"), "stages.rlhf")
    cases = {
        RIGHT: 1.0,
        " <think>7+8+0=15 5+6+1=12 4+1+1=7</think> 626": 2 / 3,
        " <think>7+8+0=15 5+6+1=13 4+1+1=6</think> 625": 1 / 3,  # the later step right again
        " <think>7+8+0=15 5+6+1=12 4+1+1=6 6+0+0=6</think> 6625": 1.0,  # the answer: exact's
        " <think>7+8+0=15 5+6+1=12": 0.0,  # never closed
        "7+8+0=15</think> 625": 0.0,  # no opening tag
        " <think>7+8+0=15</think> <think>5+6+1=12</think>": 0.0,  # two blocks
        " 625": 0.0,
        "": 0.0,
        None: 0.0,
    }
    completions = [*cases, [{"role": "assistant", "content": RIGHT}]]
    scores = steps([ADD] * len(completions), completions, answer=["625"] * len(completions))
    assert scores == pytest.approx([*cases.values(), 1.0])
    assert steps(["Sort 321:"], [RIGHT]) == [0.0]  # a prompt of another family
    for task, message in (
        ({"name": "countdown", "format": "cot"}, "not countdown; use exact or partial"),
        ({"name": "arithmetic"}, "set the task's format: cot"),
    ):
        with pytest.raises(ValidationError, match=message):
            RlhfConfig(kind="rlhf", task=task, rewards=["exact", "steps"])


def test_countdown_rewards_in_cot_format() -> None:
    task = CountdownTask(format="cot")
    prompt = "Make 46 from 3 7 25 2:"
    completions = [" <think>25*2=50 50-7=43 43+3=46</think> 25*2-7+3",
                   " <think>try</think> 50-7+3", " <think>2*(25-3)+2</think>",
                   " <think>x</think> 25*2-7", " 25*2-7+3"]  # fmt: skip
    exact, partial, form, _ = _rewards(task, completions, prompt, "25*2-7+3")
    assert exact == [1, 0, 0, 0, 0] and form == [1, 1, 0, 1, 0]
    assert partial == [1, 0, 0, pytest.approx(1 / 4), 0]  # 50 is no given number; 43 is 3 off


def _digit(text: str, index: int) -> int:
    return int(text[::-1][index]) if index < len(text) else 0


def _check_columns(a: int, b: int, steps: list[str]) -> int:
    """The sum that addition's column steps write, each step checked."""
    carry, digits = 0, []
    assert len(steps) == max(len(str(a)), len(str(b)))
    for index, step in enumerate(steps):
        x, y, c, total = map(int, re.fullmatch(r"(\d)\+(\d)\+([01])=(\d+)", step).groups())
        assert (x, y, c, total) == (_digit(str(a), index), _digit(str(b), index), carry, x + y + c)
        digits.append(total % 10)
        carry = total // 10
    return int(str(carry) + "".join(map(str, reversed(digits))))


def _check_subtraction(a: int, b: int, steps: list[str]) -> int:
    swapped = steps[0].startswith("-(")
    if swapped:
        assert steps.pop(0) == f"-({b}-{a})"
        a, b = b, a
    borrow, digits = 0, []
    for index, step in enumerate(steps):
        match = re.fullmatch(r"(\d)-(\d)-([01])=(-?\d+)(?:\+10=(\d))?", step)
        x, y, owed, d = map(int, match.groups()[:4])
        assert (x, y, owed) == (_digit(str(a), index), _digit(str(b), index), borrow)
        assert d == x - y - owed
        assert (match.group(5) is not None) == (d < 0)
        digits.append(d + 10 if d < 0 else d)
        borrow = int(d < 0)
    assert borrow == 0 and len(steps) == len(str(a))
    value = int("".join(map(str, reversed(digits))))
    return -value if swapped else value


def _check_digit_product(a: int, d: int, steps: list[str]) -> int:
    """The product of a and one digit d that `x*d+carry=v` steps write, each step checked."""
    carry, digits = 0, []
    assert len(steps) == len(str(a))
    for index, step in enumerate(steps):
        x, y, c, value = map(int, re.fullmatch(r"(\d)\*(\d)\+(\d)=(\d+)", step).groups())
        assert (x, y, c, value) == (_digit(str(a), index), d, carry, x * d + c)
        digits.append(value % 10)
        carry = value // 10
    return int(str(carry) + "".join(map(str, reversed(digits))))


def _check_product(a: int, b: int, steps: list[str]) -> int:
    """Long multiplication: per digit of b, its digit products and the shifted partial
    (`=810`), then the column sum into the running total (`=918`), each step checked."""
    total, at = None, 0
    for power, d in enumerate(map(int, reversed(str(b)))):
        product = _check_digit_product(a, d, steps[at : at + len(str(a))])
        at += len(str(a))
        partial = product * 10**power
        assert steps[at] == f"={partial}"
        at += 1
        if total is None:
            total = partial
            continue
        width = max(len(str(total)), len(str(partial)))
        total = _check_columns(total, partial, steps[at : at + width])
        assert steps[at + width] == f"={total}"
        at += width + 1
    assert at == len(steps)
    return total


def _worked_answer(task: GeneratedTask, key: Any, steps: list[str]) -> str:
    """The answer the worked steps reach, each step checked on its own."""
    if isinstance(task, AdditionTask):
        return str(_check_columns(*key, steps))
    if isinstance(task, ArithmeticTask):
        a, op, b = key
        check = {"+": _check_columns, "-": _check_subtraction, "*": _check_product}[op]
        return str(check(a, b, steps))
    if isinstance(task, SortTask):
        counts = [step.split(":") for step in steps]
        assert [d for d, _ in counts] == sorted(task.digits)
        assert all(int(c) == key[0].count(d) for d, c in counts)
        return "".join(d * int(c) for d, c in counts)
    if isinstance(task, ReverseTask):
        places = [step.split(":") for step in steps]
        assert [int(p) for p, _ in places] == list(range(len(key[0]), 0, -1))
        assert all(key[0][int(p) - 1] == d for p, d in places)
        return "".join(d for _, d in places)
    numbers, target = key
    value = int(steps[-1].rpartition("=")[2])
    for step in steps if "=" in steps[0] else []:
        a, op, b, result = re.fullmatch(r"(\d+)([-+*/])(\d+)=(\d+)", step).groups()
        assert countdown.evaluate((op, int(a), int(b))) == int(result)
    assert value == target
    return task.answer(key)


@pytest.mark.parametrize("task", COT, ids=lambda t: t.FAMILY)
def test_cot_worked_solutions_are_right_and_end_in_the_direct_answer(task: GeneratedTask) -> None:
    direct = task.model_copy(update={"format": "direct"})
    for seed, split in itertools.product(range(8), ("train", "test", "ood")):
        keys = problem_keys(task, split, 25, seed)
        assert keys == problem_keys(direct, split, 25, seed)
        for key in keys:
            problem, plain = task.problem(key), direct.problem(key)
            assert problem["prompt"] == plain["prompt"] and problem["answer"] == plain["answer"]
            assert plain["completion"] == f" {plain['answer']}"
            steps = re.fullmatch(r" <think>(.+)</think> (\S+)", problem["completion"])
            assert steps.group(2) == plain["answer"] == task.parse(problem["completion"])
            assert _worked_answer(task, key, steps.group(1).split(" ")) == plain["answer"]
            assert task.grade(problem["completion"], plain["answer"], problem) == (1.0, 1.0)
            assert task.is_bare(problem["completion"]) and direct.is_bare(plain["completion"])
            assert task.key_of(problem["prompt"]) == key
            if isinstance(task, CountdownTask):
                assert countdown.expression_value(plain["answer"], key[0]) == key[1]


@pytest.mark.parametrize("task", COT + SMALL, ids=lambda t: f"{t.FAMILY}-{t.size()}")
def test_held_out_and_ood_problems_never_in_training_rows(task: GeneratedTask) -> None:
    test = {p["prompt"] for p in task_problems(task, "test", min(300, split_size(task, "test")), 1)}
    ood_problems = task_problems(task, "ood", min(150, split_size(task, "ood")), 1)
    ood = {p["prompt"] for p in ood_problems}
    assert len(ood) == len(ood_problems) > 20 and not test & ood
    train_subtasks = set()
    for seed in (0, 3):
        train = task_problems(task, "train", min(1500, split_size(task, "train")), seed)
        assert not (test | ood) & {p["prompt"] for p in train}
        train_subtasks |= {p["subtask"] for p in train}
        assert not (test | ood) & {p["prompt"] for p in preference_pairs(task, "train", 100, seed)}
    if not isinstance(task, ArithmeticTask):  # arithmetic's subtasks are its operators
        assert not train_subtasks & {p["subtask"] for p in ood_problems}  # longer, more numbers
    assert all(_beyond(task, key) for key in problem_keys(task, "ood", 100, 0))
    num_train = min(500, split_size(task, "train"))
    text = "\n".join(itertools.islice(task_documents(task, num_train, seed=2), 50))
    assert not [p for p in test | ood if p + " " in text]
    # A task widened to reach the out-of-distribution space still never trains on its problems.
    wider = task.ood_task().model_copy(update={k: getattr(task, k) for k in _lower_fields(task)})
    if wider.size() <= 200_000:
        assert not ood & {
            p["prompt"] for p in task_problems(wider, "train", split_size(wider, "train"), 0)
        }


def _beyond(task: GeneratedTask, key: Any) -> bool:
    """Whether a problem lies past every problem of the task's own space."""
    if isinstance(task, ArithmeticTask):
        return min(key[0], key[2]) > task.max_operand
    if isinstance(task, AdditionTask):
        return len(str(key[0])) == len(str(key[1])) > task.max_digits
    if isinstance(task, CountdownTask):
        return len(key[0]) > task.max_numbers
    return len(key[0]) > task.max_length


def _lower_fields(task: GeneratedTask) -> list[str]:
    return [
        f for f in ("min_digits", "min_numbers", "min_length", "min_operand") if hasattr(task, f)
    ]


def test_direct_format_is_byte_identical_to_before() -> None:
    """The problems and pairs of the direct format hash as they did before `format` existed
    (digest recorded from the code of commit b2920fa)."""
    tasks = [ArithmeticTask(), ArithmeticTask(min_operand=3, max_operand=30, operators=["+", "-"]),
             ReverseTask(), ReverseTask(min_length=2, max_length=4, digits="0123"),
             SortTask(min_length=5, max_length=9)]  # fmt: skip
    digest = hashlib.sha256()
    for task, split in itertools.product(tasks, ("train", "test")):
        num = min(300, split_size(task, split))
        digest.update(json.dumps(task_problems(task, split, num, 3)).encode())
        digest.update(json.dumps(preference_pairs(task, split, num, 4)).encode())
    assert digest.hexdigest() == "9906f158abe178adee30079348f734273595e65ff28d50b98920865918406c17"
    assert SortTask().problem(("3815",))["completion"] == " 1358"


def test_arithmetic_cot_steps_version_is_in_the_fingerprint_and_direct_keeps_its_own() -> None:
    """`*`'s worked steps changed (long multiplication), so an arithmetic cot stage's data
    signature (hashed into its fingerprint) changes with them; direct arithmetic's and the other
    families' stay empty, as they were."""
    from data_prep.task_base import task_file_signature

    assert task_file_signature(ArithmeticTask(format="cot")) != {}
    for task in (ArithmeticTask(), AdditionTask(format="cot"), SortTask(format="cot")):
        assert task_file_signature(task) == {}


def test_balanced_training_rows_are_even_over_lengths_and_held_out_stays_uniform() -> None:
    """Addition of 1..5 digits: uniform draws are 99% five-digit problems; balanced training rows
    give each length a fifth, except where a length has fewer distinct problems (1 digit: 90
    train problems), which then appears whole. The test split is drawn as before."""
    from collections import Counter

    balanced, uniform = (
        AdditionTask(min_digits=1, max_digits=5),
        AdditionTask(min_digits=1, max_digits=5, balance=False),
    )
    rows = Counter(p["subtask"] for p in task_problems(balanced, "train", 5000, 0))
    assert rows["1 digits"] == split_size(balanced.model_copy(update={"max_digits": 1}), "train")
    assert all(900 <= rows[f"{n} digits"] <= 1500 for n in (2, 3, 4, 5)), rows
    assert (
        Counter(p["subtask"] for p in task_problems(uniform, "train", 5000, 0))["5 digits"] > 4800
    )
    for split in ("test", "ood"):
        assert task_problems(balanced, split, 300, 1) == task_problems(uniform, split, 300, 1)
    assert "balance" not in balanced.model_dump()  # the default stays out of fingerprints
    assert not SortTask().balanced_rows() and SortTask(balance=True).balanced_rows()


def test_held_out_even_draws_each_subtask_alike_and_leaves_training_rows() -> None:
    """Reverse of 4..6 digits: a uniform test draw is 90% six-digit strings; `held_out: even`
    gives each length a third, of the test split still (and the ood lengths a half each). Where
    the space is listed (sort of 2..4 digits), the two-digit strings run out and the rest share
    what is left evenly. Training rows are those of the uniform task."""
    from collections import Counter

    def lengths(task: Any, split: str, num: int) -> Counter[str]:
        return Counter(p["subtask"] for p in task_problems(task, split, num, 0))

    even = ReverseTask(min_length=4, max_length=6, held_out="even")
    uniform = even.model_copy(update={"held_out": "uniform"})
    assert lengths(uniform, "test", 999)["length 6"] > 850
    for split, subtasks in (("test", (4, 5, 6)), ("ood", (7, 8))):
        counts = lengths(even, split, 999)  # each length equally likely: 999/3 +- 3 sd (15)
        assert sorted(counts) == [f"length {n}" for n in subtasks], counts
        assert all(abs(n - 999 / len(subtasks)) < 45 for n in counts.values()), counts
    drawn = task_problems(even, "test", 999, 0)
    assert all(even.split_of(even.key_of(p["prompt"])) == "test" for p in drawn)
    assert task_problems(even, "train", 300, 0) == task_problems(uniform, "train", 300, 0)
    listed = SortTask(min_length=2, max_length=4, held_out="even")
    twos = split_size(listed.model_copy(update={"max_length": 2}), "test")
    counts = lengths(listed, "test", 150)
    assert counts["length 2"] == twos < 30 and abs(counts["length 3"] - counts["length 4"]) <= 1
    assert lengths(SortTask(min_length=2, max_length=4), "test", 150)["length 4"] > 120
    assert "held_out" not in uniform.model_dump()  # the default stays out of fingerprints


def test_malformed_output_scores_zero_and_never_raises() -> None:
    rng = random.Random(0)
    pieces = ["<think>", "</think>", "625", "12", " ", "\n", "+", "-", "*", "/", "(", ")", "x", "é"]
    completions: list[Any] = [
        "".join(rng.choices(pieces, k=rng.randint(0, 12))) for _ in range(300)
    ]
    completions += [None, 5, [], [{}], [{"content": None}], {"content": "625"}, b"625"]
    for task in COT + [t.model_copy(update={"format": "direct"}) for t in COT]:
        key = problem_keys(task, "train", 1, 0)[0]
        scores = _rewards(task, completions, task.prompt(key), task.answer(key))
        for name, values in zip(("exact", "partial", "format", "overlong"), scores, strict=True):
            assert len(values) == len(completions)
            low = -1.0 if name == "overlong" else 0.0
            assert all(low <= v <= 1.0 for v in values), name
            assert all(v == 0 for v in values[-7:] if name != "overlong"), name


@pytest.mark.parametrize(
    "options,message",
    [
        ({"name": "addition", "min_digits": 4, "max_digits": 3}, "raise max_digits or lower min"),
        ({"name": "addition", "ood_max_digits": 5}, "ood_max_digits 5 must exceed max_digits 5"),
        ({"name": "countdown", "min_numbers": 4, "max_numbers": 3}, "raise max_numbers"),
        ({"name": "countdown", "ood_max_numbers": 4}, "ood_max_numbers 4 must exceed"),
        ({"name": "sort", "ood_max_length": 6}, "ood_max_length 6 must exceed max_length 6"),
        ({"name": "arithmetic", "ood_max_operand": 50}, "ood_max_operand 50 must exceed"),
        ({"name": "reverse", "format": "chain"}, "'direct' or 'cot'"),
    ],
)
def test_bad_task_options_are_one_line_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)) as caught:
        TypeAdapter(TaskConfig).validate_python(options)
    assert "\n" not in caught.value.errors()[0]["msg"]


def test_jsonl_task_has_no_ood_split(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"Q{i}", "answer": "1"}) + "\n" for i in range(50))
    )
    with pytest.raises(PipelineError, match="task jsonl has no out-of-distribution split; use"):
        task_problems(JsonlTask(path=str(path)), "ood", 5, 0)
