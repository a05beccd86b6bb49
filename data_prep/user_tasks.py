"""The user's own verifiable task: problems from a JSONL file, scored by a built-in scorer or by
the user's function named by import path.

Each line is a JSON object with `prompt` and `answer`, optionally `subtask` (for per-subtask
accuracy) and `rejected` (a wrong answer, for preference pairs and multiple choice). The held-out
split is by a hash of each prompt, as for the generated tasks, so adding rows never moves a row
across the split. Validating a recipe never reads the file (validation runs on every load);
`check_inputs` does, before any stage runs.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import Field, model_validator

from data_prep.task_base import Key, TaskBase, completion_text
from pipeline.engine.errors import PipelineError
from pipeline.engine.schema_errors import PathText, suggest
from pipeline.train.user_code import (
    bad_number,
    code_signature,
    is_import_path,
    load_function,
    one_line,
    shorten,
    warn_once,
)

SCORERS = ("exact", "numeric", "regex")
NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
BARE_NUMBER = re.compile(rf"\s*{NUMBER.pattern}\s*")
DEFAULT_SUBTASK = "all"
MIN_SPLIT_ROWS = 1
JSON_TYPES = {dict: "an object", list: "an array", bool: "a boolean", type(None): "null"}

log = logging.getLogger("pipeline.tasks")


class Rows(NamedTuple):
    """A task file's rows (prompt, answer, subtask, rejected as strings), the line each came from,
    and the first row of each prompt."""

    rows: tuple[dict[str, Any], ...]
    lines: tuple[int, ...]
    by_prompt: dict[str, int]


class JsonlTask(TaskBase):
    """Problems read from a JSONL file (`prompt`, `answer`, optional `subtask`, `rejected`)."""

    FAMILY = "jsonl"
    GROW = "add rows to the file or adjust test_percent"
    name: Literal["jsonl"] = "jsonl"
    path: PathText = Field(
        description="JSONL file, one object per line: prompt, answer, optional subtask and "
        "rejected (a wrong answer, for preference pairs); relative to the folder you run from"
    )
    scorer: str = Field(
        "exact",
        description="exact: the completion's first non-blank line equals the answer | numeric: "
        "its first number equals the answer within tolerance | regex: it matches pattern | "
        "package.module:function called as f(completion, answer, row) -> credit in [0, 1]",
    )
    pattern: str | None = Field(
        None, description="regex: searched for in the completion; {answer} stands for the answer"
    )
    tolerance: float = Field(
        0.0, ge=0, description="numeric: largest |number - answer| still right"
    )

    @model_validator(mode="after")
    def _check_scorer(self) -> JsonlTask:
        if self.scorer == "regex":
            if self.pattern is None:
                raise ValueError(r"scorer regex needs a `pattern`; add one, e.g. '^\s*{answer}\b'")
            try:
                re.compile(_fill(self.pattern, "answer"))
            except re.error as exc:
                raise ValueError(
                    f"pattern {self.pattern!r} is no regular expression: {exc}; fix it"
                ) from None
        elif self.pattern is not None:
            raise ValueError(
                f"`pattern` belongs to scorer regex, not {self.scorer!r}; drop it or use regex"
            )
        if self.tolerance and self.scorer != "numeric":
            raise ValueError(
                f"`tolerance` belongs to scorer numeric, not {self.scorer!r}; drop it or use numeric"
            )
        if self.scorer not in SCORERS:
            if not is_import_path(self.scorer):
                raise ValueError(
                    f"unknown scorer {self.scorer!r}{suggest(self.scorer, SCORERS)} (use exact, "
                    "numeric, regex or an import path package.module:function)"
                )
            try:
                load_function(self.scorer, "")
            except PipelineError as exc:
                raise ValueError(str(exc)) from None
        return self

    def rows(self) -> Rows:
        """The file's rows, read once per version of the file; a one-line error names a bad line."""
        path = Path(self.path).expanduser()
        if not path.is_file():
            raise PipelineError(
                f"task {self.path}: no such file; fix the task's path (a relative path starts at "
                "the folder you run pipeline from)"
            )
        stat = path.stat()
        return _read_rows(str(path), stat.st_size, stat.st_mtime_ns)

    def _row(self, key: Key) -> dict[str, Any]:
        return self.rows().rows[key[0]]

    def all_keys(self) -> Iterator[Key]:
        return ((index,) for index in range(self.size()))

    def size(self) -> int:
        return len(self.rows().rows)

    def sample_key(self, rng: random.Random) -> Key:
        return (rng.randrange(self.size()),)

    def prompt(self, key: Key) -> str:
        return self._row(key)["prompt"]

    def answer(self, key: Key) -> str:
        return self._row(key)["answer"]

    def subtask(self, key: Key) -> str:
        return self._row(key).get("subtask", DEFAULT_SUBTASK)

    def near_miss(self, key: Key, rng: random.Random) -> str:
        """The row's `rejected` answer: a file has no rule to invent plausible wrong answers."""
        row = self._row(key)
        if "rejected" not in row:
            line = self.rows().lines[key[0]]
            raise PipelineError(
                f"task {self.path}:{line}: no `rejected`; preference pairs and multiple choice "
                "from a JSONL task need a `rejected` column (a wrong answer) in every row"
            )
        return row["rejected"]

    def partial_credit(self, got: str, want: str) -> float:
        return self.grade(got, want)[1]

    def parse(self, completion: Any) -> str | None:
        """The completion's first number (numeric), else its first non-blank line; None if none."""
        text = completion_text(completion)
        if self.scorer == "numeric":
            match = NUMBER.search(text)
            return match.group() if match else None
        return text.lstrip().partition("\n")[0].strip() or None

    def is_bare(self, completion: Any) -> bool:
        """True when the completion is one number (numeric) or one non-blank line, nothing more."""
        text = completion_text(completion)
        if self.scorer == "numeric":
            return BARE_NUMBER.fullmatch(text) is not None
        return bool(text.strip()) and "\n" not in text.strip()

    def grade(
        self, completion: Any, answer: Any, problem: dict[str, Any] | None = None
    ) -> tuple[float, float]:
        """(exact, partial credit): 0 or 1 twice for the built-in scorers; the function's credit
        (exact only when it is 1) for a scorer named by import path."""
        text = completion_text(completion)
        want = str(answer).strip()
        if self.scorer not in SCORERS:
            credit = self._call_scorer(text, want, problem)
            return float(credit == 1.0), credit
        exact = float(bool(want) and self._matches(text, want))
        return exact, exact

    def _matches(self, text: str, want: str) -> bool:
        if self.scorer == "regex":
            return re.search(_fill(self.pattern or "", want), text) is not None
        got = self.parse(text)
        if got is None:
            return False
        if self.scorer == "exact":
            return got == want
        try:
            return abs(float(got) - float(want)) <= self.tolerance
        except ValueError:  # an answer that is not a number (check_inputs reports it)
            return False

    def _call_scorer(self, text: str, want: str, problem: dict[str, Any] | None) -> float:
        function = load_function(self.scorer, f"task {self.path} scorer")
        row = self._row_of(problem) or {**(problem or {}), "answer": want}
        try:
            credit = function(text, want, dict(row))
        except Exception as exc:  # the user's scorer failing on one completion must not end a run
            kind = type(exc).__name__
            warn_once(
                log, self.scorer, kind,
                f"scorer {self.scorer} raised {kind}: {one_line(exc)} on completion "
                f"{shorten(text)}; scored 0",
            )  # fmt: skip
            return 0.0
        problem_text = bad_number(credit)
        if problem_text is None and not 0 <= credit <= 1:
            problem_text = f"returned {credit}, not a credit in [0, 1]"
        if problem_text is not None:
            warn_once(
                log, self.scorer, "bad value",
                f"scorer {self.scorer} {problem_text} on completion {shorten(text)}; scored 0",
            )  # fmt: skip
            return 0.0
        return float(credit)

    def _row_of(self, problem: dict[str, Any] | None) -> dict[str, Any] | None:
        """The file's row of a problem (by its prompt), so a scorer sees every column."""
        prompt = (problem or {}).get("prompt")
        if not isinstance(prompt, str):
            return None
        read = self.rows()
        index = read.by_prompt.get(prompt)
        return None if index is None else read.rows[index]

    def check_inputs(self) -> None:
        """The file is UTF-8 JSONL with a prompt and an answer in every row, answers suit the
        scorer, `rejected` is in every row or none, and both splits have rows."""
        read = self.rows()
        where = f"task {self.path}"
        for row, line in zip(read.rows, read.lines, strict=True):
            if self.scorer == "numeric" and not _is_number(row["answer"]):
                raise PipelineError(
                    f"{where}:{line}: answer {row['answer']!r} is not a number, which scorer "
                    "numeric needs; fix the row or use scorer exact"
                )
        has_rejected = ["rejected" in row for row in read.rows]
        if any(has_rejected) and not all(has_rejected):
            line = read.lines[has_rejected.index(False)]
            raise PipelineError(
                f"{where}:{line}: no `rejected` while other rows have one; give every row a "
                "rejected answer or none"
            )
        test = sum(self.split_of((index,)) == "test" for index in range(len(read.rows)))
        train = len(read.rows) - test
        if test < MIN_SPLIT_ROWS:
            raise PipelineError(
                f"{where}: none of its {len(read.rows)} rows falls in the test split (test_percent "
                f"{self.test_percent}); add rows or raise test_percent"
            )
        if train < MIN_SPLIT_ROWS:
            raise PipelineError(
                f"{where}: none of its {len(read.rows)} rows falls in the train split "
                f"(test_percent {self.test_percent}); add rows or lower test_percent"
            )

    def signature(self) -> dict[str, Any]:
        """The file's path, size and mtime_ns (and the scorer module's file), so an edit reruns."""
        path = Path(self.path).expanduser()
        try:
            stat = path.stat()
            version = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        except OSError:  # check_inputs reports the missing file; a fingerprint must not fail first
            version = {"size": None, "mtime_ns": None}
        signature: dict[str, Any] = {"path": self.path, **version}
        if self.scorer not in SCORERS:
            signature["scorer_file"] = code_signature(self.scorer)
        return signature


def _fill(pattern: str, answer: str) -> str:
    # `{answer}` is replaced rather than str.format'ed so that regex repetitions like \d{3} need
    # no doubled braces.
    return pattern.replace("{answer}", re.escape(answer))


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


@lru_cache(maxsize=16)
def _read_rows(path: str, size: int, mtime_ns: int) -> Rows:
    """The rows of a task file; `size` and `mtime_ns` are in the cache key so an edited file is
    read again."""
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    by_prompt: dict[str, int] = {}
    with open(path, "rb") as file:
        for number, raw in enumerate(file, 1):
            where = f"task {path}:{number}"
            try:
                text = raw.decode("utf-8").removeprefix("\ufeff" if number == 1 else "")
            except UnicodeDecodeError:
                raise PipelineError(f"{where}: not UTF-8 text; save the file as UTF-8") from None
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise PipelineError(
                    f"{where}: not JSON ({exc.msg}); write one JSON object per line"
                ) from None
            if not isinstance(row, dict):
                raise PipelineError(
                    f"{where}: {JSON_TYPES.get(type(row), 'a JSON value')}, not an object; write "
                    "one object with prompt and answer per line"
                )
            for column in ("prompt", "answer"):
                if column not in row:
                    raise PipelineError(
                        f"{where}: no `{column}`; every row needs a prompt and an answer"
                    )
            for column in ("prompt", "answer", "subtask", "rejected"):
                if column in row:
                    row[column] = _text(row[column], where, column)
            if not row["answer"]:
                raise PipelineError(f"{where}: empty `answer`; give every row its right answer")
            by_prompt.setdefault(row["prompt"], len(rows))
            rows.append(row)
            lines.append(number)
    return Rows(tuple(rows), tuple(lines), by_prompt)


def _text(value: Any, where: str, column: str) -> str:
    """A column as text: strings as they are (answers stripped), numbers written out."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise PipelineError(
            f"{where}: `{column}` is {JSON_TYPES.get(type(value), 'a JSON value')}, not a string "
            "or a number; write it as a string"
        )
    return value if column == "prompt" else value.strip()
