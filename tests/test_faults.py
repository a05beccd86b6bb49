"""kill -9 at each phase of a stage's life (pipeline/engine/faults.py: PIPELINE_FAULT kills the
whole run with SIGKILL at a named point), then a plain rerun: no manifest ever says done over
partial outputs, no rank outlives the kill, and the rerun ends with the same export, bit for
bit, as an uninterrupted run."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.engine.faults import ENV
from pipeline.engine.manifest import read_manifest
from tests.helpers import cli, is_running, tiny_recipe, write_recipe

pytestmark = pytest.mark.e2e  # every test here runs `pipeline` in a subprocess

# stage kind -> (phase, pass) cases; a pass counts the times the stage reaches the point.
PRETRAIN_DDP = [("mid_step", 5), ("checkpoint_save", 2), ("export_write", 1), ("manifest_write", 2)]
PRETRAIN_ZERO3 = [("mid_step", 3), ("checkpoint_save", 1)]
SFT = [("mid_step", 3), ("manifest_write", 2)]  # TRL saves its own checkpoints


def _recipe(run_dir: Path, launch: dict[str, Any], sft: bool = False) -> dict[str, Any]:
    data = tiny_recipe(run_dir)
    del data["stages"]["eval"]
    data["stages"]["pretrain"] |= {"launch": launch, "checkpoint_every": 2, "keep_checkpoints": 5}
    if sft:
        data["stages"]["sft"] = {
            "kind": "sft", "after": ["pretrain"], "max_steps": 6, "num_examples": 64,
            "micro_batch_size": 8, "checkpoint_every": 2, "eval_problems": 4,
            "task": {"name": "arithmetic", "max_operand": 20, "operators": ["+", "-"]},
        }  # fmt: skip
    return data


def _run(
    base: Path, prepared: Path, name: str, data_for: Any, fault: str | None
) -> tuple[Path, Path, Any]:
    run_dir = base / name
    shutil.copytree(prepared, run_dir)
    path = write_recipe(base / f"{name}.yaml", data_for(run_dir))
    with pytest.MonkeyPatch.context() as patch:
        if fault:
            patch.setenv(ENV, fault)
        return run_dir, path, cli("run", str(path))


def _processes_of(run_dir: Path, within_s: float = 5.0) -> list[Any]:
    """Processes whose command line names `run_dir` (ranks are started with it), once those
    that are dying have had `within_s` to go."""
    import psutil

    deadline = time.time() + within_s
    while True:
        alive = [
            p for p in psutil.process_iter(["cmdline"])
            if str(run_dir) in " ".join(p.info["cmdline"] or []) and is_running(p)
        ]  # fmt: skip
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.1)


def _weights(export: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(export / "model.safetensors")


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory, prepared: Path) -> Any:
    """The uninterrupted run of each configuration, made once: key -> run dir."""
    made: dict[str, Path] = {}

    def reference(key: str, data_for: Any) -> Path:
        if key not in made:
            base = tmp_path_factory.mktemp(f"reference-{key}")
            made[key], _, result = _run(base, prepared, "reference", data_for, None)
            assert result.returncode == 0, result.stderr[-2000:]
        return made[key]

    return reference


def _kill_then_rerun(
    tmp_path: Path, prepared: Path, reference: Path, data_for: Any, stage: str, phase: str, nth: int
) -> None:
    """Killed run, rerun, compared with the uninterrupted `reference`; the checks every fault
    case shares."""
    import torch

    killed, path, result = _run(tmp_path, prepared, "killed", data_for, f"{stage}:{phase}:{nth}")
    assert result.returncode == -9, (result.returncode, result.stderr[-2000:])
    assert _processes_of(killed) == []  # no rank outlived its launcher
    assert read_manifest(killed / stage).get("status") == "running"  # never done over partials
    if phase in ("mid_step", "checkpoint_save", "export_write"):
        assert not (killed / stage / "export").exists()
    rerun = cli("run", str(path))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert read_manifest(killed / stage)["status"] == "done"
    expected, got = _weights(reference / stage / "export"), _weights(killed / stage / "export")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected), f"{stage} {phase}"


@pytest.mark.parametrize(("phase", "nth"), PRETRAIN_DDP)
def test_fault_pretrain_ddp_kill_9_then_rerun_equals_uninterrupted(
    tmp_path: Path, prepared: Path, references: Any, phase: str, nth: int
) -> None:
    data_for = lambda run_dir: _recipe(run_dir, {"nproc": 2})  # noqa: E731
    reference = references("ddp", data_for)
    _kill_then_rerun(tmp_path, prepared, reference, data_for, "pretrain", phase, nth)


@pytest.mark.slow
@pytest.mark.parametrize(("phase", "nth"), PRETRAIN_ZERO3)
def test_fault_pretrain_zero3_kill_9_then_rerun_equals_uninterrupted(
    tmp_path: Path, prepared: Path, references: Any, phase: str, nth: int
) -> None:
    zero3 = {"nproc": 2, "engine": "deepspeed", "zero_stage": 3}
    data_for = lambda run_dir: _recipe(run_dir, zero3)  # noqa: E731
    reference = references("zero3", data_for)
    _kill_then_rerun(tmp_path, prepared, reference, data_for, "pretrain", phase, nth)


@pytest.mark.slow
@pytest.mark.parametrize(("phase", "nth"), SFT)
def test_fault_sft_kill_9_then_rerun_equals_uninterrupted(
    tmp_path: Path, prepared: Path, references: Any, phase: str, nth: int
) -> None:
    data_for = lambda run_dir: _recipe(run_dir, {"nproc": 1}, sft=True)  # noqa: E731
    reference = references("sft", data_for)
    _kill_then_rerun(tmp_path, prepared, reference, data_for, "sft", phase, nth)
