"""Test helpers: a tiny recipe on real built-in data, and ways to run the real CLI in a process.

Fixtures live in conftest.py; everything a test imports lives here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
# conftest sets this for each test: only tests marked e2e or slow may start `pipeline` processes,
# so the fast tier (`-m "not slow and not e2e"`) never does.
subprocess_allowed = True


def _require_e2e_marker() -> None:
    if not subprocess_allowed:
        raise AssertionError(
            "this test runs the pipeline CLI in a subprocess: mark it @pytest.mark.e2e"
        )


def tiny_recipe(run_dir: Path, *, nproc: int = 1, tracking: str = "disabled") -> dict[str, Any]:
    """tokenizer -> tokenize -> pretrain -> eval on ~300 KB of the stdlib; seconds on a CPU."""
    source = {"uri": "builtin:python-stdlib", "max_bytes": 300_000}
    return {
        "name": "tiny",
        "run_dir": str(run_dir),
        "tracking": {"mode": tracking},
        "launch": {"nproc": nproc},
        "stages": {
            "tokenizer": {
                "kind": "tokenizer",
                "source": source,
                "vocab_size": 400,
                "sample_bytes": 300_000,
            },
            "tokenize": {
                "kind": "tokenize",
                "after": ["tokenizer"],
                "source": source,
                "num_workers": 1,
            },
            "pretrain": {
                "kind": "pretrain",
                "after": ["tokenize"],
                "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2},
                "seq_len": 32,
                "micro_batch_size": 4,
                "max_steps": 8,
                "schedule": {"warmup_steps": 2},
                "log_every": 2,
                "eval_every": 4,
                "eval_batches": 2,
                "checkpoint_every": 2,
                "keep_checkpoints": 2,
            },
            "eval": {
                "kind": "eval",
                "after": ["pretrain"],
                "max_tokens": 2000,
                "max_new_tokens": 4,
                "prompts": ["def "],
            },
        },
    }


def write_recipe(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def cli(
    *args: str,
    cwd: Path | None = None,
    timeout: float = 600,
    extra_env: dict[str, str] | None = None,
    **popen: Any,
) -> subprocess.CompletedProcess:
    """Run `pipeline ARGS` as a user would, in a fresh process (`extra_env` added to its
    environment)."""
    _require_e2e_marker()
    env = {**os.environ, "WANDB_SILENT": "true", **(extra_env or {})}
    try:
        return subprocess.run(
            [sys.executable, "-m", "pipeline.cli", *args],
            cwd=cwd or ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            **popen,
        )
    except subprocess.TimeoutExpired as exc:  # say where it hung, not only that it did
        said = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr
        raise AssertionError(
            f"`pipeline {' '.join(args)}` ran past {timeout:.0f} s; its stderr ends:\n"
            f"{(said or '')[-3000:]}"
        ) from None


def kill_then_resume(tmp_path: Path, recipe: dict[str, Any], kill_when: str) -> tuple[Path, Path]:
    """Run `recipe` uninterrupted, and again killed with SIGKILL (whole process group) as soon as
    `kill_when` (a path inside the run dir) exists, then rerun it to completion.

    Returns (reference run dir, resumed run dir).
    """
    reference, killed = tmp_path / "runs" / "reference", tmp_path / "runs" / "killed"
    result = cli(
        "run", str(write_recipe(tmp_path / "reference.yaml", {**recipe, "run_dir": str(reference)}))
    )
    assert result.returncode == 0, result.stderr
    path = write_recipe(tmp_path / "killed.yaml", {**recipe, "run_dir": str(killed)})
    run_until(path, killed, kill_when)
    result = cli("run", str(path))
    assert result.returncode == 0, result.stderr
    return reference, killed


def run_until(path: Path, run_dir: Path, kill_when: str | list[str]) -> None:
    """`pipeline run path`, killed with SIGKILL (whole process group) once `run_dir/kill_when`
    exists (every one of them, for a list); checks that the stage was left running, without an
    export."""
    from pipeline.engine.manifest import read_manifest

    _require_e2e_marker()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", str(path)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    paths = [kill_when] if isinstance(kill_when, str) else kill_when
    while time.time() < deadline and not all((run_dir / p).exists() for p in paths):
        assert proc.poll() is None, "run finished before it could be killed"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    stage = paths[0].split("/")[0]
    assert read_manifest(run_dir / stage)["status"] == "running"
    assert not (run_dir / stage / "export").exists()


def run_killed_at(path: Path, run_dir: Path, fault: str) -> None:
    """`pipeline run path` killed with SIGKILL (the whole run) at `fault`, a PIPELINE_FAULT spec
    (pipeline/engine/faults.py: `<stage>:<point>[:<n>]`); checks that the stage was left
    running, without an export. Unlike a kill from outside, the moment does not depend on how
    fast this process notices a file on a busy machine."""
    from pipeline.engine.faults import ENV
    from pipeline.engine.manifest import read_manifest

    result = cli("run", str(path), extra_env={ENV: fault})
    assert result.returncode != 0, "the run finished: the fault point was never reached"
    stage = fault.split(":")[0]
    assert read_manifest(run_dir / stage)["status"] == "running"
    assert not (run_dir / stage / "export").exists()


def start_run(path: Path) -> subprocess.Popen:
    """`pipeline run path` in the background, in a session of its own (stderr captured), so a
    test can signal the launcher alone, as a kill, the OOM killer or a Ctrl-C would."""
    _require_e2e_marker()
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", str(path)],
        cwd=ROOT,
        env={**os.environ, "WANDB_SILENT": "true"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until `path` exists while `proc` still runs."""
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended before {path} appeared: {proc.stderr.read()}"
        assert time.time() < deadline, f"{path} did not appear within {timeout}s"
        time.sleep(0.02)


def live_descendants(pid: int) -> list[Any]:
    """The processes started (directly or not) by `pid` that still run (psutil.Process list)."""
    import psutil

    return [p for p in psutil.Process(pid).children(recursive=True) if is_running(p)]


def is_running(proc: Any) -> bool:
    """Whether a psutil.Process still runs (a zombie does not)."""
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def completion_length_reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
    """A reward (TRL's signature) that varies between any two samples of an untrained model, so
    GRPO's advantages, and its updates, are never all zero: the completion's length in chars."""
    return [float(len(str(completion))) for completion in completions]


def wrong_answer_reward(
    prompts: list[Any], completions: list[Any], answer: list[Any], **_: Any
) -> list[float]:
    """A poisoned reward: 1 for a completion that does not start with the right answer."""
    from data_prep.task_base import completion_text

    return [
        0.0 if completion_text(c).strip().startswith(str(a)) else 1.0
        for c, a in zip(completions, answer, strict=True)
    ]


def run_in_process(argv: list[str], capsys: Any) -> tuple[int, str]:
    """(exit code, stderr) of `pipeline ARGV` in this process (capsys: pytest's fixture)."""
    from pipeline.cli import main

    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def runs_on_first_use(
    make_dir: Callable[[str], Path], make_recipe: Callable[[Path, str], dict[str, Any]]
) -> Callable[[str], dict[str, Any]]:
    """`get(name)`: the recipe `make_recipe(root, name)` (root: `make_dir(name)`), run by the CLI
    the first time it is asked for, and its recipe dict; a failed run fails each test asking."""
    import pytest

    runs: dict[str, dict[str, Any] | str] = {}  # a name's recipe, or why its run failed

    def get(name: str) -> dict[str, Any]:
        if name not in runs:
            root = make_dir(name)
            recipe = make_recipe(root, name)
            result = cli("run", str(write_recipe(root / "recipe.yaml", recipe)))
            runs[name] = recipe if result.returncode == 0 else f"{name}: {result.stderr[-3000:]}"
        run = runs[name]
        if isinstance(run, str):
            pytest.fail(run)
        return run

    return get


REWARD_STEPS_ENV = "PIPELINE_TEST_REWARD_STEPS"


def wrong_answer_reward_by_rank(
    prompts: list[Any], completions: list[Any], answer: list[Any], **kwargs: Any
) -> list[float]:
    """wrong_answer_reward that also appends the step it scores (TRL's trainer_state) to
    `$PIPELINE_TEST_REWARD_STEPS/rank{RANK}.txt`: the steps each rank of a run trained."""
    folder = os.environ.get(REWARD_STEPS_ENV)
    if folder:
        path = Path(folder) / f"rank{os.environ.get('RANK', '0')}.txt"
        with path.open("a", encoding="utf-8") as f:
            f.write(f"{kwargs['trainer_state'].global_step}\n")
    return wrong_answer_reward(prompts, completions, answer)
