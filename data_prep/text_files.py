"""Data files as streams of documents in bounded memory: text, JSONL and Parquet, plain or compressed.

A text file is split into documents by a separator and read in chunks of READ_BYTES; a document
longer than MAX_DOCUMENT_BYTES is cut (at a line end when there is one) into several documents,
so no file, however large, is ever held in memory whole. JSONL streams line by line and Parquet
by record batch. Every problem with the data is a one-line PipelineError naming the file.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal

from pipeline.engine.errors import PipelineError

FORMATS = (".txt", ".jsonl", ".parquet")
COMPRESSIONS = (".gz", ".zst")
PARQUET_BATCH_ROWS = 1024
READ_BYTES = 1 << 20
# A longer document is cut into pieces of at most this size (each its own document, so each gets
# an end-of-document token): it bounds the reader's and the encoder's memory per document.
MAX_DOCUMENT_BYTES = 4 << 20
Separator = Literal["blank_line", "line", "file"]
# Where one document ends and the next begins, searched in text that ends at a line end. A blank
# line is an empty line (LF or CRLF); a line holding only spaces is text.
_SEPARATORS = {"blank_line": re.compile(rb"^\r?\n", re.MULTILINE), "line": re.compile(rb"\n")}


def file_format(path: Path) -> tuple[str, str]:
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


def file_documents(path: Path, text_field: str, separator: Separator) -> Iterator[str]:
    """The documents of one data file, in order (text files split by `separator`)."""
    fmt, compression = file_format(path)
    try:
        with _open(path, compression) as f:
            if fmt == ".txt":
                yield from text_documents(f, path, separator, compression)
            elif fmt == ".jsonl":
                for number, record in _json_lines(f, path, compression):
                    yield text_of(record, text_field, f"source {path} line {number}")
            else:
                yield from _parquet_documents(f, path, text_field, compression)
    except (OSError, EOFError) as exc:
        raise PipelineError(f"source {path}: cannot read ({exc}); check the file") from None


def text_documents(
    f: IO[bytes],
    path: Path,
    separator: Separator,
    compression: str = "",
    read_bytes: int = READ_BYTES,
    max_document_bytes: int = MAX_DOCUMENT_BYTES,
) -> Iterator[str]:
    """Documents of a text stream read `read_bytes` at a time; empty ones are dropped.

    `blank_line` ends a document at an empty line and `line` at every line end (either way without
    the line end that closes it); `file` keeps the whole stream, byte for byte. A document over
    `max_document_bytes` is cut into pieces, at the last line end that fits when there is one.
    """
    pattern = _SEPARATORS.get(separator)
    doc = bytearray()  # the open document
    doc_start = 0  # its byte offset in the stream
    base = 0  # the byte offset of `tail`
    tail = b""  # bytes after the last line end, not yet searched for a separator
    mid_line = False  # whether `doc` ends inside a line (a cut in a long line)
    while chunk := f.read(read_bytes):
        data = tail + chunk
        end = len(data) if pattern is None else data.rfind(b"\n") + 1
        pos = 0
        if mid_line and end:  # the rest of the cut line belongs to the open document
            pos = data.find(b"\n") + 1
            doc += data[:pos]
            mid_line = False
        for match in pattern.finditer(data, pos, end) if pattern is not None else ():
            doc += data[pos : match.start()]
            yield from _finish(doc, doc_start, path, compression, separator, max_document_bytes)
            doc, doc_start, pos = bytearray(), base + match.end(), match.end()
        doc += data[pos:end]
        tail, base = data[end:], base + end
        if len(tail) > max_document_bytes:  # a long line: cut it without waiting for its end
            doc += tail
            base += len(tail)
            tail, mid_line = b"", separator == "blank_line"
        size = len(doc)  # an open document keeps its last line end (\r\n), dropped if it closes
        yield from _cut_long(doc, doc_start, path, compression, max_document_bytes, keep=2)
        doc_start += size - len(doc)
    doc += tail
    yield from _finish(doc, doc_start, path, compression, separator, max_document_bytes)


def _finish(
    doc: bytearray, offset: int, path: Path, compression: str, separator: Separator, limit: int
) -> Iterator[str]:
    """The closed document as text (cut if long), without the line end before its separator."""
    if separator != "file":
        if doc.endswith(b"\n"):
            del doc[-1:]
        if doc.endswith(b"\r"):
            del doc[-1:]
    size = len(doc)
    yield from _cut_long(doc, offset, path, compression, limit)
    if doc:
        yield _decode(bytes(doc), path, offset + size - len(doc), compression)


def _cut_long(
    doc: bytearray, offset: int, path: Path, compression: str, limit: int, keep: int = 0
) -> Iterator[str]:
    """Pieces of at most `limit` bytes cut off the front of `doc` (in place) until at most
    `limit + keep` bytes are left."""
    while len(doc) > limit + keep:
        cut = _cut(doc, limit)
        yield _decode(bytes(doc[:cut]), path, offset, compression)
        del doc[:cut]
        offset += cut


def _cut(data: bytearray, limit: int) -> int:
    """Where to cut `data` so the head fits in `limit`: after its last line end, else at a
    character boundary."""
    line_end = data.rfind(b"\n", 0, limit)
    if line_end >= 0:
        return line_end + 1
    cut = limit
    while cut > limit - 3 and (data[cut] & 0xC0) == 0x80:  # not inside a UTF-8 sequence
        cut -= 1
    return cut


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


def text_of(record: Any, text_field: str, where: str) -> str:
    """The text field of a record; PipelineError naming `where` when it is not there or not text."""
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

    with tempfile.TemporaryFile() as spill:
        handle: IO[bytes] = f
        if compression:  # Parquet needs random access: decompress to disk, not to memory
            shutil.copyfileobj(f, spill, READ_BYTES)
            spill.seek(0)
            handle = spill
        try:
            parquet = pq.ParquetFile(handle)
        except pa.ArrowException as exc:
            raise PipelineError(
                f"source {path}: not a Parquet file ({exc}); check the file"
            ) from None
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
