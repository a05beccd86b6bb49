"""Preemption (pipeline/engine/preempt): a signal on one rank stops every rank at the same step."""

from __future__ import annotations

from tests.spawn import run_distributed


def _flags_around_a_signal_on_rank_1() -> tuple[bool, bool, bool]:
    """(requested before, this rank's own flag, requested after) on a 2-rank DDP Accelerator."""
    import os

    from pipeline.engine import preempt
    from pipeline.engine.config import LaunchConfig
    from pipeline.train.distributed import TrainShape, build_accelerator

    accelerator = build_accelerator(LaunchConfig(nproc=2), TrainShape(4, 1, world_size=2), [])
    preempt.install()
    before = preempt.requested(accelerator)
    if accelerator.process_index == 1:
        os.kill(os.getpid(), preempt.SIGNAL)  # the handler runs before the next bytecode
    return before, preempt._received, preempt.requested(accelerator)


def test_a_signal_on_one_rank_is_requested_on_every_rank() -> None:
    rank_0, rank_1 = run_distributed(_flags_around_a_signal_on_rank_1)
    assert rank_0 == (False, False, True)  # rank 0 never got the signal, yet stops too
    assert rank_1 == (False, True, True)  # the signal was recorded, not fatal
