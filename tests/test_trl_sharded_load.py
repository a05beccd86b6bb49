"""Loading at scale in the TRL stages: under FSDP2 and ZeRO-3 the policy of sft and rlhf, GRPO's
reference model and the reward stage's sequence classifier (full fine-tuning) are built sharded
and streamed in from their directory (pipeline.train.trl_load), and training is unchanged by it.

The tiny Qwen2 directory (tied embeddings, tests/hf_models.py) is fine-tuned for 4 steps with a
global batch of 4 by one process and by 2 gloo processes under each engine, and a reward model is
trained from it the same way; then GRPO (beta 0.1: TRL keeps a reference model, which DDP loads
through TRL's own factory) runs from the SFT export under DDP, FSDP2 and ZeRO-3. Measured in fp32
on 2 cores (allowed in brackets): SFT and reward losses against one process relative 2e-7 (1e-5);
exported weights 2e-7 (1e-5); GRPO rewards equal to DDP's (relative 1e-6), KL to 2.2e-8
(absolute 1e-7; 3.7e-6 of values near 0.006). The memory this saves is what
`bench/load_memory.py --modes trl-naive trl-zero3` measures (0.54x / 0.57x of the model's bytes
per rank against 1.00x); a test cannot measure it reliably on a shared 2-core machine.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import cli, run_killed_at, runs_on_first_use, write_recipe
from tests.test_lora_launch import series, stage_dir

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # 2-process runs: about 4 min for the module

LAUNCHES = {
    "one": {"nproc": 1},
    "ddp": {"nproc": 2, "engine": "ddp"},
    "fsdp": {"nproc": 2, "engine": "fsdp"},
    "zero3": {"nproc": 2, "engine": "deepspeed", "zero_stage": 3},
}
LOADED = {"fsdp": "sharded over 2 ranks (FSDP2)", "zero3": "partitioned over 2 ranks (ZeRO-3)"}
LENGTH_REWARD = "tests.helpers:completion_length_reward"


def full_recipe(root: Path, model_dir: Path, name: str) -> dict[str, Any]:
    """Full SFT (checkpoints at 2 and 4) and, with 2 processes, full GRPO from its export."""
    launch = LAUNCHES[name]
    common = {"max_steps": 4, "num_examples": 32, "micro_batch_size": 4 // launch["nproc"],
              "log_every": 1, "eval_problems": 0, "optim": {"lr": 1e-3}}  # fmt: skip
    stages: dict[str, Any] = {
        "sft": {"kind": "sft", "model": {"path": str(model_dir)}, "max_length": 32,
                "checkpoint_every": 2, "keep_checkpoints": 2, **common},
        "reward": {"kind": "reward", "model": {"path": str(model_dir)}, "max_length": 32,
                   **common, "eval_pairs": 4},
    }  # fmt: skip
    del stages["reward"]["eval_problems"]  # a reward model is scored on pairs
    if launch["nproc"] > 1:
        stages["rlhf"] = {"kind": "rlhf", "after": ["sft"], "num_generations": 2, "beta": 0.1,
                          "max_completion_length": 4, "rewards": [LENGTH_REWARD],
                          "checkpoint_every": 1000, **common}  # fmt: skip
    return {"name": f"full-{name}", "run_dir": str(root / "run"),
            "tracking": {"mode": "disabled"}, "launch": launch, "stages": stages}  # fmt: skip


@pytest.fixture(scope="module")
def full_runs(
    qwen2_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], dict[str, Any]]:
    """`full_recipe` of a launch, run by the CLI on first use; its recipe dict."""
    return runs_on_first_use(
        lambda name: tmp_path_factory.mktemp(f"full-{name}"),
        lambda root, name: full_recipe(root, qwen2_dir, name),
    )


def export_weights(recipe: dict[str, Any], stage: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(stage_dir(recipe, stage) / "export" / "model.safetensors")


@pytest.mark.parametrize("launch", list(LOADED))
def test_sharded_load_trains_as_one_process(
    full_runs: Callable[[str], dict[str, Any]], launch: str
) -> None:
    """The policy, GRPO's reference and the reward model were loaded sharded (the stage says
    so), and SFT's and the reward model's losses and exported weights are those of one process;
    GRPO from it gives DDP's rewards and KL."""
    import torch

    one, ddp, run = full_runs("one"), full_runs("ddp"), full_runs(launch)
    for stage, loads in (("sft", 1), ("reward", 1), ("rlhf", 2)):  # rlhf: policy and reference
        assert (stage_dir(run, stage) / "stage.log").read_text().count(LOADED[launch]) == loads
        assert "over 2 ranks" not in (stage_dir(ddp, stage) / "stage.log").read_text(), stage
    assert "reference model" in (stage_dir(run, "rlhf") / "stage.log").read_text()
    for stage in ("sft", "reward"):
        expected = series(one, stage, "loss")
        assert len(expected) == 4 and len(set(expected)) > 1
        assert series(run, stage, "loss") == pytest.approx(expected, rel=1e-5), stage
    reward_head = export_weights(one, "reward")["score.weight"]
    torch.testing.assert_close(export_weights(run, "reward")["score.weight"], reward_head)
    reference = export_weights(one, "sft")
    got = export_weights(run, "sft")
    # FSDP2's gathered state dict holds the tied lm_head as a copy of the embedding, which
    # save_pretrained then keeps (as before this loader; from_pretrained ties it again).
    assert set(got) - set(reference) <= ({"lm_head.weight"} if launch == "fsdp" else set())
    assert set(reference) <= set(got)
    if "lm_head.weight" in got:
        assert torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])
    for name, tensor in reference.items():
        torch.testing.assert_close(got[name].float(), tensor.float(), atol=1e-5, rtol=0, msg=name)
    # KL is a difference of nearly equal log-probabilities: its relative error is the larger
    for key, tolerance in (("reward", {"rel": 1e-6}), ("kl", {"rel": 1e-6, "abs": 1e-7})):
        expected = series(ddp, "rlhf", key)
        assert len(expected) == 4 and any(expected), key
        assert series(run, "rlhf", key) == pytest.approx(expected, **tolerance), key


def test_sharded_full_sft_resumes_exactly_after_kill(
    full_runs: Callable[[str], dict[str, Any]], tmp_path: Path
) -> None:
    """FSDP2, killed (SIGKILL) after its first checkpoint and rerun: the resumed trainer loads
    the checkpoint into the model trl_load sharded, and ends with the uninterrupted run's
    weights, bit for bit."""
    import torch

    reference = full_runs("fsdp")
    recipe = {**reference, "run_dir": str(tmp_path / "run")}
    recipe["stages"] = {"sft": reference["stages"]["sft"]}
    path = write_recipe(tmp_path / "killed.yaml", recipe)
    # Killed in step 3 (after its backward): both ranks finished saving checkpoint-2 (step 3's
    # collectives wait for them) and none began checkpoint-4.
    run_killed_at(path, tmp_path / "run", "sft:mid_step:3")
    result = cli("run", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from checkpoint-2" in (stage_dir(recipe, "sft") / "stage.log").read_text()
    expected, got = export_weights(reference, "sft"), export_weights(recipe, "sft")
    assert all(torch.equal(got[k], expected[k]) for k in expected)
