"""The user's own tasks (a JSONL file with a scorer) and rewards (functions by import path):
splits, scorers, guarded user code, and one-line errors (in-process, no training)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, TypeAdapter, ValidationError

from data_prep.tasks import (
    TASKS,
    ArithmeticTask,
    TaskConfig,
    preference_pairs,
    score,
    split_size,
    task_documents,
    task_problems,
)
from data_prep.user_tasks import JsonlTask
from eval.harness import write_task_data
from pipeline.engine.errors import PipelineError
from pipeline.stages.rewards import RewardName, reward_functions
from pipeline.train import user_code

USER_CODE = '''
import math

CONSTANT = 3


def score(completion, answer, problem):
    """Half credit for the right answer with the wrong unit, full credit with the right one."""
    if "boom" in completion:
        raise ValueError("cannot read\\nthis completion")
    if completion.strip() == "nan":
        return math.nan
    if completion.strip() == "text":
        return "yes"
    number, _, unit = completion.strip().partition(" ")
    if number != answer:
        return 0
    return 1.0 if unit == problem.get("unit") else 0.5


def length(prompts, completions, answer, **kwargs):
    assert "trainer_state" in kwargs
    return [float(len(c)) for c in completions]


def picky(prompts, completions, **kwargs):
    if any("boom" in c for c in completions):
        raise RuntimeError("exploded")
    return [None if c == "skip" else math.nan if c == "nan" else 1 for c in completions]


def short(prompts, completions, **kwargs):
    return [1.0]
'''


def _rows(count: int, start: int = 0) -> list[dict[str, Any]]:
    return [
        {"prompt": f"How many legs have {i} spiders?", "answer": 8 * i, "unit": "legs",
         "subtask": "small" if i < 50 else "large", "rejected": str(8 * i + 1)}
        for i in range(start, start + count)
    ]  # fmt: skip


def _write(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A user module on sys.path, named per test (imported modules outlive a test), and its
    warnings captured afresh."""
    name = "usercode_" + re.sub(r"\W", "_", tmp_path.name)
    (tmp_path / f"{name}.py").write_text(USER_CODE, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(user_code, "_warned", set())  # each test sees its first warnings
    # A stage run in this process stops `pipeline` records at its own handlers; caplog is on root.
    monkeypatch.setattr(logging.getLogger("pipeline"), "propagate", True)
    return name


@pytest.fixture
def rows_file(tmp_path: Path) -> Path:
    return _write(tmp_path / "spiders.jsonl", _rows(100))


def _hash_test(prompt: str, percent: int) -> bool:
    return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") % 100 < percent


def test_splits_are_by_prompt_hash_disjoint_and_stable_when_rows_are_added(
    rows_file: Path,
) -> None:
    task = TypeAdapter(TaskConfig).validate_python({"name": "jsonl", "path": str(rows_file)})
    assert isinstance(task, JsonlTask) and TASKS["jsonl"] is JsonlTask
    task.check_inputs()

    def splits() -> dict[str, set[str]]:
        return {
            s: {p["prompt"] for p in task_problems(task, s, split_size(task, s), 0)}
            for s in ("train", "test")
        }

    before = splits()
    prompts = {r["prompt"] for r in _rows(100)}
    assert before["train"] | before["test"] == prompts and not before["train"] & before["test"]
    assert before["test"] == {p for p in prompts if _hash_test(p, 10)} and before["test"]
    problem = task_problems(task, "test", 1, 0)[0]
    assert problem["completion"] == f" {problem['answer']}" and problem["subtask"] in (
        "small", "large",
    )  # fmt: skip

    _write(rows_file, _rows(100) + _rows(60, start=100))
    after = splits()
    assert before["test"] <= after["test"] and before["train"] <= after["train"]
    assert len(after["train"]) + len(after["test"]) == 160
    assert sum(doc.count("\n") + 1 for doc in task_documents(task)) == len(after["train"])


def test_builtin_scorers_score_right_and_wrong_completions(tmp_path: Path) -> None:
    path = str(_write(tmp_path / "t.jsonl", _rows(20)))
    exact = JsonlTask(path=path)  # the first non-blank line, stripped, equals the answer
    for completion, right in [(" Paris\nmore", 1), ("\n  Paris ", 1), (" paris", 0), (None, 0),
                              ("Paris is it", 0), ([{"content": "Paris"}], 1)]:  # fmt: skip
        assert score(exact, completion, " Paris ") == (right, right)
    numeric = JsonlTask(path=path, scorer="numeric", tolerance=0.001)  # the first number
    for completion, answer, right in [("about 3.1416 or so", "3.1416", 1), (" 3.2", "3.1416", 0),
                                      ("none", "1", 0), (" -2e3 m", "-2000", 1),
                                      ("pi=3.14159, not 3", "3.1416", 1)]:  # fmt: skip
        assert score(numeric, completion, answer) == (right, right)
    assert numeric.is_bare(" 4.5 ") and not numeric.is_bare("4.5 m")
    # {answer} is the escaped answer; other braces stay regex repetitions (no doubling needed).
    regex = JsonlTask(path=path, scorer="regex", pattern=r"\bis {answer}\b\.?\d{0,2}")
    assert score(regex, "The answer is 4.5.", "4.5") == (1.0, 1.0)
    assert score(regex, "The answer is 4x5.", "4.5") == (0.0, 0.0)
    assert exact.parse(" \n Paris \n x") == "Paris" and exact.is_bare(" Paris ")
    assert not exact.is_bare("Paris\nRome") and exact.parse(" \n ") is None


def test_function_scorer_gives_credit_and_sees_the_row(rows_file: Path, module: str) -> None:
    task = JsonlTask(path=str(rows_file), scorer=f"{module}:score")
    prompt = {"prompt": "How many legs have 3 spiders?"}
    assert score(task, "24 legs", "24", prompt) == (1.0, 1.0)  # the row's unit column
    assert score(task, "24 feet", "24", prompt) == (0.0, 0.5)
    assert score(task, "25 legs", "24", prompt) == (0.0, 0.0)
    assert score(task, "24 legs", "24") == (0.0, 0.5)  # no row known: no unit
    assert task.signature()["scorer_file"]["path"].endswith(f"{module}.py")


def test_failing_function_scorer_scores_zero_and_warns_once_per_kind(
    rows_file: Path, module: str, caplog: pytest.LogCaptureFixture
) -> None:
    task = JsonlTask(path=str(rows_file), scorer=f"{module}:score")
    long = "boom " + "x" * 500
    with caplog.at_level(logging.WARNING, logger="pipeline.tasks"):
        assert score(task, long, "8") == (0.0, 0.0)
        assert score(task, "boom again", "8") == (0.0, 0.0)
        assert score(task, "nan", "8") == (0.0, 0.0)
        assert score(task, "text", "8") == (0.0, 0.0)
    messages = [r.getMessage() for r in caplog.records if r.name == "pipeline.tasks"]
    assert len(messages) == 2 and all("\n" not in m for m in messages)
    raised, bad = messages
    assert f"{module}:score raised ValueError: cannot read this completion" in raised
    assert repr("boom " + "x" * 195) + "..." in raised and "x" * 201 not in raised
    assert "returned nan, not a finite number" in bad and "'nan'" in bad


def test_rewards_by_import_path_are_trl_shaped_and_guarded(
    rows_file: Path, module: str, caplog: pytest.LogCaptureFixture
) -> None:
    task = JsonlTask(path=str(rows_file))
    exact, length, picky, short = reward_functions(
        ["exact", f"{module}:length", f"{module}:picky", f"{module}:short"], task, "stages.rlhf"
    )
    prompts = ["p1", "p2", "p3", "p4"]
    columns: dict[str, Any] = {"answer": ["8", "16", "24", "32"], "trainer_state": object()}
    completions = [" 8", "16\nlegs", "boom", "nan"]
    assert exact(prompts, completions, **columns) == [1.0, 1.0, 0.0, 0.0]  # the task's scorer
    assert length(prompts, completions, **columns) == [2.0, 7.0, 4.0, 3.0]
    assert length.__name__ == "length"
    with caplog.at_level(logging.WARNING, logger="pipeline.rewards"):
        assert picky(prompts, completions, **columns) == [1.0, 1.0, 0.0, 0.0]
        assert picky(prompts, ["ok", "skip"], **columns) == [1.0, None]  # None: TRL's "n/a"
        assert short(prompts, completions, **columns) == [0.0] * 4
    messages = [r.getMessage() for r in caplog.records if r.name == "pipeline.rewards"]
    assert len(messages) == 3 and all(f"{module}:" in m and "\n" not in m for m in messages)
    assert "raised RuntimeError: exploded on completion 'boom'" in messages[0]
    assert "returned nan, not a finite number on completion 'nan'" in messages[1]
    assert "returned 1 values for 4 completions" in messages[2]


class Rewards(BaseModel):
    rewards: list[RewardName]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"scorer": "exakt"}, "unknown scorer 'exakt'; did you mean 'exact'?"),
        ({"scorer": "{module}:scroe"}, "has no attribute 'scroe'; did you mean 'score'?"),
        ({"scorer": "nosuch_module_zz:score"}, "no module named 'nosuch_module_zz'; put it on PYTHONPATH"),
        ({"scorer": "{module}:CONSTANT"}, "is a int, not a function"),
        ({"scorer": "a-b:c"}, "'a-b:c' is not an import path; write package.module:function"),
        ({"scorer": "regex"}, "scorer regex needs a `pattern`"),
        ({"scorer": "regex", "pattern": "(unclosed"}, "is no regular expression"),
        ({"pattern": "x"}, "`pattern` belongs to scorer regex, not 'exact'"),
        ({"tolerance": 0.5}, "`tolerance` belongs to scorer numeric"),
    ],
)  # fmt: skip
def test_task_validation_errors_are_one_line(
    module: str, options: dict[str, Any], message: str
) -> None:
    options = {
        k: v.replace("{module}", module) if isinstance(v, str) else v for k, v in options.items()
    }
    with pytest.raises(ValidationError) as info:
        TypeAdapter(TaskConfig).validate_python(
            {"name": "jsonl", "path": "unread.jsonl", **options}
        )
    (error,) = info.value.errors()
    assert message in error["msg"] and "\n" not in error["msg"]


def test_reward_name_validation_is_one_line(module: str) -> None:
    assert Rewards(rewards=["exact", "format", f"{module}:length"]).rewards[2].endswith("length")
    for name, message in [
        ("exakt", "unknown reward function 'exakt'; did you mean 'exact'?"),
        ("arithmetic_exact", "'arithmetic_exact' was renamed to 'exact'; use 'exact'"),
        (f"{module}:lenght", "has no attribute 'lenght'; did you mean 'length'?"),
        ("gone_module_zz:f", "no module named 'gone_module_zz'"),
    ]:
        with pytest.raises(ValidationError) as info:
            Rewards(rewards=[name])
        (error,) = info.value.errors()
        assert message in error["msg"] and "\n" not in error["msg"]
    with pytest.raises(PipelineError, match=r"^stages\.rlhf\.rewards: cannot import 'gone_zz:f'"):
        reward_functions(["gone_zz:f"], ArithmeticTask(), "stages.rlhf")


def _check_error(tmp_path: Path, text: str | bytes, **options: Any) -> str:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    with pytest.raises(PipelineError) as info:
        JsonlTask(path=str(path), **options).check_inputs()
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_check_inputs_errors_name_the_file_the_line_and_the_fix(tmp_path: Path) -> None:
    good = json.dumps({"prompt": "a", "answer": "1"})
    with pytest.raises(PipelineError, match="missing.jsonl: no such file; fix the task's path"):
        JsonlTask(path=str(tmp_path / "missing.jsonl")).check_inputs()
    assert ":3: not JSON" in _check_error(tmp_path, f"{good}\n\n{{prompt: 1}}\n")
    assert ":2: no `answer`" in _check_error(tmp_path, f'{good}\n{{"prompt": "b"}}\n')
    assert ":1: an array, not an object" in _check_error(tmp_path, "[1, 2]\n")
    assert ":2: not UTF-8" in _check_error(tmp_path, good.encode() + b"\n\xff\xfe\n")
    assert ":1: `answer` is an object" in _check_error(tmp_path, '{"prompt": "a", "answer": {}}')
    assert ":1: answer 'one' is not a number, which scorer numeric needs" in _check_error(
        tmp_path, json.dumps({"prompt": "a", "answer": "one"}), scorer="numeric"
    )
    train_only = [p for p in (f"q{i}" for i in range(50)) if not _hash_test(p, 1)][:3]
    rows = "".join(json.dumps({"prompt": p, "answer": "1"}) + "\n" for p in train_only)
    assert "none of its 3 rows falls in the test split (test_percent 1); add rows or raise " \
        "test_percent" in _check_error(tmp_path, rows, test_percent=1)  # fmt: skip


def test_preference_pairs_need_a_rejected_column(tmp_path: Path) -> None:
    with_rejected = JsonlTask(path=str(_write(tmp_path / "r.jsonl", _rows(100))))
    pairs = preference_pairs(with_rejected, "train", 5, 0)
    assert all(int(p["rejected"]) == int(p["answer"]) + 1 for p in pairs)
    data = write_task_data("task_choice", with_rejected, tmp_path / "lm", 3)
    row = json.loads(data.read_text().splitlines()[0])
    assert len(row["choices"]) == 4 and row["choices"][row["label"]] == f" {row['answer']}"
    bare = [{k: v for k, v in r.items() if k != "rejected"} for r in _rows(100)]
    without = JsonlTask(path=str(_write(tmp_path / "n.jsonl", bare)))
    with pytest.raises(PipelineError, match=r"n\.jsonl:\d+: no `rejected`; preference pairs"):
        preference_pairs(without, "train", 5, 0)


def test_signature_follows_the_file(rows_file: Path) -> None:
    task = JsonlTask(path=str(rows_file))
    first = task.signature()
    assert first["path"] == str(rows_file) and first["size"] == rows_file.stat().st_size
    _write(rows_file, _rows(101))
    assert task.signature() != first and task.size() == 101
    assert ArithmeticTask().signature() == {}
