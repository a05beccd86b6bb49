"""Progress for long loops: a live bar on a terminal, a line every ~10% in logs and pipes."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(
    items: Iterable[T] | None,
    total: int | None,
    desc: str,
    enabled: bool = True,
    log: logging.Logger | None = None,
) -> Iterator[T]:
    """Wrap `items` (or range(total)) with progress reporting."""
    if items is None:
        assert total is not None, "progress() needs items or total"
        items = range(total)  # type: ignore[assignment]
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if not enabled:
        yield from items
        return
    if sys.stderr.isatty() or os.environ.get("PIPELINE_PROGRESS") == "bar":
        from tqdm.auto import tqdm

        yield from tqdm(items, total=total, desc=f"  {desc}", leave=False, dynamic_ncols=True)
        return
    log = log or logging.getLogger("pipeline")
    start = time.perf_counter()
    next_mark = 0.1
    for done, item in enumerate(items, start=1):
        yield item
        if total and done / total >= next_mark:
            elapsed = time.perf_counter() - start
            log.info("%s: %d/%d (%.0f%%, %.1fs)", desc, done, total, 100 * done / total, elapsed)
            next_mark += 0.1
