"""Run a function on N real ranks inside a test: spawned processes joined by a gloo process group.

The environment each rank sees is torchrun's (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), so Accelerate and the stage context find their rank as in a real run.
A distributed function is tested in seconds, without a `pipeline run` subprocess.
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

# Joining takes seconds; a rank stuck in a collective its peers never reach must not hang the suite.
TIMEOUT_S = 120.0


class RankFailed(AssertionError):
    """A rank raised (its traceback is in the message) or died without reporting."""


def free_port() -> int:
    """A TCP port on localhost that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_distributed(
    fn: Callable[..., Any], *args: Any, world_size: int = 2, timeout_s: float = TIMEOUT_S
) -> list[Any]:
    """`fn(*args)` on `world_size` gloo ranks; their return values in rank order.

    `fn` must be importable (a module-level function) and its arguments and results picklable.
    The first rank to fail is re-raised as RankFailed with that rank's traceback, and the other
    ranks are stopped (they may be waiting for it in a collective).
    """
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    results: Any = context.Queue()
    port = free_port()
    # Not daemonic, so a rank may start processes of its own; the `finally` below stops them all.
    procs = [
        context.Process(target=_rank_main, args=(rank, world_size, port, fn, args, results))
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    returned: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(returned) < world_size:
            try:
                rank, ok, payload = results.get(timeout=0.2)
            except queue.Empty:
                _check_alive(procs, returned, deadline, timeout_s)
                continue
            if not ok:
                raise RankFailed(f"rank {rank} of {world_size} failed:\n{payload}")
            returned[rank] = pickle.loads(payload)
    finally:
        for proc in procs:
            proc.join(timeout=10 if len(returned) == world_size else 0.5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        results.close()
    return [returned[rank] for rank in range(world_size)]


def _check_alive(
    procs: list[Any], returned: dict[int, Any], deadline: float, timeout_s: float
) -> None:
    for rank, proc in enumerate(procs):
        if rank not in returned and proc.exitcode is not None:
            raise RankFailed(f"rank {rank} exited with code {proc.exitcode} without a result")
    if time.monotonic() > deadline:
        waiting = [rank for rank in range(len(procs)) if rank not in returned]
        raise RankFailed(f"ranks {waiting} gave no result within {timeout_s:.0f}s")


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    results: Any,
) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # N ranks share the machine's few cores
    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=TIMEOUT_S)
        )
        result = fn(*args)
        results.put((rank, True, pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - every failure goes back to the test, traceback and all
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
