"""What a stage sees of the world: its config, its directories, its upstream stages, its rank.

A stage never reads the recipe's other stages directly nor knows how it was launched; it asks
its context for the nearest upstream stage of a kind and for that stage's export directory.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pipeline.engine.config import Recipe, StageConfig
from pipeline.engine.errors import PipelineError
from pipeline.engine.manifest import atomic_write_json, read_manifest
from pipeline.engine.rundir import CHECKPOINTS_DIR, EXPORT_DIR, LOG_FILE, SUMMARY_FILE
from pipeline.engine.tracking import Tracker

if TYPE_CHECKING:
    from pipeline.engine.inputs import Resolved

T = TypeVar("T")


@dataclass
class StageContext:
    run_dir: Path
    name: str
    recipe: Recipe
    fingerprint: str = ""
    wandb_id: str | None = None
    rank: int = field(default_factory=lambda: int(os.environ.get("RANK", "0")))
    world_size: int = field(default_factory=lambda: int(os.environ.get("WORLD_SIZE", "1")))
    local_rank: int = field(default_factory=lambda: int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def config(self) -> StageConfig:
        return self.recipe.stages[self.name]

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def seed(self) -> int:
        return self.recipe.seed if self.config.seed is None else self.config.seed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def stage_dir(self) -> Path:
        return self.run_dir / self.name

    @property
    def export_dir(self) -> Path:
        return self.stage_dir / EXPORT_DIR

    @property
    def checkpoint_dir(self) -> Path:
        return self.stage_dir / CHECKPOINTS_DIR

    @property
    def log(self) -> logging.Logger:
        return logging.getLogger(f"pipeline.{self.name}")

    def _require_done(self, stage: str) -> None:
        if read_manifest(self.run_dir / stage).get("status") != "done":
            raise PipelineError(
                f"stages.{self.name}: upstream stage {stage!r} is not done; "
                f"run it first (pipeline run RECIPE --only {stage})"
            )

    def inputs(self, name: str) -> list[Resolved]:
        """Every resolved value of this stage's declared input `name` (stages must be done)."""
        from pipeline.engine.inputs import resolve_inputs

        resolved, problems = resolve_inputs(self.recipe, self.name)
        if name not in resolved:
            raise KeyError(f"stage kind {self.kind} declares no input {name!r}")
        for found in resolved[name]:
            if found.stage is not None:
                self._require_done(found.stage)
        if problems and not resolved[name]:
            raise PipelineError(problems[0])
        return resolved[name]

    def input(self, name: str) -> Resolved:
        """The one resolved value of input `name` (an upstream export or a directory)."""
        found = self.inputs(name)
        if not found:
            raise PipelineError(f"stages.{self.name}: no {name} input; add one to `after:`")
        return found[0]

    def optional_input(self, name: str) -> Resolved | None:
        """The resolved value of an optional input `name`, or None when it has none."""
        found = self.inputs(name)
        return found[0] if found else None

    def tracker(self, resume_step: int | None = None) -> Tracker:
        """This stage's tracker (W&B + metrics.jsonl); logs only on rank 0."""
        return Tracker(
            self.stage_dir,
            self.recipe.tracking,
            run_id=self.wandb_id,
            group=self.recipe.name,
            name=self.name,
            job_type=self.kind,
            stage_config=self.config.model_dump(mode="json"),
            enabled=self.is_main,
            resume_step=resume_step,
        )

    def write_summary(
        self, metrics: dict[str, Any], headline: str | None = None, note: str | None = None
    ) -> None:
        """Record summary metrics for the manifest (rank 0).

        `headline` names the metric shown in status tables; `note` is a one-line human summary
        printed after a run (e.g. a metric next to its baseline).
        """
        if not self.is_main:
            return
        path = self.stage_dir / SUMMARY_FILE
        current = json.loads(path.read_text()) if path.exists() else {"metrics": {}}
        current["metrics"].update(metrics)
        if headline is not None:
            current["headline"] = headline
        if note is not None:
            current["note"] = note
        atomic_write_json(path, current)

    def progress(
        self, items: Iterable[T] | None = None, total: int | None = None, desc: str = ""
    ) -> Iterator[T]:
        """Progress over a long loop: a bar on a terminal, periodic lines in logs, silent off rank 0."""
        from pipeline.engine.progress import progress

        return progress(items, total=total, desc=desc, enabled=self.is_main, log=self.log)


def setup_stage_logging(stage_dir: Path, name: str, rank: int) -> None:
    """Rank 0 logs to the terminal and `stage.log`; other ranks only to `logs/rank{r}.log`."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("pipeline")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    fmt = logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S")
    if rank == 0:
        file_handler = logging.FileHandler(stage_dir / LOG_FILE, encoding="utf-8")
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter(f"  [{name}] %(message)s"))
        logger.addHandler(console)
    else:
        (stage_dir / "logs").mkdir(exist_ok=True)
        file_handler = logging.FileHandler(stage_dir / "logs" / f"rank{rank}.log", encoding="utf-8")
    file_handler.setFormatter(fmt)
    logger.addHandler(file_handler)
    # Python warnings (third-party deprecations) go to the stage's log file, not the terminal.
    logging.captureWarnings(True)
    py_warnings = logging.getLogger("py.warnings")
    for handler in list(py_warnings.handlers):
        py_warnings.removeHandler(handler)
    py_warnings.addHandler(file_handler)
    py_warnings.propagate = False
    quiet_libraries()


class ErrorsOnly(logging.Filter):
    """Passes records of level ERROR and above."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def quiet_libraries() -> None:
    """Keep library chatter (advisory warnings, per-file progress bars) out of stage output."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Third-party tqdm bars (lm-eval, datasets): tqdm reads this when it is first imported, so the
    # CLI calls this before any library loads; our own bars pass disable=False.
    os.environ.setdefault("TQDM_DISABLE", "1")
    for name in ("accelerate", "DeepSpeed", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # DeepSpeed resets its logger's level when it is imported; a filter survives that.
    deepspeed = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, ErrorsOnly) for f in deepspeed.filters):
        deepspeed.addFilter(ErrorsOnly())
    # DeepSpeed calls collectives that torch has renamed; the warning repeats every step.
    warnings.filterwarnings(
        "ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning
    )
