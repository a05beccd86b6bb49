"""Elastic resume: a checkpoint written on 2 ranks resumes on 1 (and 1 on 2) under DDP, FSDP2 and
DeepSpeed ZeRO-2/3, at the same global batch, continuing the uninterrupted run's losses."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.engine.config import validate_recipe
from pipeline.engine.context import StageContext
from pipeline.engine.graph import fingerprints
from pipeline.engine.tracking import read_metrics
from tests.spawn import run_distributed

GLOBAL_BATCH = 8
MAX_STEPS = 8
SAVED_STEP = 4  # the checkpoint a resumed run starts from; the later one is "lost"
TOLERANCE = 1e-4
ENGINES = {
    "ddp": {"engine": "ddp"},
    "fsdp": {"engine": "fsdp"},
    "zero2": {"engine": "deepspeed", "zero_stage": 2},
    "zero3": {"engine": "deepspeed", "zero_stage": 3},
}


def recipe_data(run_dir: Path, launch: dict, nproc: int, **stage: Any) -> dict:
    """A one-stage recipe: the toy regression at a global batch of 8 over `nproc` ranks."""
    micro = GLOBAL_BATCH // nproc // stage.get("grad_accum_steps", 1)
    pretrain = {"kind": "pretrain", "max_steps": MAX_STEPS, "micro_batch_size": micro,
                "log_every": 1, "eval_every": 100, "checkpoint_every": SAVED_STEP,
                "keep_checkpoints": 10, "schedule": {"warmup_steps": 0},
                "optim": {"lr": 0.05}, **stage}  # fmt: skip
    return {"name": "elastic", "run_dir": str(run_dir), "launch": {"nproc": nproc, **launch},
            "tracking": {"mode": "disabled"}, "stages": {"pretrain": pretrain}}  # fmt: skip


def stage_context(run_dir: Path, launch: dict, nproc: int, **stage: Any) -> StageContext:
    """The pretrain stage's context with the fingerprint the orchestrator would give it."""
    recipe = validate_recipe(recipe_data(run_dir, launch, nproc, **stage))
    fingerprint = fingerprints(recipe)["pretrain"]
    return StageContext(run_dir=run_dir, name="pretrain", recipe=recipe, fingerprint=fingerprint)


def toy_workload(cfg: Any) -> Any:
    """A small MLP regression; step s trains on global rows 8s..8s+7 whatever the ranks and
    accumulation (each micro batch takes its contiguous block)."""
    import torch

    from pipeline.train.loop import Workload

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def batch(step: int, micro: int, rank: int, world: int) -> np.ndarray:
        rows = np.random.default_rng([11, step]).normal(size=(GLOBAL_BATCH, 5))
        start = (micro * world + rank) * cfg.micro_batch_size
        return rows[start : start + cfg.micro_batch_size].astype(np.float32)

    def loss(model: torch.nn.Module, rows: torch.Tensor, generator: object) -> tuple:
        target = torch.sin(rows[:, 4:] * 3)
        return ((model(rows[:, :4]) - target) ** 2).mean(), {}

    val = [np.ones((4, 5), dtype=np.float32)]
    return Workload(model, loss, batch, lambda rank, world: val, "rows", [])


def train_toy(run_dir: Path, launch: dict, nproc: int, stage: dict[str, Any]) -> dict:
    """Train the toy workload through the loop on this rank; summary figures a test reads."""
    from pipeline.train.loop import train

    ctx = stage_context(run_dir, launch, nproc, **stage)
    summary = train(ctx, ctx.config, toy_workload(ctx.config)).summary  # type: ignore[arg-type]
    return {k: v for k, v in summary.items() if k in ("train_loss", "resume_loss_diff")}


def losses(run_dir: Path) -> dict[int, float]:
    """{step: train loss} from the stage's metrics.jsonl."""
    rows = read_metrics(run_dir / "pretrain")
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def run(run_dir: Path, launch: dict, nproc: int, **stage: Any) -> dict[int, float]:
    """Train on `nproc` real ranks (gloo); the logged losses."""
    run_distributed(train_toy, run_dir, launch, nproc, stage, world_size=nproc)
    return losses(run_dir)


def resume_from(source: Path, run_dir: Path, launch: dict, nproc: int, **stage: Any) -> dict:
    """Copy `source`'s checkpoint of SAVED_STEP alone (the later one lost) and resume it."""
    name = f"step_{SAVED_STEP:08d}"
    shutil.copytree(source / "pretrain" / "checkpoints" / name,
                    run_dir / "pretrain" / "checkpoints" / name)  # fmt: skip
    return run(run_dir, launch, nproc, **stage)


def max_diff(resumed: dict[int, float], reference: dict[int, float]) -> float:
    """Largest loss difference over the resumed steps; that the run logged exactly the steps after
    SAVED_STEP shows it resumed (a fresh start would log from step 1)."""
    assert sorted(resumed) == list(range(SAVED_STEP + 1, MAX_STEPS + 1))
    return max(abs(resumed[s] - reference[s]) for s in resumed)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """reference(engine, nproc): the losses of an uninterrupted run, and its run dir (cached)."""
    root, done = tmp_path_factory.mktemp("elastic"), {}

    def get(engine: str, nproc: int) -> tuple[dict[int, float], Path]:
        if (engine, nproc) not in done:
            run_dir = root / f"{engine}_{nproc}"
            done[engine, nproc] = run(run_dir, ENGINES[engine], nproc), run_dir
        return done[engine, nproc]

    return get


def test_elastic_fingerprint_covers_the_global_batch_not_its_factors(tmp_path: Path) -> None:
    def fingerprint(nproc: int, **stage: Any) -> str:
        return stage_context(tmp_path, ENGINES["ddp"], nproc, **stage).fingerprint

    two_ranks = fingerprint(2)
    assert fingerprint(1) == two_ranks  # 2 x 4 and 1 x 8: one stage, its checkpoints resume
    assert fingerprint(1, grad_accum_steps=2) == two_ranks  # 1 x 4 x 2 accumulation steps
    assert fingerprint(2, micro_batch_size=8) != two_ranks  # a global batch of 16: another stage
    assert fingerprint(2, max_steps=MAX_STEPS + 1) != two_ranks
    assert fingerprint(2, checkpoint_async=True) == two_ranks  # how it saves, not what


@pytest.mark.parametrize(
    "engine",
    ["ddp", "fsdp", *(pytest.param(e, marks=pytest.mark.slow) for e in ("zero2", "zero3"))],
)
def test_elastic_resume_from_2_ranks_on_1(tmp_path: Path, reference: Any, engine: str) -> None:
    losses_2, run_2 = reference(engine, 2)
    resumed = resume_from(run_2, tmp_path, ENGINES[engine], 1)
    diff = max_diff(resumed, losses_2)
    print(f"elastic {engine} 2 -> 1 ranks: max loss diff {diff:.3g}")
    assert diff <= TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("engine", list(ENGINES))
def test_elastic_resume_from_1_rank_on_2(tmp_path: Path, reference: Any, engine: str) -> None:
    """1 rank with 2 accumulation steps of 4 -> 2 ranks of 4: the same global batch of 8."""
    losses_2, _ = reference(engine, 2)
    source = tmp_path / "one"
    run(source, ENGINES[engine], 1, grad_accum_steps=2)
    resumed = resume_from(source, tmp_path / "two", ENGINES[engine], 2)
    diff = max_diff(resumed, losses_2)
    print(f"elastic {engine} 1 -> 2 ranks: max loss diff {diff:.3g}")
    assert diff <= TOLERANCE
