"""Pieces shared by training loops: schedule, parameter groups, replayable randomness, export."""

from __future__ import annotations

import hashlib
import math
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from pipeline.engine.config import Strict

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator


class OptimConfig(Strict):
    """AdamW settings; the same keys in every training stage (`stages.<name>.optim.lr`)."""

    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.1, ge=0, description="decoupled weight decay (matrices only)")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW first-moment decay")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW second-moment decay")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 disables clipping")


class ScheduleConfig(Strict):
    """Learning-rate schedule: linear warmup, then cosine decay to min_lr_ratio x lr."""

    kind: Literal["cosine"] = "cosine"
    warmup_steps: int = Field(20, ge=0, description="steps of linear warmup from 0")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final lr as a fraction of the peak")


def lr_factor(step: int, schedule: ScheduleConfig, max_steps: int) -> float:
    """Linear warmup to 1, then cosine decay to min_lr_ratio at max_steps."""
    if step < schedule.warmup_steps:
        return (step + 1) / schedule.warmup_steps
    progress = (step - schedule.warmup_steps) / max(1, max_steps - schedule.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return schedule.min_lr_ratio + (1 - schedule.min_lr_ratio) * cosine


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not on norms, biases or other vectors)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def replay_generator(*key: object) -> torch.Generator:
    """A CPU generator seeded from a key such as (seed, step, rank, micro): same key, same draws."""
    import torch

    digest = hashlib.sha256(repr(key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def export_model(
    accelerator: Accelerator,
    model: torch.nn.Module,
    tokenizer_dir: Path,
    export_dir: Path,
    added_special_tokens: dict[str, Any] | None = None,
) -> None:
    """Gather the (possibly sharded) model and save it with its tokenizer as a HF directory.

    Every rank takes part in the gather (ZeRO-3 and FSDP hold shards); rank 0 writes into a
    temporary directory that is renamed into place, so a crash never leaves half an export.
    """
    from transformers import AutoTokenizer

    from pipeline.models import add_special_tokens

    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        tmp = export_dir.parent / f".{export_dir.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped = accelerator.unwrap_model(model)
        if getattr(unwrapped, "generation_config", None) is not None:  # encoders have none
            unwrapped.generation_config.pad_token_id = unwrapped.config.pad_token_id
        unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        if added_special_tokens:
            add_special_tokens(tokenizer, added_special_tokens)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(export_dir, ignore_errors=True)
        tmp.rename(export_dir)
    accelerator.wait_for_everyone()


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run with `count` intra-op threads (None: unchanged), then restore the previous setting.

    Small models on a shared CPU run several times faster on one thread than on two.
    """
    import torch

    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
