"""LoRA (peft) under every launch engine: 2 gloo processes with DDP, FSDP2 and DeepSpeed ZeRO-3
train the same rank-4 adapter as one process, export it (adapter/ beside the merged model) and
resume a killed run exactly.

Each launch runs SFT (LoRA) on the tiny Qwen2 directory (tests/hf_models.py), then GRPO (LoRA)
from its export; one process runs the same SFT with the same global batch (4 x 1 against 2 x 2).
Measured in fp32 on 2 cores (allowed in brackets): SFT losses and gradient norms of 2 processes against
one, relative 1.4e-7 (allowed 1e-5); adapter tensors 1.2e-7 (3e-6); the adapter on its base against
the merged export's logits 5e-7 (1e-5); GRPO rewards of FSDP2 and ZeRO-3 equal to DDP's
(relative 1e-6), adapters 3.7e-7 (1e-5).
A DeepSpeed run builds DeepSpeed's CPU communication op into ~/.cache/torch_extensions first
(about 65 s on 2 cores; once per virtual environment path).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline.engine.tracking import read_metrics
from tests.helpers import cli, run_killed_at, runs_on_first_use, write_recipe

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # 2-process runs: about 4 min for the module

LAUNCHES = {
    "ddp": {"nproc": 2, "engine": "ddp"},
    "fsdp": {"nproc": 2, "engine": "fsdp"},
    "zero3": {"nproc": 2, "engine": "deepspeed", "zero_stage": 3},
}
ONE = {"nproc": 1}
SHARDED = ["fsdp", "zero3"]
# How each launch's checkpoints hold the model: what shows the engine really ran.
CHECKPOINT_MARK = {"ddp": "optimizer.pt", "fsdp": "pytorch_model_fsdp_0", "zero3": "global_step2"}
LENGTH_REWARD = "tests.helpers:completion_length_reward"


def lora() -> dict[str, Any]:
    """A rank-4 LoRA adapter on the attention's query and value projections."""
    return {"kind": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def launch_recipe(root: Path, model_dir: Path, name: str) -> dict[str, Any]:
    """LoRA SFT (4 steps, a global batch of 4, checkpoints at 2 and 4), then with 2 processes
    LoRA GRPO from its export (2 prompts x 2 completions a step)."""
    launch = LAUNCHES.get(name, ONE)
    micro = 4 // launch["nproc"]
    common = {"adapter": lora(), "max_steps": 4, "num_examples": 32, "micro_batch_size": micro,
              "log_every": 1, "eval_problems": 0, "optim": {"lr": 1e-2}}  # fmt: skip
    stages: dict[str, Any] = {
        "sft": {"kind": "sft", "model": {"path": str(model_dir)}, "max_length": 32,
                "checkpoint_every": 2, "keep_checkpoints": 2, **common},
        # peft trains a copy of the score head (modules_to_save) beside the adapter
        "reward": {"kind": "reward", "model": {"path": str(model_dir)}, "max_length": 32,
                   **common, "eval_pairs": 4},
    }  # fmt: skip
    del stages["reward"]["eval_problems"]  # a reward model is scored on pairs
    if launch["nproc"] > 1:  # with a trained copy of the final norm (modules_to_save)
        stages["rlhf"] = {"kind": "rlhf", "after": ["sft"], "num_generations": 2,
                          "max_completion_length": 4, "rewards": [LENGTH_REWARD],
                          "checkpoint_every": 1000, **common,
                          "adapter": {**lora(), "modules_to_save": ["model.norm"]}}  # fmt: skip
    return {"name": f"lora-{name}", "run_dir": str(root / "run"),
            "tracking": {"mode": "disabled"}, "launch": launch, "stages": stages}  # fmt: skip


@pytest.fixture(scope="module")
def lora_runs(
    qwen2_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], dict[str, Any]]:
    """`launch_recipe` of a launch (or "one"), run by the CLI on first use; its recipe dict."""
    return runs_on_first_use(
        lambda name: tmp_path_factory.mktemp(f"lora-{name}"),
        lambda root, name: launch_recipe(root, qwen2_dir, name),
    )


def stage_dir(recipe: dict[str, Any], stage: str) -> Path:
    return Path(recipe["run_dir"]) / stage


def series(recipe: dict[str, Any], stage: str, key: str) -> list[float]:
    rows = read_metrics(stage_dir(recipe, stage))
    return [row[f"train/{key}"] for row in rows if f"train/{key}" in row]


def adapter_weights(export: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(export / "adapter" / "adapter_model.safetensors")


def assert_close_tensors(got: dict[str, Any], expected: dict[str, Any], atol: float) -> None:
    import torch

    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("launch", list(LAUNCHES))
def test_sft_matches_one_process(lora_runs: Callable[[str], dict[str, Any]], launch: str) -> None:
    """Same global batch, same losses, gradient norms and adapter as one process: the adapter's
    gradients are averaged over the ranks (a rank that trained alone on its half would differ at
    step 2, one that summed them would double the gradient norm)."""
    one, run = lora_runs("one"), lora_runs(launch)
    for key in ("loss", "grad_norm"):
        expected = series(one, "sft", key)
        assert len(expected) == 4
        assert series(run, "sft", key) == pytest.approx(expected, rel=1e-5, abs=1e-6), key
    one_adapter = adapter_weights(stage_dir(one, "sft") / "export")
    assert_close_tensors(adapter_weights(stage_dir(run, "sft") / "export"), one_adapter, 3e-6)
    # The engine asked for is the one that ran (its own checkpoint layout).
    assert (
        stage_dir(run, "sft") / "checkpoints" / "checkpoint-2" / CHECKPOINT_MARK[launch]
    ).exists()
    # Under ZeRO-3 and FSDP2 the base was sharded as it loaded (no rank held it whole; under
    # FSDP2 peft wrapped it first and adapter_init drew the LoRA weights on the shards), and the
    # run still matches one process: bench/load_memory.py measures the memory this saves.
    # With modules_to_save (the reward model's score head, rlhf's norm), FSDP2 fills peft's
    # copies from the files too; ZeRO-3 loads such a model whole (DeepSpeed partitions it at
    # initialize): peft would deepcopy partitioned modules.
    loaded = {"zero3": "partitioned over 2 ranks (ZeRO-3)", "fsdp": "sharded over 2 ranks (FSDP2)"}
    for stage in ("sft", "reward", "rlhf"):
        log = (stage_dir(run, stage) / "stage.log").read_text()
        if launch == "ddp" or (launch == "zero3" and stage != "sft"):
            assert "over 2 ranks" not in log, stage
        else:
            assert loaded[launch] in log, stage


@pytest.mark.parametrize("launch", list(LAUNCHES))
def test_reward_model_matches_one_process(
    lora_runs: Callable[[str], dict[str, Any]], launch: str
) -> None:
    """A LoRA reward model (the score head drawn by adapter_init.seed_head, the same on every
    engine, and trained as peft's copy) learns as one process does with the same global batch."""
    import torch
    from safetensors.torch import load_file

    one, run = lora_runs("one"), lora_runs(launch)
    expected = series(one, "reward", "loss")
    assert len(expected) == 4 and len(set(expected)) > 1
    assert series(run, "reward", "loss") == pytest.approx(expected, rel=1e-5), launch
    head = [load_file(stage_dir(r, "reward") / "export" / "model.safetensors")["score.weight"]
            for r in (one, run)]  # fmt: skip
    torch.testing.assert_close(head[1], head[0], atol=3e-6, rtol=0)


@pytest.mark.parametrize("stage", ["sft", "rlhf"])
@pytest.mark.parametrize("launch", list(LAUNCHES))
def test_adapter_on_its_base_gives_the_merged_models_logits(
    lora_runs: Callable[[str], dict[str, Any]], qwen2_dir: Path, launch: str, stage: str
) -> None:
    """PeftModel(base, export/adapter) and the merged export agree to 1e-5 in fp32 (merging only
    reassociates W x + s B (A x)); the adapter moved from its initialisation (lora_B starts at
    zero) and moves the logits by far more."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = lora_runs(launch)
    export = stage_dir(run, stage) / "export"
    lora_b = [t for name, t in adapter_weights(export).items() if "lora_B" in name]
    assert len(lora_b) == 4 and all(t.abs().max() > 1e-3 for t in lora_b)
    base_dir = stage_dir(run, "sft") / "export" if stage == "rlhf" else qwen2_dir
    merged = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 790, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = base(ids).logits
        adapted = PeftModel.from_pretrained(base, export / "adapter").eval()(ids).logits
        torch.testing.assert_close(adapted, merged(ids).logits, atol=1e-5, rtol=0)
    assert (adapted - before).abs().max() > 1e-2


@pytest.mark.parametrize("launch", SHARDED)
def test_grpo_matches_ddp(lora_runs: Callable[[str], dict[str, Any]], launch: str) -> None:
    """GRPO generates from the sharded policy (FSDP2 gathers each block in its forward, ZeRO-3
    gathers every parameter for generation): the same completions, so the same rewards, as DDP."""
    ddp, run = lora_runs("ddp"), lora_runs(launch)
    rewards = series(ddp, "rlhf", "reward")
    assert len(rewards) == 4 and len(set(rewards)) > 1  # samples differ from step to step
    assert series(run, "rlhf", "reward") == pytest.approx(rewards, rel=1e-6)
    expected = adapter_weights(stage_dir(ddp, "rlhf") / "export")
    assert_close_tensors(adapter_weights(stage_dir(run, "rlhf") / "export"), expected, 1e-5)


@pytest.mark.parametrize("launch", SHARDED)
def test_resume_after_kill_is_exact(
    lora_runs: Callable[[str], dict[str, Any]], tmp_path: Path, launch: str
) -> None:
    """Killed (SIGKILL) after its first sharded checkpoint and rerun, the SFT ends with the
    adapter and merged weights of the uninterrupted run, bit for bit."""
    import torch
    from safetensors.torch import load_file

    reference = lora_runs(launch)
    recipe = {**reference, "run_dir": str(tmp_path / "run")}
    recipe["stages"] = {"sft": reference["stages"]["sft"]}  # no upstream: the same fingerprint
    path = write_recipe(tmp_path / "killed.yaml", recipe)
    # Killed in step 3 (after its backward): both ranks finished saving checkpoint-2 (step 3's
    # collectives wait for them) and none began checkpoint-4.
    run_killed_at(path, tmp_path / "run", "sft:mid_step:3")
    result = cli("run", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = stage_dir(recipe, "sft")
    assert "resuming from checkpoint-2" in (resumed / "stage.log").read_text()
    for name in ("adapter/adapter_model.safetensors", "model.safetensors"):
        expected = load_file(stage_dir(reference, "sft") / "export" / name)
        got = load_file(resumed / "export" / name)
        assert list(got) == list(expected)
        assert all(torch.equal(got[k], expected[k]) for k in expected), name
