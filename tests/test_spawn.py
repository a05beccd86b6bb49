"""The in-test gloo spawner (tests/spawn.py): real ranks, results in rank order, failures loud."""

from __future__ import annotations

import time

import pytest

from tests.spawn import RankFailed, run_distributed


def _rank_world_and_sum(offset: int) -> tuple[int, int, float]:
    import os

    import torch
    import torch.distributed as dist

    value = torch.tensor([float(dist.get_rank() + offset)])
    dist.all_reduce(value)
    assert int(os.environ["RANK"]) == dist.get_rank()  # torchrun's environment, for Accelerate
    return dist.get_rank(), dist.get_world_size(), value.item()


def test_results_come_back_in_rank_order_from_one_process_group() -> None:
    assert run_distributed(_rank_world_and_sum, 10, world_size=3) == [
        (0, 3, 33.0),
        (1, 3, 33.0),
        (2, 3, 33.0),
    ]


def _rank_1_fails_while_rank_0_waits() -> None:
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("boom on rank 1")
    dist.barrier()  # never completes: rank 1 is gone


def _rank_1_dies() -> int:
    import os

    import torch.distributed as dist

    if dist.get_rank() == 1:
        os._exit(3)
    return 0


def test_a_failing_rank_is_reraised_with_its_traceback_and_its_peers_stopped() -> None:
    started = time.monotonic()
    with pytest.raises(RankFailed) as info:
        run_distributed(_rank_1_fails_while_rank_0_waits)
    message = str(info.value)
    assert message.startswith("rank 1 of 2 failed:\nTraceback")
    assert "in _rank_1_fails_while_rank_0_waits" in message
    assert message.rstrip().endswith("ValueError: boom on rank 1")
    assert time.monotonic() - started < 60  # rank 0 was stopped, not left in its barrier
    with pytest.raises(RankFailed, match="rank 1 exited with code 3 without a result"):
        run_distributed(_rank_1_dies)
