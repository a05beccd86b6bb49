"""Stopping a stage: preemption warnings, local interrupts, and ranks that die with their launcher.

Slurm delivers the warning (`--signal`, SIGUSR1 by default) to every process of a job step. Each
worker records it here; the loop asks `requested()` at step boundaries, where every rank agrees on
the answer, so all ranks checkpoint the same step and leave together.

Locally, `pipeline run` routes SIGINT and SIGTERM into the same flag: the first asks the running
stage to stop at its next step boundary (an in-process loop reads the flag; torchrun ranks, in
sessions of their own, see the launcher's stop file), the stage is marked interrupted and the run
exits 128 + the signal; a second one stops at once. A rank exits when its launcher is gone: Linux
kills it with its parent (PR_SET_PDEATHSIG, launcher -> torchrun agent -> rank), and a watchdog
thread checks the launcher's pid (PIPELINE_LAUNCHER_PID) and its parent twice a second.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.engine.errors import PipelineError
from pipeline.engine.lock import pid_alive

if TYPE_CHECKING:
    from accelerate import Accelerator

SIGNAL = signal.SIGUSR1
LAUNCHER_PID_ENV = "PIPELINE_LAUNCHER_PID"
WATCH_INTERVAL_S = 0.5
ORPHAN_EXIT_CODE = 1
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

_received = False
_interrupt: int | None = None  # the SIGINT/SIGTERM that asked this orchestrator to stop
_owner_pid: int | None = None  # the orchestrator; forked helpers inherit handlers, not the role
_stop_child: Callable[[], None] | None = None
_kill_child: Callable[[], None] | None = None


class Interrupted(PipelineError):
    """The run stopped on SIGINT/SIGTERM (after a checkpoint); rerunning resumes it."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


def _on_signal(signum: int, frame: object) -> None:
    """The preemption signal's handler: set the flag the loop reads at its next step boundary."""
    global _received
    _received = True


def install() -> None:
    """Record the preemption signal in this process instead of dying of it."""
    signal.signal(SIGNAL, _on_signal)


def received() -> bool:
    """Whether this process got the signal (no collective; the loop agrees on it with others)."""
    return _received


def requested(accelerator: Accelerator) -> bool:
    """True on every rank when any rank received the signal (a collective: call it on all ranks)."""
    if accelerator.num_processes == 1:
        return _received
    import torch

    flag = torch.tensor([1.0 if _received else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def _say(text: str) -> None:
    """Write to stderr from a signal handler (no buffered I/O, which is not reentrant)."""
    with contextlib.suppress(OSError):
        os.write(2, text.encode())


def _on_interrupt(signum: int, frame: object) -> None:
    """SIGINT/SIGTERM in the orchestrator: ask the stage to stop, or on the second one stop now."""
    global _interrupt, _received
    if os.getpid() != _owner_pid:  # a forked helper of the orchestrator: the default behaviour
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    if _interrupt is not None:
        if _kill_child is not None:
            _kill_child()
        raise KeyboardInterrupt
    _interrupt, _received = signum, True
    if _stop_child is not None:
        _stop_child()
    _say(
        f"\n{signal.Signals(signum).name}: stopping at the next step boundary with a checkpoint "
        f"(a stage without steps finishes first); the same signal again stops at once\n"
    )


def install_interrupts() -> None:
    """In `pipeline run`: the first SIGINT/SIGTERM stops the run cleanly, the second at once."""
    global _owner_pid
    _owner_pid = os.getpid()
    signal.signal(signal.SIGINT, _on_interrupt)
    signal.signal(signal.SIGTERM, _on_interrupt)


def interrupt_signal() -> int | None:
    """The SIGINT/SIGTERM that asked this run to stop, if any."""
    return _interrupt


@contextlib.contextmanager
def delegated(stop: Callable[[], None], kill: Callable[[], None]) -> Iterator[None]:
    """While a child process runs the stage: a stop request (interrupt or preemption signal) is
    passed on with `stop()`, and a second interrupt `kill()`s the child."""
    global _stop_child, _kill_child

    def on_preempt(signum: int, frame: object) -> None:
        _on_signal(signum, frame)
        stop()

    previous = signal.signal(SIGNAL, on_preempt)
    _stop_child, _kill_child = stop, kill
    try:
        if _received:  # asked before the child existed
            stop()
        yield
    finally:
        _stop_child = _kill_child = None
        signal.signal(SIGNAL, signal.SIG_DFL if previous is None else previous)


def launcher_pid() -> int | None:
    """The pid of the process that launched this stage (`pipeline run` or a Slurm job step)."""
    value = os.environ.get(LAUNCHER_PID_ENV, "")
    return int(value) if value.isdigit() else None


def die_with_parent() -> None:
    """Have Linux SIGKILL this process when its parent dies (elsewhere the watchdog does it)."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def _orphaned(why: str) -> None:
    """Leave at once, writing nothing more: whoever would read our outputs is gone."""
    _say(f"pid {os.getpid()}: {why}; exiting\n")
    os._exit(ORPHAN_EXIT_CODE)


def watch_launcher(stop_file: Path | None = None) -> None:
    """Exit when the launcher or the parent is gone (before any further output is written);
    with `stop_file`, a stop request from the launcher sets the preemption flag."""
    die_with_parent()
    parent, launcher = os.getppid(), launcher_pid()
    if launcher is not None and not pid_alive(launcher):
        _orphaned(f"launcher pid {launcher} is gone")

    def watch() -> None:
        global _received
        while True:
            if os.getppid() != parent:
                _orphaned(f"parent pid {parent} is gone")
            if launcher is not None and not pid_alive(launcher):
                _orphaned(f"launcher pid {launcher} is gone")
            if stop_file is not None and not _received and stop_file.exists():
                _received = True
            time.sleep(WATCH_INTERVAL_S)

    threading.Thread(target=watch, name="launcher-watchdog", daemon=True).start()
