"""The user's own functions, named in a recipe by import path (`package.module:function`): a
task's scorer, a GRPO reward.

Resolving one is a one-line error (bad shape, missing module, missing or misspelt attribute, not
callable) so a dry run catches it. Calling one is guarded by the caller: a raise or a bad value on
one completion scores that completion 0 and is logged once per kind of failure, so a long run
neither crashes on one odd completion nor floods its log.
"""

from __future__ import annotations

import importlib
import logging
import math
import numbers
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from pipeline.engine.errors import PipelineError
from pipeline.engine.schema_errors import suggest

IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
COMPLETION_CHARS = 200  # of a completion quoted in a warning
_warned: set[tuple[str, str, str]] = set()


def is_import_path(text: str) -> bool:
    """True when `text` is meant as an import path (has a colon), shaped right or not."""
    return ":" in text


def load_function(spec: str, where: str) -> Callable[..., Any]:
    """The callable `spec` names (`package.module:function`); a one-line PipelineError otherwise.

    `where` (the recipe key, e.g. `stages.rlhf.rewards`) starts the message when given.
    """
    prefix = f"{where}: " if where else ""
    if not IMPORT_PATH.fullmatch(spec):
        raise PipelineError(
            f"{prefix}{spec!r} is not an import path; write package.module:function"
        )
    module_name, _, attribute = spec.partition(":")
    module = _import(module_name, spec, prefix)
    function = getattr(module, attribute, None)
    if function is None:
        defined = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        hint = suggest(attribute, defined) or (
            f"; it defines {', '.join(sorted(defined)[:8])}" if defined else ""
        )
        raise PipelineError(f"{prefix}module {module_name!r} has no attribute {attribute!r}{hint}")
    if not callable(function):
        raise PipelineError(
            f"{prefix}{spec!r} is a {type(function).__name__}, not a function; name a function"
        )
    return function


def code_signature(spec: str) -> dict[str, Any]:
    """The file of `spec`'s module (path, size, mtime_ns), so editing it reruns what used it."""
    module = _import(spec.partition(":")[0], spec, "")
    file = getattr(module, "__file__", None)
    if not file:
        return {"module": module.__name__}
    stat = Path(file).stat()
    return {"path": file, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _import(module_name: str, spec: str, prefix: str) -> ModuleType:
    # A user running `pipeline run` from their project folder expects `mymod` to import, as it
    # would under `python -m`; the `pipeline` console script does not put that folder on the path.
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return _import_fresh(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(f"{missing}."):
            raise PipelineError(
                f"{prefix}cannot import {spec!r}: no module named {missing!r}; put it on "
                "PYTHONPATH or in the folder you run pipeline from"
            ) from None
        raise PipelineError(
            f"{prefix}importing {module_name!r} for {spec!r} failed: {one_line(exc)}; install "
            f"{missing!r} or fix the module's imports"
        ) from None
    except Exception as exc:  # the user's module failed while importing: their error, one line
        raise PipelineError(
            f"{prefix}importing {module_name!r} for {spec!r} failed: {type(exc).__name__}: "
            f"{one_line(exc)}; fix the module"
        ) from None


def _import_fresh(module_name: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError:
        # A module written since the path finders listed its folder (a test's tmp_path, an
        # edited project) is only seen after their caches are dropped.
        importlib.invalidate_caches()
        return importlib.import_module(module_name)


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (user code may raise multi-line messages)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def shorten(completion: Any) -> str:
    """A completion quoted for a log line, cut to COMPLETION_CHARS characters."""
    text = completion if isinstance(completion, str) else repr(completion)
    cut = text[:COMPLETION_CHARS]
    return repr(cut) + ("..." if len(text) > COMPLETION_CHARS else "")


def bad_number(value: Any) -> str | None:
    """Why `value` is no usable score (not a real number, or not finite), or None when it is."""
    if not isinstance(value, numbers.Real):
        return f"returned {shorten(value)} ({type(value).__name__}), not a number"
    if not math.isfinite(value):
        return f"returned {value}, not a finite number"
    return None


def warn_once(log: logging.Logger, function: str, kind: str, message: str) -> None:
    """Log `message` the first time `function` fails in this `kind` of way (one line per failure
    mode, not per completion: a bad scorer would otherwise log every completion of a run)."""
    key = (log.name, function, kind)
    if key in _warned:
        return
    _warned.add(key)
    log.warning("%s (further %s failures of %s are not logged)", message, kind, function)
