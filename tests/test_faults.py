"""kill -9 at each phase of a stage's life (pipeline/engine/faults.py: PIPELINE_FAULT kills the
whole run with SIGKILL at a named point), then a plain rerun: no manifest ever says done over
partial outputs, no rank outlives the kill, and the rerun ends with the same export, bit for
bit, as an uninterrupted run. A killed run starts from its reference's run dir without the
stage under test, so only that stage runs (and is killed) again."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from data_prep.sources import stdlib_documents
from pipeline.engine.faults import ENV
from pipeline.engine.manifest import read_manifest
from pipeline.engine.tracking import read_metrics
from tests.helpers import cli, is_running, tiny_recipe, write_recipe

pytestmark = pytest.mark.e2e  # every test here runs `pipeline` in a subprocess

# stage kind -> (phase, pass) cases; a pass counts the times the stage reaches the point.
PRETRAIN_DDP = [("mid_step", 5), ("checkpoint_save", 2), ("export_write", 1), ("manifest_write", 2)]
PRETRAIN_ZERO3 = [("mid_step", 3), ("checkpoint_save", 1)]
SFT = [("mid_step", 3), ("manifest_write", 2)]  # TRL saves its own checkpoints
RLHF = [("mid_step", 3)]  # GRPO's own state; its manifest_write is SFT's (the same TRL fit)
# tokenize: (parts, phase, pass); one process passes data_write at each of ~22 shard commits,
# parts > 1 once, when every part is encoded and none merged.
TOKENIZE = [(1, "data_write", 10), (1, "manifest_write", 2), (2, "data_write", 1)]
DIFFUSION = [("mid_step", 5), ("export_write", 1), ("manifest_write", 2)]  # saves: pretrain's
# Files that name the run, not the model: provenance.json records git's dirty flag (which may
# change between runs), training_args.bin (TRL) the checkpoint dir's absolute path.
LEFT_OUT = ("provenance.json", "training_args.bin")
BEFORE_EXPORT = ("data_write", "mid_step", "checkpoint_save", "export_write")


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


def _sft_recipe(run_dir: Path) -> dict[str, Any]:
    return _recipe(run_dir, {"nproc": 1}, sft=True)


def _rlhf_recipe(run_dir: Path) -> dict[str, Any]:
    """The SFT recipe, then 4 GRPO steps on the same task, a checkpoint every 2."""
    data = _sft_recipe(run_dir)
    data["stages"]["rlhf"] = {
        "kind": "rlhf", "after": ["sft"], "algorithm": "grpo", "max_steps": 4,
        "num_examples": 32, "micro_batch_size": 8, "num_generations": 4,
        "max_completion_length": 4, "rewards": ["exact", "partial", "format"],
        "optim": {"lr": 1e-3}, "checkpoint_every": 2, "log_every": 1, "eval_problems": 4,
        "task": data["stages"]["sft"]["task"],
    }  # fmt: skip
    return data


def _tokenize_recipe(run_dir: Path, corpus: Path, parts: int = 1) -> dict[str, Any]:
    """The tiny tokenizer, then tokenize `corpus` (thousands of documents) into ~22 shards."""
    data = tiny_recipe(run_dir)
    source = {"uri": str(corpus)}
    tokenize = data["stages"]["tokenize"] | {"source": source, "shard_tokens": 9000, "parts": parts}
    data["stages"] = {"tokenizer": data["stages"]["tokenizer"], "tokenize": tokenize}
    return data


def _diffusion_recipe(run_dir: Path) -> dict[str, Any]:
    """8x8 digits -> a tiny DiT (flow matching, EMA), 8 steps, a checkpoint every 2."""
    diffusion = {
        "kind": "diffusion", "after": ["images"],
        "model": {"arch": "dit", "hidden_size": 32, "num_layers": 2, "num_heads": 2},
        "micro_batch_size": 32, "max_steps": 8, "optim": {"lr": 2e-3},
        "schedule": {"warmup_steps": 2}, "ema_decay": 0.9, "log_every": 2, "eval_every": 4,
        "checkpoint_every": 2, "keep_checkpoints": 5, "cpu_threads": 1,
    }  # fmt: skip
    return {
        "name": "tiny-diffusion",
        "run_dir": str(run_dir),
        "tracking": {"mode": "disabled"},
        "launch": {"nproc": 1},
        "stages": {
            "images": {"kind": "images", "source": {"uri": "builtin:digits", "max_images": 300}},
            "diffusion": diffusion,
        },
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 300 KB of stdlib source as blank-line separated paragraphs (one document each)."""
    path, size = tmp_path_factory.mktemp("corpus") / "corpus.txt", 0
    with path.open("w", encoding="utf-8") as f:
        for doc in stdlib_documents():
            f.write(doc + "\n\n")
            if (size := size + len(doc)) >= 300_000:
                break
    return path


def _run(
    base: Path, start: Path | None, name: str, data_for: Any, fault: str | None, leave_out: str = ""
) -> tuple[Path, Path, Any]:
    """`pipeline run` of `data_for(run_dir)` in a copy of the run dir `start` (None: a new run
    dir) without its stage `leave_out`."""
    run_dir = base / name
    if start is not None:
        shutil.copytree(start, run_dir, ignore=lambda d, _: [leave_out] if d == str(start) else [])
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


def _export(export: Path) -> dict[str, bytes]:
    """Every file of an export (weights, configs, tokenizer, shards, indexes) and its bytes."""
    return {
        str(p.relative_to(export)): p.read_bytes()
        for p in sorted(export.rglob("*"))
        if p.is_file() and p.name not in LEFT_OUT
    }


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The uninterrupted run of each configuration, made once: key -> run dir. It starts from a
    copy of the run dir `start` (`prepared`, another reference) or, with None, from nothing."""
    made: dict[str, Path] = {}

    def reference(key: str, data_for: Any, start: Path | None) -> Path:
        if key not in made:
            base = tmp_path_factory.mktemp(f"reference-{key}")
            made[key], _, result = _run(base, start, "reference", data_for, None)
            assert result.returncode == 0, result.stderr[-2000:]
        return made[key]

    return reference


def _kill(tmp_path: Path, reference: Path, data_for: Any, fault: str) -> tuple[Path, Path]:
    """The stage of `fault` (stage:point:pass), the last of its recipe, run from the reference's
    run dir without it, and killed."""
    stage, phase, _ = fault.split(":")
    killed, path, result = _run(tmp_path, reference, "killed", data_for, fault, leave_out=stage)
    assert result.returncode == -9, (result.returncode, result.stderr[-2000:])
    assert _processes_of(killed) == []  # no rank outlived its launcher
    assert read_manifest(killed / stage).get("status") == "running"  # never done over partials
    if phase in BEFORE_EXPORT:
        assert not (killed / stage / "export").exists()
    return killed, path


def _rerun_equals(reference: Path, killed: Path, path: Path, stage: str) -> None:
    """A plain rerun ends done, with the reference's export byte for byte."""
    rerun = cli("run", str(path))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert read_manifest(killed / stage)["status"] == "done"
    expected, got = _export(reference / stage / "export"), _export(killed / stage / "export")
    assert expected.keys() == got.keys()
    assert [name for name in expected if expected[name] != got[name]] == []


def _kill_then_rerun(
    tmp_path: Path, reference: Path, data_for: Any, stage: str, phase: str, nth: int
) -> Path:
    """Killed run, rerun, compared with the uninterrupted `reference`; the checks every fault
    case shares. The killed (and rerun) run dir."""
    killed, path = _kill(tmp_path, reference, data_for, f"{stage}:{phase}:{nth}")
    _rerun_equals(reference, killed, path, stage)
    return killed


@pytest.mark.parametrize(("phase", "nth"), PRETRAIN_DDP)
def test_fault_pretrain_ddp_kill_9_then_rerun_equals_uninterrupted(
    tmp_path: Path, prepared: Path, references: Any, phase: str, nth: int
) -> None:
    data_for = lambda run_dir: _recipe(run_dir, {"nproc": 2})  # noqa: E731
    reference = references("ddp", data_for, prepared)
    _kill_then_rerun(tmp_path, reference, data_for, "pretrain", phase, nth)


def test_fault_truncated_newest_checkpoint_falls_back_to_the_previous_one(
    tmp_path: Path, prepared: Path, references: Any
) -> None:
    data_for = lambda run_dir: _recipe(run_dir, {"nproc": 2})  # noqa: E731
    reference = references("ddp", data_for, prepared)
    killed, path = _kill(tmp_path, reference, data_for, "pretrain:mid_step:5")
    checkpoints = sorted((killed / "pretrain" / "checkpoints").glob("step_*"))
    assert [p.name for p in checkpoints] == ["step_00000002", "step_00000004"]
    weights = checkpoints[-1] / "model.safetensors"
    with weights.open("r+b") as f:  # a disk that filled up, a copy cut short
        f.truncate(weights.stat().st_size // 2)
    _rerun_equals(reference, killed, path, "pretrain")
    log = (killed / "pretrain" / "stage.log").read_text()
    assert "checkpoint step_00000004: model.safetensors is damaged" in log
    assert "resuming from step_00000002 (step 2" in log


@pytest.mark.slow
@pytest.mark.parametrize(("phase", "nth"), PRETRAIN_ZERO3)
def test_fault_pretrain_zero3_kill_9_then_rerun_equals_uninterrupted(
    tmp_path: Path, prepared: Path, references: Any, phase: str, nth: int
) -> None:
    zero3 = {"nproc": 2, "engine": "deepspeed", "zero_stage": 3}
    data_for = lambda run_dir: _recipe(run_dir, zero3)  # noqa: E731
    reference = references("zero3", data_for, prepared)
    _kill_then_rerun(tmp_path, reference, data_for, "pretrain", phase, nth)


@pytest.mark.slow
@pytest.mark.parametrize(("phase", "nth"), SFT)
def test_fault_sft_kill_9_then_rerun_equals_uninterrupted(
    tmp_path: Path, prepared: Path, references: Any, phase: str, nth: int
) -> None:
    reference = references("sft", _sft_recipe, prepared)
    _kill_then_rerun(tmp_path, reference, _sft_recipe, "sft", phase, nth)


@pytest.mark.parametrize(("phase", "nth"), RLHF)
def test_fault_rlhf_grpo_kill_9_then_rerun_equals_uninterrupted(
    tmp_path: Path, prepared: Path, references: Any, phase: str, nth: int
) -> None:
    reference = references("rlhf", _rlhf_recipe, references("sft", _sft_recipe, prepared))
    # The replayed steps learn something (a zero gradient would make any resume look exact).
    grads = [r.get("train/grad_norm") for r in read_metrics(reference / "rlhf") if r["step"] > 2]
    assert any(grads), grads
    killed = _kill_then_rerun(tmp_path, reference, _rlhf_recipe, "rlhf", phase, nth)
    if phase == "mid_step":
        assert "resuming from checkpoint-2" in (killed / "rlhf" / "stage.log").read_text()


@pytest.mark.parametrize(("parts", "phase", "nth"), TOKENIZE)
def test_fault_tokenize_kill_9_then_rerun_equals_uninterrupted(
    tmp_path: Path, prepared: Path, references: Any, corpus: Path, parts: int, phase: str, nth: int
) -> None:
    """The reference is always one process: parts, killed or not, give its bytes."""
    reference = references("tokenize", lambda run_dir: _tokenize_recipe(run_dir, corpus), prepared)
    data_for = lambda run_dir: _tokenize_recipe(run_dir, corpus, parts)  # noqa: E731
    killed = _kill_then_rerun(tmp_path, reference, data_for, "tokenize", phase, nth)
    shards = [name for name in _export(killed / "tokenize" / "export") if name.startswith("train")]
    assert len(shards) >= 2 * 20  # .bin and .json of each
    if parts > 1:  # the rerun merged the parts the killed run had encoded
        assert (killed / "tokenize" / "stage.log").read_text().count("encoding parts") == 1
    else:  # the documents of committed shards were skipped, not encoded again
        resumed = read_manifest(killed / "tokenize")["summary"]["resumed_documents"]
        assert (resumed > 0) == (phase == "data_write")


@pytest.mark.parametrize(("phase", "nth"), DIFFUSION)
def test_fault_diffusion_kill_9_then_rerun_equals_uninterrupted(
    tmp_path: Path, references: Any, phase: str, nth: int
) -> None:
    reference = references("diffusion", _diffusion_recipe, None)
    _kill_then_rerun(tmp_path, reference, _diffusion_recipe, "diffusion", phase, nth)
