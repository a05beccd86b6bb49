"""Experiment tracking: W&B (one run per stage) plus a plain `metrics.jsonl`, rank 0 only.

The W&B run id is chosen by the engine and stored in the stage manifest, so a resumed or
requeued stage continues the same run (`resume="allow"`).
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import time
import uuid
from pathlib import Path
from typing import Any

from pipeline.engine.config import TrackingConfig
from pipeline.engine.rundir import METRICS_FILE

log = logging.getLogger("pipeline.engine.tracking")


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def wandb_key_configured() -> bool:
    """True when a W&B key is available from the environment or ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        hosts = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any("wandb" in host for host in hosts)


def resolve_mode(config: TrackingConfig) -> str:
    """auto -> online when a key is configured, else offline; an env WANDB_MODE wins over auto."""
    if config.mode != "auto":
        return config.mode
    env = os.environ.get("WANDB_MODE")
    if env in {"online", "offline", "disabled"}:
        return env
    return "online" if wandb_key_configured() else "offline"


def read_metrics(stage_dir: Path) -> list[dict[str, Any]]:
    path = stage_dir / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
    return rows


class Tracker:
    """Logs metrics on rank 0 to metrics.jsonl and W&B; a no-op on other ranks."""

    def __init__(
        self,
        stage_dir: Path,
        config: TrackingConfig,
        *,
        run_id: str | None,
        group: str,
        name: str,
        job_type: str,
        stage_config: dict[str, Any],
        enabled: bool = True,
        resume_step: int | None = None,
    ) -> None:
        self.enabled = enabled
        self.path = stage_dir / METRICS_FILE
        self.wandb_run = None
        if not enabled:
            return
        stage_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in finish()
        mode = resolve_mode(config)
        if mode == "disabled":
            return
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.wandb_run = wandb.init(
            project=config.project,
            entity=config.entity,
            group=group,
            name=f"{group}/{name}",
            job_type=job_type,
            id=run_id,
            resume="allow",
            mode=mode,
            dir=str(stage_dir),
            config=stage_config,
            tags=config.tags or None,
            settings=wandb.Settings(console="off", quiet=True),
        )
        if mode == "offline":
            log.info(
                "W&B offline run in %s (upload later: wandb sync %s)",
                self.wandb_dir,
                self.wandb_dir,
            )

    @property
    def wandb_dir(self) -> str | None:
        return self.wandb_run.dir.rsplit("/files", 1)[0] if self.wandb_run is not None else None

    def _truncate_after(self, step: int | None) -> None:
        """Drop rows logged after the checkpoint we resume from, so steps are not logged twice."""
        if step is None or not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path.parent) if r.get("step", -1) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **metrics}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        if self.wandb_run is not None:
            self.wandb_run.summary.update(metrics)

    def finish(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()
