"""Accelerator construction from the recipe's launch section; the one place parallelism is chosen."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.config import LaunchConfig

if TYPE_CHECKING:
    from accelerate import Accelerator


def build_accelerator(launch: LaunchConfig, precision: str = "fp32") -> Accelerator:
    """An Accelerator for `launch.engine` (DDP; gloo on CPU, NCCL on GPUs)."""
    import torch
    from accelerate import Accelerator

    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision="bf16" if precision == "bf16" else "no",
    )


def replica_digests(accelerator: Accelerator, model) -> list[str]:
    """Each rank's digest of its parameters; under data parallelism they must all be equal."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name, param in sorted(accelerator.unwrap_model(model).state_dict().items()):
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().numpy().tobytes())
    mine = torch.tensor(list(digest.digest()[:8]), dtype=torch.int64, device=accelerator.device)
    gathered = accelerator.gather(mine.unsqueeze(0)).cpu().tolist()
    return [bytes(row).hex() for row in gathered]
