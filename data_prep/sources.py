"""Text sources: built-in corpora, text/JSONL/Parquet files or globs, local HF dataset dirs.

A source yields documents (str) in a deterministic order. Every problem with the user's data is
a PipelineError naming the file (and line or byte offset), the problem and the fix.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, ClassVar

from pydantic import Field, field_validator, model_validator

from data_prep.tasks import GENERATOR_VERSION, ArithmeticTask, TaskBase, TaskConfig, task_documents
from pipeline.engine.config import StageConfig, Strict
from pipeline.engine.errors import PipelineError

STDLIB = "builtin:python-stdlib"
TASK = "builtin:task"
ARITHMETIC = "builtin:arithmetic"  # shorthand for builtin:task with the default arithmetic task
BUILTINS = (STDLIB, TASK, ARITHMETIC)
FORMATS = (".txt", ".jsonl", ".parquet")
COMPRESSIONS = (".gz", ".zst")
HF_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
PARQUET_BATCH_ROWS = 1024


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
    max_documents: int | None = Field(None, ge=1)
    max_bytes: int | None = Field(None, ge=1)
    repeat: int = Field(
        1,
        ge=1,
        description="copies of each train document in the token shards (upsamples this source in "
        "a mixture); held-out documents are written once",
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
        return self

    def task_config(self) -> TaskBase:
        """The task of a builtin:task (or builtin:arithmetic) source."""
        return self.task or ArithmeticTask()


def iter_documents(source: SourceConfig) -> Iterator[str]:
    """Non-empty documents in a fixed order, stopping at max_documents / max_bytes (UTF-8 bytes).

    The document that reaches max_bytes is cut at a character boundary so the total never exceeds
    it. Raises PipelineError when the source yields no document at all.
    """
    num_documents = 0
    num_bytes = 0
    for doc in _raw_documents(source):
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
            yield doc
        if num_documents == source.max_documents or num_bytes == source.max_bytes:
            break
    if num_documents == 0:
        raise PipelineError(f"source {source.uri}: no documents (empty corpus); point it at text")


def source_signature(source: SourceConfig) -> dict[str, Any]:
    """What identifies the source's content beyond its config: file stats, Python version."""
    if source.uri == STDLIB:
        return {"python": sys.version, "stdlib": str(stdlib_root())}
    if source.uri in (TASK, ARITHMETIC):
        return {"task_generator": GENERATOR_VERSION}
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

    @field_validator("source", mode="before")
    @classmethod
    def _as_list(cls, source: Any) -> Any:
        return source if isinstance(source, list) else [source]

    @field_validator("source")
    @classmethod
    def _not_empty(cls, source: list[SourceConfig]) -> list[SourceConfig]:
        if not source:
            raise ValueError("an empty list of sources; name at least one source")
        return source

    def data_signature(self) -> dict[str, Any]:
        return {"sources": [source_signature(source) for source in self.source]}


def mixed_documents(sources: list[SourceConfig]) -> Iterator[tuple[str, int]]:
    """(document, repeat) of several sources, interleaved round-robin one document at a time.

    Each source keeps its own max_documents / max_bytes; a source that runs out drops out of the
    rotation. Round-robin keeps every source present in any prefix (the tokenizer's sample).
    """
    streams = [(iter_documents(source), source.repeat) for source in sources]
    while streams:
        alive = []
        for documents, repeat in streams:
            doc = next(documents, None)
            if doc is not None:
                yield doc, repeat
                alive.append((documents, repeat))
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
            yield from _file_documents(path, source.text_field)


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
        _format(path)
    return files


def _format(path: Path) -> tuple[str, str]:
    """(format suffix, compression suffix or '') of a data file."""
    suffixes = path.suffixes[-2:]
    compression = suffixes[-1] if suffixes and suffixes[-1] in COMPRESSIONS else ""
    rest = suffixes[:-1] if compression else suffixes
    fmt = rest[-1] if rest else ""
    if fmt not in FORMATS:
        raise PipelineError(
            f"source {path}: unsupported file type; use {'/'.join(FORMATS)} "
            f"(optionally {'/'.join(COMPRESSIONS)})"
        )
    return fmt, compression


def _open(path: Path, compression: str) -> IO[bytes]:
    if compression == ".gz":
        return gzip.open(path, "rb")
    if compression == ".zst":
        import zstandard

        return io.BufferedReader(zstandard.open(path, "rb"))  # buffered: adds line iteration
    return open(path, "rb")


def _decode(data: bytes, path: Path, offset: int, compression: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        where = f"byte offset {offset + exc.start}" + (
            " after decompression" if compression else ""
        )
        raise PipelineError(
            f"source {path}: not valid UTF-8 at {where} ({exc.reason}); re-encode the file as UTF-8"
        ) from None


def _file_documents(path: Path, text_field: str) -> Iterator[str]:
    fmt, compression = _format(path)
    try:
        with _open(path, compression) as f:
            if fmt == ".txt":
                yield _decode(f.read(), path, 0, compression)
            elif fmt == ".jsonl":
                yield from _jsonl_documents(f, path, text_field, compression)
            else:
                yield from _parquet_documents(f, path, text_field, compression)
    except (OSError, EOFError) as exc:
        raise PipelineError(f"source {path}: cannot read ({exc}); check the file") from None


def jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line of a .jsonl file, plain, .gz or .zst.

    Bytes that are not UTF-8, bad JSON and unreadable files are one-line PipelineErrors.
    """
    compression = path.suffix if path.suffix in COMPRESSIONS else ""
    try:
        with _open(path, compression) as f:
            yield from _json_lines(f, path, compression)
    except (OSError, EOFError) as exc:
        raise PipelineError(f"source {path}: cannot read ({exc}); check the file") from None


def _json_lines(f: IO[bytes], path: Path, compression: str) -> Iterator[tuple[int, Any]]:
    offset = 0
    for number, raw in enumerate(f, start=1):
        line = _decode(raw, path, offset, compression)
        offset += len(raw)
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise PipelineError(
                f"source {path} line {number}: not valid JSON ({exc}); fix or remove the line"
            ) from None


def _jsonl_documents(f: IO[bytes], path: Path, text_field: str, compression: str) -> Iterator[str]:
    for number, record in _json_lines(f, path, compression):
        yield _field(record, text_field, f"source {path} line {number}")


def _field(record: Any, text_field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise PipelineError(f"{where}: expected a JSON object, got {type(record).__name__}; fix it")
    if text_field not in record:
        keys = ", ".join(sorted(map(str, record))) or "none"
        raise PipelineError(
            f"{where}: no field {text_field!r} (fields: {keys}); set source.text_field"
        )
    value = record[text_field]
    if not isinstance(value, str):
        raise PipelineError(
            f"{where}: field {text_field!r} is {type(value).__name__}, not text; fix the data"
        )
    return value


def _parquet_documents(
    f: IO[bytes], path: Path, text_field: str, compression: str
) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    handle: Any = io.BytesIO(f.read()) if compression else f
    try:
        parquet = pq.ParquetFile(handle)
    except pa.ArrowException as exc:
        raise PipelineError(f"source {path}: not a Parquet file ({exc}); check the file") from None
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise PipelineError(
            f"source {path}: no column {text_field!r} (columns: {', '.join(columns)}); "
            f"set source.text_field"
        )
    row = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            row += 1
            if not isinstance(value, str):
                raise PipelineError(
                    f"source {path} row {row}: column {text_field!r} is "
                    f"{type(value).__name__}, not text; fix the data or set source.text_field"
                )
            yield value


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
            yield _field(
                {text_field: value},
                text_field,
                f"source {path} row {row * PARQUET_BATCH_ROWS + i + 1}",
            )
