"""Fault injection for the fault tests: `PIPELINE_FAULT=<stage>:<point>[:<n>]` kills the run
with SIGKILL the n-th time (default: the first) that stage passes that point, as a power cut,
the OOM killer or `kill -9` would: no handler runs, nothing is cleaned up or flushed. A rank
kills its launcher first (the other ranks die with it), so the whole run stops at that moment.

Points: `data_write` (tokenize, after a shard is committed), `mid_step` (after backward, before
the update), `checkpoint_save` (state written, not yet verified or renamed), `export_write`
(export written, not yet renamed), `manifest_write` (the manifest's temp file written, not yet
renamed into place). Unset, a point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

from pipeline.engine.preempt import LAUNCHER_PID_ENV

ENV = "PIPELINE_FAULT"
_passes: dict[tuple[str, str], int] = {}


def point(stage: str, name: str) -> None:
    """Die here if PIPELINE_FAULT names this stage and point (and this is its n-th pass)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    wanted_stage, wanted_point, *nth = spec.split(":")
    if (wanted_stage, wanted_point) != (stage, name):
        return
    _passes[stage, name] = passes = _passes.get((stage, name), 0) + 1
    if passes != (int(nth[0]) if nth else 1):
        return
    launcher = os.environ.get(LAUNCHER_PID_ENV, "")
    if launcher.isdigit() and int(launcher) != os.getpid():
        os.kill(int(launcher), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
