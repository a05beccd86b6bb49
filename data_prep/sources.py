"""Text sources: built-in corpora, text/JSONL/Parquet files or globs, local HF dataset dirs.

A source yields documents (str) in a deterministic order. Every problem with the user's data is
a PipelineError naming the file (and line or byte offset), the problem and the fix.
"""

from __future__ import annotations

import glob
import os
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import Field, field_validator, model_validator

from data_prep.task_base import task_file_signature
from data_prep.tasks import GENERATOR_VERSION, ArithmeticTask, TaskBase, TaskConfig, task_documents
from data_prep.text_files import (
    COMPRESSIONS,
    FORMATS,
    PARQUET_BATCH_ROWS,
    Separator,
    file_documents,
    file_format,
    text_of,
)
from data_prep.text_files import jsonl_records as jsonl_records
from pipeline.engine.config import StageConfig, Strict
from pipeline.engine.errors import PipelineError

STDLIB = "builtin:python-stdlib"
TASK = "builtin:task"
ARITHMETIC = "builtin:arithmetic"  # shorthand for builtin:task with the default arithmetic task
BUILTINS = (STDLIB, TASK, ARITHMETIC)
HF_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
T = TypeVar("T")


class UriConfig(Strict):
    """Base of data sources named by a `uri`: a bare string in YAML is the uri, a `builtin:`
    name must be one of BUILTINS, and a path is made absolute (every process and Slurm job
    finds it)."""

    BUILTINS: ClassVar[tuple[str, ...]] = ()
    WHAT: ClassVar[str] = "source"  # names the source kind in errors

    uri: str

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        return {"uri": data} if isinstance(data, str) else data

    @field_validator("uri")
    @classmethod
    def _absolute(cls, uri: str) -> str:
        if uri.startswith("builtin:"):
            if uri not in cls.BUILTINS:
                raise ValueError(f"unknown built-in {cls.WHAT} (known: {', '.join(cls.BUILTINS)})")
            return uri
        return str(Path(uri).expanduser().absolute())


class SourceConfig(UriConfig):
    """Where documents come from; a bare string in YAML is the `uri`."""

    BUILTINS = BUILTINS

    text_field: str = "text"
    separator: Separator = Field(
        "blank_line",
        description=".txt files: where one document ends; blank_line (an empty line), line "
        "(every line end) or file (the whole file); a document over 4 MiB is cut at a line end",
    )
    max_documents: int | None = Field(None, ge=1)
    max_bytes: int | None = Field(None, ge=1)
    repeat: int = Field(
        1,
        ge=1,
        description="copies of each train document in the token shards (upsamples this source in "
        "a round-robin mixture); held-out documents are written once",
    )
    name: str | None = Field(
        None,
        pattern=r"^[\w.+-]+$",
        description="what metrics call this source in a mixture (val_loss/<name>); default: the "
        "uri's base name without suffixes (python-stdlib, the task's name, code for data/code/*.jsonl)",
    )
    weight: float | None = Field(
        None,
        gt=0,
        description="mixtures: this source's share of the train tokens after packing (its tokens "
        "with their end-of-document tokens), weight / sum of weights, held within 1 point over "
        "any window of the tokenize summary's mixture_window_tokens; every source needs one",
    )
    on_exhausted: Literal["stop", "cycle"] = Field(
        "stop",
        description="weighted mixtures, when this source runs out: stop ends the mixture; cycle "
        "reads it again from the start (epochs counted in the tokenize summary); a mixture of "
        "cycling sources ends once every source was read to its end",
    )
    task: TaskConfig | None = Field(
        None, description="builtin:task: the task whose train problems are the text"
    )
    problems: int | None = Field(
        None, ge=1, description="builtin:task: train problems written (default: all of them)"
    )

    @model_validator(mode="after")
    def _task_only_for_tasks(self) -> SourceConfig:
        if self.uri not in (TASK, ARITHMETIC) and (self.task or self.problems):
            raise ValueError(f"`task` and `problems` belong to {TASK} sources, not {self.uri}")
        if self.uri in BUILTINS and self.separator != "blank_line":  # the default is dumped
            raise ValueError(f"`separator` belongs to .txt file sources, not {self.uri}")
        return self

    def task_config(self) -> TaskBase:
        """The task of a builtin:task (or builtin:arithmetic) source."""
        return self.task or ArithmeticTask()

    def default_name(self) -> str:
        """The explicit name, else the uri's base name without format and compression suffixes."""
        if self.name is not None:
            return self.name
        if self.uri in (TASK, ARITHMETIC):
            return str(getattr(self.task_config(), "name", "task"))
        if self.uri in BUILTINS:
            return self.uri.removeprefix("builtin:")
        parts = [p for p in Path(self.uri).parts if not glob.has_magic(p)]
        base = parts[-1] if parts else "source"
        for suffix in (*COMPRESSIONS, *FORMATS):
            base = base.removesuffix(suffix) or base
        return base


def iter_documents(source: SourceConfig) -> Iterator[str]:
    """Non-empty documents in a fixed order, stopping at max_documents / max_bytes (UTF-8 bytes).

    The document that reaches max_bytes is cut at a character boundary so the total never exceeds
    it. Raises PipelineError when the source yields no document at all.
    """
    found = False
    for doc, _ in limited(((doc, None) for doc in _raw_documents(source)), source):
        found = True
        yield doc
    if not found:
        raise PipelineError(f"source {source.uri}: no documents (empty corpus); point it at text")


def limited(items: Iterable[tuple[str, T]], source: SourceConfig) -> Iterator[tuple[str, T]]:
    """The non-empty (text, payload) items up to the source's max_documents / max_bytes, the
    text that reaches max_bytes cut at a character boundary (the one rule every reader uses)."""
    num_documents = 0
    num_bytes = 0
    for doc, payload in items:
        if not doc:
            continue
        if source.max_bytes is not None:
            size = len(doc.encode("utf-8"))
            if num_bytes + size > source.max_bytes:
                room = source.max_bytes - num_bytes
                doc = doc.encode("utf-8")[:room].decode("utf-8", errors="ignore")
                size = len(doc.encode("utf-8"))
            num_bytes += size
        if doc:
            num_documents += 1
            yield doc, payload
        if num_documents == source.max_documents or num_bytes == source.max_bytes:
            break


def source_signature(source: SourceConfig) -> dict[str, Any]:
    """What identifies the source's content beyond its config: file stats, Python version."""
    if source.uri == STDLIB:
        return {"python": sys.version, "stdlib": str(stdlib_root())}
    if source.uri in (TASK, ARITHMETIC):
        return {"task_generator": GENERATOR_VERSION, **task_file_signature(source.task_config())}
    path = Path(source.uri)
    files = (
        sorted(p for p in path.rglob("*") if p.is_file())
        if _is_hf_dir(path)
        else _files(source.uri)
    )
    stats = [(str(p), p.stat()) for p in files]
    return {"files": [[name, st.st_size, st.st_mtime_ns] for name, st in stats]}


class SourceStageConfig(StageConfig):
    """Base of stages that read a text source, or a mixture (a list of sources).

    The sources' content is part of the fingerprint.
    """

    source: list[SourceConfig] = Field(
        description="a source, or a list of sources mixed document by document"
    )
    # Stages that may take a curate stage's `documents` (or adopt a tokenizer) instead.
    source_optional: ClassVar[bool] = False

    def check_inputs(self) -> None:
        """Each file source yields a first document (exists, not empty, parses, is UTF-8), and a
        task source's task file (a JSONL task) is well formed."""
        for index, source in enumerate(self.source):
            if source.uri in (TASK, ARITHMETIC):
                try:
                    source.task_config().check_inputs()
                except PipelineError as exc:
                    raise PipelineError(f"source.{index}.task: {exc}") from None
        probe_sources(self.source)

    @field_validator("source", mode="before")
    @classmethod
    def _as_list(cls, source: Any) -> Any:
        return source if isinstance(source, list) else [source]

    @field_validator("source")
    @classmethod
    def _not_empty(cls, source: list[SourceConfig]) -> list[SourceConfig]:
        if not source:
            if cls.source_optional:  # [] is how a stage reading `documents` is written back
                return source
            raise ValueError("an empty list of sources; name at least one source")
        weighted = [s.weight is not None for s in source]
        if any(weighted) and len(source) < 2:
            raise ValueError(
                "`weight` needs a mixture (a list of two or more sources); remove it or add sources"
            )
        if any(weighted) and not all(weighted):
            missing = ", ".join(str(i) for i, w in enumerate(weighted) if not w)
            raise ValueError(
                f"source {missing} has no `weight`; give every source of a weighted mixture one"
            )
        for i, s in enumerate(source):
            if s.weight is not None and s.repeat != 1:
                raise ValueError(
                    f"source {i} has both `repeat` and `weight`; use weight alone (with "
                    f"on_exhausted: cycle for a small source)"
                )
            if s.weight is None and s.on_exhausted != "stop":  # the default is dumped
                raise ValueError(f"source {i}: `on_exhausted` belongs to weighted mixtures")
        return source

    def source_names(self) -> list[str]:
        """Each source's name in metrics; a repeated name gets -2, -3, ... appended."""
        return unique_names([s.default_name() for s in self.source])

    def data_signature(self) -> dict[str, Any]:
        return {"sources": [source_signature(source) for source in self.source]}


def unique_names(names: list[str]) -> list[str]:
    """`names` with a repeated name made unique by appending -2, -3, ..."""
    out: list[str] = []
    for name in names:
        unique, count = name, 1
        while unique in out:
            count += 1
            unique = f"{name}-{count}"
        out.append(unique)
    return out


def mixed_documents(sources: list[SourceConfig]) -> Iterator[tuple[str, int]]:
    """(document, repeat) of several sources, interleaved round-robin one document at a time.

    Each source keeps its own max_documents / max_bytes; a source that runs out drops out of the
    rotation. Round-robin keeps every source present in any prefix (the tokenizer's sample).
    Weights are the tokenize stage's (data_prep.mixture); here they are ignored.
    """
    for doc, repeat, _ in tagged_documents(sources):
        yield doc, repeat


def tagged_documents(sources: list[SourceConfig]) -> Iterator[tuple[str, int, int]]:
    """(document, repeat, index of its source) in the round-robin order of mixed_documents."""
    streams = [(i, iter_documents(source), source.repeat) for i, source in enumerate(sources)]
    while streams:
        alive = []
        for index, documents, repeat in streams:
            doc = next(documents, None)
            if doc is not None:
                yield doc, repeat, index
                alive.append((index, documents, repeat))
        streams = alive


def _raw_documents(source: SourceConfig) -> Iterator[str]:
    if source.uri == STDLIB:
        yield from stdlib_documents()
    elif source.uri in (TASK, ARITHMETIC):
        yield from task_documents(source.task_config(), source.problems)
    elif _is_hf_dir(Path(source.uri)):
        yield from _hf_documents(Path(source.uri), source.text_field)
    else:
        for path in _files(source.uri):
            yield from file_documents(path, source.text_field, source.separator)


def stdlib_root() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_documents() -> Iterator[str]:
    """Every UTF-8 .py file of the stdlib (not site-packages), sorted by relative path."""
    root = stdlib_root()
    relative = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts) and p.is_file()
    )
    for rel in relative:
        try:
            yield (root / rel).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue


def _is_hf_dir(path: Path) -> bool:
    return path.is_dir() and any((path / marker).is_file() for marker in HF_MARKERS)


def _files(uri: str) -> list[Path]:
    """The files a path or glob names, sorted; errors for nothing matched or unknown formats."""
    if glob.has_magic(uri):
        files = sorted(Path(p) for p in glob.glob(uri, recursive=True) if os.path.isfile(p))
        if not files:
            raise PipelineError(f"source {uri}: glob matches no files; check the pattern")
    else:
        path = Path(uri)
        if path.is_dir():
            raise PipelineError(
                f"source {uri}: is a directory but not a saved HF dataset; "
                f"use a glob such as {uri}/*.jsonl"
            )
        if not path.is_file():
            raise PipelineError(f"source {uri}: no such file; check the path")
        files = [path]
    for path in files:
        file_format(path)
    return files


def _hf_documents(path: Path, text_field: str) -> Iterator[str]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise PipelineError(
                f"source {path}: dataset has no 'train' split (splits: {', '.join(loaded)}); "
                f"save the split to use as train"
            )
        loaded = loaded["train"]
    if text_field not in loaded.column_names:
        raise PipelineError(
            f"source {path}: no column {text_field!r} (columns: {', '.join(loaded.column_names)}); "
            f"set source.text_field"
        )
    column = loaded.select_columns([text_field])
    for row, batch in enumerate(column.iter(batch_size=PARQUET_BATCH_ROWS)):
        for i, value in enumerate(batch[text_field]):
            yield text_of(
                {text_field: value},
                text_field,
                f"source {path} row {row * PARQUET_BATCH_ROWS + i + 1}",
            )


def probe_sources(sources: list[SourceConfig]) -> None:
    """Read the first document of each non-built-in source; raises its PipelineError if any."""
    for source in sources:
        if source.uri in BUILTINS:
            continue
        try:
            next(iter_documents(source), None)
        except (OSError, ValueError) as exc:  # a library's reader (datasets) on a broken folder
            problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise PipelineError(
                f"source {source.uri}: cannot read it ({problem}); check the data or the path"
            ) from None
