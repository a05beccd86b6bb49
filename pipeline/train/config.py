"""The fields of a training stage: `TrainingConfig` (every one, TRL-trained included) and
`LoopConfig` (what our own loop adds)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from pipeline.engine.config import Strict
from pipeline.train.optim import OptimConfig, ScheduleConfig
from pipeline.train.stability import SpikeConfig


class TrainingConfig(Strict):
    """Steps, batch, optimizer, schedule, precision and checkpoint cadence: the fields every
    training stage has, ours and the TRL-trained ones, with the same keys."""

    max_steps: int = Field(200, ge=1, description="optimizer steps")
    micro_batch_size: int = Field(8, ge=1, description="sequences per rank per micro step")
    grad_accum_steps: int = Field(1, ge=1, description="micro steps per optimizer step")
    optim: OptimConfig = Field(
        default_factory=OptimConfig, description="AdamW: lr, weight_decay, betas, eps, grad_clip"
    )
    schedule: ScheduleConfig = Field(
        default_factory=ScheduleConfig, description="warmup, then cosine | linear | constant | wsd"
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 on GPUs with bf16"
    )
    log_every: int = Field(10, ge=1, description="optimizer steps between logged rows")
    checkpoint_every: int = Field(50, ge=1, description="optimizer steps between checkpoints")
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept")

    @model_validator(mode="after")
    def _check_schedule(self) -> TrainingConfig:
        problem = self.schedule.check(self.max_steps)
        if problem:
            raise ValueError(problem)
        return self


class LoopConfig(TrainingConfig):
    """What our own loop adds: compilation, in-loop validation and the stability guards."""

    # Batches are a function of (seed, step) at a fixed global batch and checkpoints reshard on
    # load, so the fingerprint covers the global batch, not world size x micro batch x accum.
    elastic_resume: ClassVar[bool] = True

    compile: bool = Field(False, description="torch.compile the model (inductor)")
    eval_every: int = Field(50, ge=1, description="optimizer steps between validation passes")
    checkpoint_async: bool = Field(
        False,
        description="FSDP: write checkpoints in the background (torch.distributed.checkpoint "
        "async_save) while training goes on; a checkpoint counts once its write completes and "
        "the final or preemption one is synchronous; other engines always save synchronously",
        json_schema_extra={"fingerprint": False},  # how checkpoints are written, not what
    )
    eval_batches: int = Field(4, ge=1, description="validation micro batches per rank")
    max_bad_steps: int = Field(
        3,
        ge=0,
        description="optimizer steps in a row with a non-finite loss or gradient norm that stop "
        "the stage (each is skipped on every rank); 0 turns the guard off and its per-step sync",
    )
    spike: SpikeConfig = Field(
        default_factory=SpikeConfig,
        description="loss-spike rollback: rollback, window, threshold, skip_before, lr_factor, "
        "max_rollbacks",
    )
