"""Engines chosen by configuration alone: DDP, DeepSpeed ZeRO-2/3 and FSDP agree, with 2 real
processes on CPU (gloo), real DeepSpeed and real FSDP2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.engine.manifest import read_manifest
from pipeline.engine.tracking import read_metrics
from tests.helpers import cli, kill_then_resume, tiny_recipe, write_recipe
from tests.spawn import run_distributed

ENGINES = {
    "ddp": {"nproc": 2, "engine": "ddp"},
    "zero2": {"nproc": 2, "engine": "deepspeed", "zero_stage": 2},
    "zero3": {"nproc": 2, "engine": "deepspeed", "zero_stage": 3},
    "fsdp": {"nproc": 2, "engine": "fsdp"},
}


def pretrain_recipe(run_dir: Path, launch: dict, **pretrain: object) -> dict:
    data = tiny_recipe(run_dir)
    del data["stages"]["eval"]
    data["stages"]["pretrain"].update({"launch": launch, "log_every": 1, **pretrain})
    return data


def losses(run_dir: Path) -> list[float]:
    return [r["train/loss"] for r in read_metrics(run_dir / "pretrain") if "train/loss" in r]


def weights(export: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(export / "model.safetensors")


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny 8-step pretrain per engine, same data and seed."""
    root = tmp_path_factory.mktemp("engines")
    runs = {}
    for name, launch in ENGINES.items():
        run_dir = root / "runs" / name
        result = cli(
            "run", str(write_recipe(root / f"{name}.yaml", pretrain_recipe(run_dir, launch)))
        )
        assert result.returncode == 0, f"{name}: {result.stderr}"
        runs[name] = run_dir
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero2", "zero3", "fsdp"])
@pytest.mark.e2e
def test_losses_match_ddp(engine_runs: dict[str, Path], engine: str) -> None:
    ddp = losses(engine_runs["ddp"])
    assert len(ddp) == 8
    assert losses(engine_runs[engine]) == pytest.approx(ddp, rel=1e-4)
    log = (engine_runs[engine] / "pretrain" / "stage.log").read_text()
    assert "on 2 ranks" in log


@pytest.mark.slow
@pytest.mark.e2e
def test_engines_write_their_own_sharded_checkpoints(engine_runs: dict[str, Path]) -> None:
    def newest(name: str) -> Path:
        return sorted((engine_runs[name] / "pretrain" / "checkpoints").glob("step_*"))[-1]

    zero3 = newest("zero3") / "pytorch_model"
    assert sorted(p.name for p in zero3.glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    assert (newest("fsdp") / "pytorch_model_fsdp_0").is_dir()
    assert (newest("ddp") / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.e2e
def test_zero3_export_equals_the_gathered_checkpoint_and_loads(
    engine_runs: dict[str, Path],
) -> None:
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM

    run = engine_runs["zero3"] / "pretrain"
    final = sorted((run / "checkpoints").glob("step_*"))[-1]
    gathered = get_fp32_state_dict_from_zero_checkpoint(str(final), tag="pytorch_model")
    exported = weights(run / "export")
    for name, tensor in exported.items():
        assert torch.equal(tensor, gathered[name]), name
    model = AutoModelForCausalLM.from_pretrained(run / "export")
    assert sum(p.numel() for p in model.parameters()) == read_manifest(run)["summary"]["params"]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero2", "zero3", "fsdp"])
@pytest.mark.e2e
def test_exports_match_ddp(engine_runs: dict[str, Path], engine: str) -> None:
    import torch

    ddp = weights(engine_runs["ddp"] / "pretrain" / "export")
    other = weights(engine_runs[engine] / "pretrain" / "export")
    for name, tensor in ddp.items():
        assert torch.allclose(other[name], tensor, atol=1e-5), name


@pytest.mark.slow
@pytest.mark.e2e
def test_zero3_resumes_after_kill_9(tmp_path: Path) -> None:
    import torch

    settings = {
        "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 2},
        "seq_len": 64,
        "micro_batch_size": 8,
        "max_steps": 40,
        "checkpoint_every": 5,
        "log_every": 5,
        "eval_every": 20,
    }
    recipe = pretrain_recipe(tmp_path / "unused", ENGINES["zero3"], **settings)
    reference, killed = kill_then_resume(tmp_path, recipe, "pretrain/checkpoints/step_00000010")
    assert "resuming from step_" in (killed / "pretrain" / "stage.log").read_text()
    ours, theirs = (
        weights(killed / "pretrain" / "export"),
        weights(reference / "pretrain" / "export"),
    )
    for name, tensor in theirs.items():
        assert torch.allclose(ours[name], tensor, atol=1e-6), name


def one_process_run(root: Path, name: str, **pretrain: object) -> Path:
    """The run dir of a 4-step one-process pretrain with `pretrain` settings."""
    run_dir = root / "runs" / name
    data = pretrain_recipe(run_dir, {"nproc": 1}, max_steps=4, **pretrain)
    result = cli("run", str(write_recipe(root / f"{name}.yaml", data)))
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.fixture(scope="module")
def eager_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 eager steps of one micro batch of 8: the reference for accumulation and compile."""
    return one_process_run(tmp_path_factory.mktemp("eager"), "m8a1", micro_batch_size=8)


@pytest.mark.e2e
def test_gradient_accumulation_is_exact(tmp_path: Path, eager_run: Path) -> None:
    """k micro batches of b give the same update as one batch of k*b."""
    import torch

    reference = weights(eager_run / "pretrain" / "export")
    for micro, accum in ((4, 2), (2, 4)):
        run_dir = one_process_run(
            tmp_path, f"m{micro}a{accum}", micro_batch_size=micro, grad_accum_steps=accum
        )
        other = weights(run_dir / "pretrain" / "export")
        for name, tensor in reference.items():
            assert torch.allclose(other[name], tensor, atol=2e-6), name


@pytest.mark.e2e
def test_bf16_and_activation_checkpointing_train(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "bf16"
    data = pretrain_recipe(
        run_dir, {"nproc": 1}, precision="bf16", activation_checkpointing=True, max_steps=12
    )
    result = cli("run", str(write_recipe(tmp_path / "bf16.yaml", data)))
    assert result.returncode == 0, result.stderr
    assert "bf16" in (run_dir / "pretrain" / "stage.log").read_text()
    curve = losses(run_dir)
    assert curve[-1] < curve[0]
    # CPU: tokens/s is reported, MFU is left empty rather than invented.
    rows = [r for r in read_metrics(run_dir / "pretrain") if "train/loss" in r]
    assert all(r["train/tokens_per_second_per_device"] > 0 and "train/mfu" not in r for r in rows)


@pytest.mark.slow
@pytest.mark.e2e
def test_compile_switch_trains(tmp_path: Path, eager_run: Path) -> None:
    """compile: true trains the same model: its losses are the eager run's, to rounding."""
    compiled = losses(one_process_run(tmp_path, "compiled", micro_batch_size=8, compile=True))
    assert len(compiled) == 4 and compiled == pytest.approx(losses(eager_run), rel=1e-3)


def test_engine_options_are_validated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline import cli as cli_module

    data = pretrain_recipe(
        tmp_path / "runs" / "x",
        {"nproc": 2, "engine": "deepspeed", "zero_stage": 2, "offload_params": True},
    )
    assert cli_module.main(["run", str(write_recipe(tmp_path / "bad.yaml", data))]) == 2
    (error,) = capsys.readouterr().err.splitlines()
    assert error.startswith("error: ") and "stages.pretrain.launch" in error
    assert "offload_params needs zero_stage: 3" in error


def test_expert_deepspeed_json_wins_and_is_checked(tmp_path: Path) -> None:
    from pipeline.engine.config import LaunchConfig
    from pipeline.engine.errors import PipelineError
    from pipeline.train.distributed import TrainShape, deepspeed_config, trainer_arguments

    shape = TrainShape(micro_batch_size=4, grad_accum_steps=2, world_size=2)
    expert = tmp_path / "ds.json"
    expert.write_text(
        json.dumps({"train_batch_size": "auto", "zero_optimization": {"reduce_bucket_size": 1000}})
    )
    launch = LaunchConfig(engine="deepspeed", zero_stage=3, deepspeed_config=str(expert))
    config = deepspeed_config(launch, shape)
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["reduce_bucket_size"] == 1000  # the expert's value won over our "auto"
    assert config["train_batch_size"] == 16 == shape.global_batch
    # TRL gets the very same DeepSpeed settings and batch shape.
    args = trainer_arguments(launch, shape, ["LlamaDecoderLayer"])
    assert args["deepspeed"] == config
    assert (
        args["per_device_train_batch_size"] * args["gradient_accumulation_steps"] * 2
        == config["train_batch_size"]
    )

    expert.write_text(json.dumps({"train_batch_size": 64}))
    with pytest.raises(PipelineError, match="train_batch_size=64 disagrees with the recipe's 16"):
        deepspeed_config(launch, shape)
    expert.write_text("{not json")
    with pytest.raises(PipelineError, match="not valid JSON"):
        deepspeed_config(launch, shape)


# ---------------------------------------------------------------------------------------------
# The same pieces on real gloo ranks spawned inside the test (tests/spawn.py): seconds, not a run.


def _ddp_accelerator(micro_batch_size: int = 4, grad_accum_steps: int = 1):
    """The Accelerator a 2-process DDP stage builds (gloo on CPU)."""
    from pipeline.engine.config import LaunchConfig
    from pipeline.train.distributed import TrainShape, build_accelerator

    shape = TrainShape(micro_batch_size, grad_accum_steps, world_size=2)
    return build_accelerator(LaunchConfig(nproc=2, engine="ddp"), shape, [])


def _tiny_net():
    import torch

    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _digests_of_replicas() -> tuple[list[str], list[str]]:
    """(digests once DDP has wrapped the model, digests after rank 1 nudged one weight)."""
    import torch

    from pipeline.train.distributed import replica_digests

    accelerator = _ddp_accelerator()
    torch.manual_seed(accelerator.process_index)  # each rank starts from its own weights...
    model = accelerator.prepare(_tiny_net())  # ...and DDP broadcasts rank 0's
    synced = replica_digests(accelerator, model)
    if accelerator.process_index == 1:
        with torch.no_grad():
            accelerator.unwrap_model(model)[2].bias[0] += 1e-3
    return synced, replica_digests(accelerator, model)


def test_replica_digests_agree_under_ddp_and_expose_one_drifted_rank() -> None:
    (synced_0, drifted_0), (synced_1, drifted_1) = run_distributed(_digests_of_replicas)
    assert synced_0 == synced_1 and drifted_0 == drifted_1  # every rank sees every digest
    assert len(synced_0) == 2 and synced_0[0] == synced_0[1]
    assert drifted_0[0] == synced_0[0] and drifted_0[1] != synced_0[1]


def _accumulated_ddp_step(inputs, targets, lr: float) -> dict:
    """One optimizer step of 2 micro batches of 2 rows per rank, as the training loop takes it."""
    import torch
    import torch.nn.functional as F

    accelerator = _ddp_accelerator(micro_batch_size=2, grad_accum_steps=2)
    torch.manual_seed(0)
    net = _tiny_net()
    model, optimizer = accelerator.prepare(net, torch.optim.SGD(net.parameters(), lr=lr))
    rank, synced, grads = accelerator.process_index, [], {}
    for micro in range(2):
        rows = slice((rank * 2 + micro) * 2, (rank * 2 + micro + 1) * 2)
        with accelerator.accumulate(model):
            accelerator.backward(F.mse_loss(model(inputs[rows]), targets[rows]))
            synced.append(accelerator.sync_gradients)
            grads = {n: p.grad.clone() for n, p in net.named_parameters()}
            optimizer.step()
            optimizer.zero_grad()
    return {"synced": synced, "grads": grads, "weights": net.state_dict()}


def test_ddp_with_accumulation_steps_like_one_process_on_the_whole_batch() -> None:
    """2 ranks x 2 micro batches x 2 rows: the gradient and the update of one batch of 8 rows."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(1)
    inputs, targets = torch.randn(8, 6, generator=generator), torch.randn(8, 3, generator=generator)
    lr = 0.5
    ranks = run_distributed(_accumulated_ddp_step, inputs, targets, lr)

    def gradients(rows: slice) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        net = _tiny_net()
        F.mse_loss(net(inputs[rows]), targets[rows]).backward()
        return {n: p.grad for n, p in net.named_parameters()}

    whole, rank_0_only = gradients(slice(0, 8)), gradients(slice(0, 4))
    torch.manual_seed(0)
    expected = {n: p.detach() - lr * whole[n] for n, p in _tiny_net().named_parameters()}
    for rank in ranks:
        assert rank["synced"] == [False, True]  # all-reduce on the last micro batch only
        for name, grad in whole.items():
            assert torch.allclose(rank["grads"][name], grad, atol=1e-6), name
            assert torch.allclose(rank["weights"][name], expected[name], atol=1e-6), name
    # Not a tolerance too loose to tell: the gradient of rank 0's rows alone is far off.
    assert max((whole[n] - rank_0_only[n]).abs().max() for n in whole) > 1e-2
