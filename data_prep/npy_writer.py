"""An .npy file written row by row (data_prep/images.py streams image shards with it)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np

from pipeline.engine.manifest import sha256_file

HASH_CHUNK_BYTES = 1 << 16  # re-reading a written shard holds two chunks at once


class NpyWriter:
    """An .npy file written row by row; the row count goes into the header at the end.

    The bytes equal `np.save` of the stacked rows: numpy pads the header's first dimension to 21
    digits, so the header written first (0 rows) and the final one have the same length."""

    def __init__(self, path: Path, dtype: str, row_shape: tuple[int, ...]) -> None:
        self.path, self.dtype, self.row_shape, self.rows = path, np.dtype(dtype), row_shape, 0
        self.partial = path.with_name(f".{path.name}.partial")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file: BinaryIO | None = open(self.partial, "wb")  # noqa: SIM115
        self.header_bytes = self.file.write(self._header())

    def _header(self) -> bytes:
        buffer = io.BytesIO()
        header = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": (self.rows, *self.row_shape),
        }
        np.lib.format.write_array_header_1_0(buffer, header)
        return buffer.getvalue()

    def append(self, row: np.ndarray) -> None:
        """Write one row (shape `row_shape`) after the previous ones."""
        assert self.file is not None and row.shape == self.row_shape
        self.file.write(np.ascontiguousarray(row, dtype=self.dtype).tobytes())
        self.rows += 1

    def close(self) -> str:
        """Write the final header, move the file into place, and return its sha256."""
        assert self.file is not None
        header = self._header()
        assert len(header) == self.header_bytes, "npy header length changed"
        self.file.seek(0)
        self.file.write(header)
        self.file.close()
        self.file = None
        os.replace(self.partial, self.path)
        return sha256_file(self.path, chunk_bytes=HASH_CHUNK_BYTES)

    def abort(self) -> None:
        """Drop an unfinished file (no-op after close)."""
        if self.file is not None:
            self.file.close()
            self.file = None
            self.partial.unlink(missing_ok=True)
