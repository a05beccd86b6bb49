"""Progress for long loops: a live bar on a terminal, a line every ~10% in logs and pipes once a
loop has run for QUIET_SECONDS (a loop that finishes sooner prints nothing)."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
QUIET_SECONDS = 10.0  # loops shorter than this print no progress lines in logs and pipes


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

        bar = tqdm(
            items, total=total, desc=f"  {desc}", leave=False, dynamic_ncols=True, disable=False
        )
        yield from bar
        return
    log = log or logging.getLogger("pipeline")
    start = time.perf_counter()
    next_mark = 0.1
    for done, item in enumerate(items, start=1):
        yield item
        if total and done / total >= next_mark:
            elapsed = time.perf_counter() - start
            if elapsed >= QUIET_SECONDS:
                log.info(
                    "%s: %d/%d (%.0f%%, %.1fs)", desc, done, total, 100 * done / total, elapsed
                )
            next_mark += 0.1
