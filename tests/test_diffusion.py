"""Diffusion end to end on the 8x8 digits: training, EMA export, samplers, guidance, eval, resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from eval import image_eval
from pipeline.engine.config import validate_recipe
from pipeline.engine.context import StageContext
from pipeline.engine.errors import PipelineError
from pipeline.engine.inputs import plan_problems
from pipeline.engine.manifest import read_manifest, write_manifest
from pipeline.engine.tracking import read_metrics
from pipeline.stages import diffusion
from tests.helpers import cli, kill_then_resume, write_recipe


def diffusion_recipe(run_dir: Path, nproc: int = 1, **diffusion: Any) -> dict[str, Any]:
    """images -> tiny DiT (flow matching) -> image_eval -> report; seconds on a CPU."""
    stage = {
        "kind": "diffusion",
        "after": ["images"],
        "model": {"arch": "dit", "hidden_size": 32, "num_layers": 2, "num_heads": 2},
        "micro_batch_size": 32,
        "max_steps": 20,
        "optim": {"lr": 2e-3},
        "schedule": {"warmup_steps": 5},
        "ema_decay": 0.9,
        "log_every": 5,
        "eval_every": 10,
        "checkpoint_every": 10,
        "cpu_threads": 1,  # tiny models on a shared 2-core CPU: one thread is far faster
        **diffusion,
    }
    return {
        "name": "tiny-diffusion",
        "run_dir": str(run_dir),
        "tracking": {"mode": "disabled"},
        "launch": {"nproc": nproc},
        "stages": {
            "images": {"kind": "images", "source": {"uri": "builtin:digits", "max_images": 600}},
            "diffusion": stage,
            "eval": {
                "kind": "image_eval",
                "after": ["diffusion", "images"],
                "samplers": [{"sampler": "euler", "steps": 4}, {"sampler": "heun", "steps": 2}],
                "samples_per_class": 3,
                "classifier_epochs": 2,
                "grid_columns": 3,
                "cpu_threads": 1,
            },
            "report": {"kind": "report", "after": ["eval"]},
        },
    }


def _run(tmp_path: Path, recipe: dict[str, Any], name: str = "r.yaml") -> None:
    result = cli("run", str(write_recipe(tmp_path / name, recipe)))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp_path = tmp_path_factory.mktemp("flow")
    _run(tmp_path, diffusion_recipe(tmp_path / "run"))
    return tmp_path / "run"


def _context(run_dir: Path, recipe: dict[str, Any], stage: str) -> StageContext:
    """The context a stage of `recipe` would run with in `run_dir` (for in-process error checks)."""
    return StageContext(run_dir=run_dir, name=stage, recipe=validate_recipe(recipe))


def _pipeline(run_dir: Path) -> Any:
    from pipeline.diffusion.class_conditional_pipeline import ClassConditionalPipeline

    pipe = ClassConditionalPipeline.from_pretrained(run_dir / "diffusion" / "export")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.e2e
def test_training_loss_falls(flow_run: Path) -> None:
    losses = [r["train/loss"] for r in read_metrics(flow_run / "diffusion") if "train/loss" in r]
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0], losses
    summary = read_manifest(flow_run / "diffusion")["summary"]
    assert summary["val_ema_loss"] > 0 and summary["images_seen"] == 20 * 32


@pytest.mark.e2e
def test_export_holds_the_ema_weights_not_the_live_ones(flow_run: Path) -> None:
    import torch
    from safetensors.torch import load_file

    checkpoint = flow_run / "diffusion" / "checkpoints" / "step_00000020"
    live = load_file(checkpoint / "model.safetensors")
    ema = torch.load(checkpoint / "custom_checkpoint_1.pkl", weights_only=False)  # 0: LR schedule
    model = _pipeline(flow_run).transformer
    names = [name for name, _ in model.named_parameters()]
    assert len(names) == len(ema["shadow"]) and ema["num_updates"] == 20
    exported = model.state_dict()
    differing = 0
    for name, shadow in zip(names, ema["shadow"], strict=True):
        assert torch.equal(exported[name], shadow), name
        differing += not torch.equal(live[name], shadow)
    assert differing > len(names) // 2


@pytest.mark.e2e
def test_export_loads_with_from_pretrained_and_samples_the_right_shape(flow_run: Path) -> None:
    import torch

    pipe = _pipeline(flow_run)
    assert pipe.config.num_classes == 10 and pipe.config.class_names[3] == "3"
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    out = pipe(class_labels=[1, 7], num_inference_steps=3, output_type="np").images
    assert out.shape == (2, 8, 8, 1) and out.min() >= 0 and out.max() <= 1
    generator = torch.Generator().manual_seed(0)
    tensors = pipe([2], num_inference_steps=3, output_type="pt", generator=generator).images
    assert tensors.shape == (1, 1, 8, 8)


@pytest.mark.e2e
def test_export_loads_as_a_diffusers_custom_pipeline_without_this_project(
    flow_run: Path, tmp_path: Path
) -> None:
    import os
    import subprocess
    import sys

    code = (
        "import sys\nfrom diffusers import DiffusionPipeline\n"
        "pipe = DiffusionPipeline.from_pretrained(sys.argv[1], "
        "custom_pipeline='class_conditional_pipeline', trust_remote_code=True)\n"
        "assert 'pipeline' not in sys.modules, 'the project package was imported'\n"
        "images = pipe(class_labels=[0, 9], num_inference_steps=2, output_type='np').images\n"
        "print(type(pipe).__name__, images.shape)\n"
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", code, str(flow_run / "diffusion" / "export")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "ClassConditionalPipeline (2, 8, 8, 1)" in result.stdout


@pytest.mark.e2e
def test_guidance_changes_samples_and_zero_guidance_is_unconditional(flow_run: Path) -> None:
    import torch

    pipe = _pipeline(flow_run)

    def sample(labels: list[int], scale: float) -> np.ndarray:
        generator = torch.Generator().manual_seed(5)
        return pipe(
            labels, num_inference_steps=4, guidance_scale=scale, generator=generator,
            output_type="np",
        ).images  # fmt: skip

    plain, guided = sample([3, 4], 1.0), sample([3, 4], 3.0)
    assert np.abs(plain - guided).mean() > 1e-3
    null = pipe.config.num_classes
    assert np.allclose(sample([3, 4], 0.0), sample([null, null], 1.0), atol=1e-5)


@pytest.mark.e2e
def test_eval_scores_against_real_images_and_report_shows_grids(flow_run: Path) -> None:
    from PIL import Image

    metrics = json.loads((flow_run / "eval" / "export" / "metrics.json").read_text())
    real, noise = metrics["real val images"], metrics["uniform noise"]
    assert real["fd"] * 5 < noise["fd"] and real["kid"] * 5 < noise["kid"]
    assert real["precision"] > noise["precision"] + 0.2 and real["nn_ratio"] == 1.0
    for name in ("euler_4", "heun_2"):
        assert metrics[name]["images"] == 30 and metrics[name]["images_per_second"] > 0
        assert 0 <= metrics[name]["class_accuracy"] <= 1
    grid = Image.open(flow_run / "eval" / "export" / "grid_euler_4.png")
    scale = 48 // 8
    assert grid.size == (scale * (3 * 9 + 1), scale * (10 * 9 + 1))  # 3 columns, a row per class
    html = (flow_run / "report" / "index.html").read_text()
    assert "Sample quality and speed" in html and "eval_grid_heun_2.png" in html
    assert read_manifest(flow_run / "eval")["headline"] == "class_accuracy"


@pytest.mark.e2e
def test_ddpm_unet_v_prediction_with_ddim_and_dpm_solver(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    recipe = diffusion_recipe(
        run_dir,
        nproc=2,
        model={"arch": "unet", "block_out_channels": [8, 16], "norm_num_groups": 4},
        objective={"kind": "ddpm", "prediction": "v_prediction"},
        max_steps=10,
    )
    recipe["stages"]["eval"]["samplers"] = [
        {"sampler": "ddim", "steps": 3},
        {"sampler": "dpm++", "steps": 3},
    ]
    _run(tmp_path, recipe)
    pipe = _pipeline(run_dir)
    assert pipe.unet is not None and pipe.transformer is None
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe([0, 5], num_inference_steps=3, output_type="np").images.shape == (2, 8, 8, 1)
    metrics = json.loads((run_dir / "eval" / "export" / "metrics.json").read_text())
    assert {"ddim_3", "dpm++_3"} <= set(metrics)
    # A flow sampler on a DDPM model is refused in one line, before any sampling.
    recipe["stages"]["eval"]["samplers"] = [{"sampler": "euler", "steps": 5}]
    with pytest.raises(PipelineError) as info:
        image_eval.run(_context(run_dir, recipe, "eval"))
    assert "stages.eval.samplers.0: sampler euler does not fit a ddpm model" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.e2e
def test_latent_diffusion_through_a_vae_stage(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    recipe = diffusion_recipe(
        run_dir, nproc=2, space="latent", model={"arch": "dit", "hidden_size": 32, "num_heads": 2,
                                        "num_layers": 2, "patch_size": 1}, max_steps=8,
    )  # fmt: skip
    recipe["stages"]["vae"] = {
        "kind": "vae", "after": ["images"], "max_steps": 12, "micro_batch_size": 32,
        "schedule": {"warmup_steps": 2}, "log_every": 4, "eval_every": 12,
        "model": {"block_out_channels": [8, 16], "latent_channels": 2, "norm_num_groups": 4},
    }  # fmt: skip
    recipe["stages"]["diffusion"]["after"] = ["vae"]
    recipe["stages"]["eval"]["samplers"] = [{"sampler": "euler", "steps": 3}]
    _run(tmp_path, recipe)
    index = json.loads((run_dir / "vae" / "export" / "latents" / "index.json").read_text())
    assert index["shape"] == [2, 4, 4] and index["dtype"] == "float32"
    latents = np.load(run_dir / "vae" / "export" / "latents" / "train_images.npy")
    assert abs(latents.std() - 1) < 0.05  # scaled to unit variance
    pipe = _pipeline(run_dir)
    assert pipe.vae.config.scaling_factor == pytest.approx(index["scaling_factor"])
    assert pipe([4], num_inference_steps=2, output_type="np").images.shape == (1, 8, 8, 1)
    vae_losses = [r["train/loss"] for r in read_metrics(run_dir / "vae") if "train/loss" in r]
    assert vae_losses[-1] < vae_losses[0]
    # Latent space without a vae stage upstream: a one-line error naming the fix.
    del recipe["stages"]["vae"]
    recipe["stages"]["diffusion"]["after"] = ["images"]
    with pytest.raises(PipelineError) as info:
        diffusion.run(_context(run_dir, recipe, "diffusion"))
    assert "stages.diffusion: space: latent needs a vae stage upstream" in str(info.value)


def test_latent_space_without_a_vae_is_refused_by_the_plan(tmp_path: Path) -> None:
    recipe = diffusion_recipe(tmp_path / "run", space="latent")
    assert plan_problems(validate_recipe(recipe)) == [
        "stages.diffusion: space: latent needs a vae stage upstream; add one (kind: vae) and list "
        "it in `after:`, or use space: pixel"
    ]


VAE_STAGE = {"kind": "vae", "after": ["images"], "max_steps": 2, "schedule": {"warmup_steps": 1},
             "model": {"block_out_channels": [8, 8, 8], "norm_num_groups": 4}}  # fmt: skip


@pytest.mark.parametrize(
    ("images", "diffusion", "vae", "expected"),
    [
        ({}, {"model": {"arch": "dit", "patch_size": 3}}, None,
         "stages.diffusion.model.patch_size: 3 does not divide the input size 8 (the images "
         "stage's builtin:digits images); choose a divisor"),
        ({"image_size": 12}, {"model": {"arch": "unet", "block_out_channels": [8, 8, 8, 8]}},
         None, "stages.diffusion.model.block_out_channels: 4 levels halve the input 3 times, but "
         "its size 12 (the images stage's image_size) is not divisible by 8; use fewer levels"),
        ({"image_size": 16}, {"space": "latent", "model": {"arch": "dit", "patch_size": 3}},
         VAE_STAGE, "stages.diffusion.model.patch_size: 3 does not divide the input size 4 (the "
         "images stage's image_size 16 / the vae's 4x); choose a divisor"),
        ({"image_size": 10}, {"space": "latent"}, VAE_STAGE,
         "stages.vae.model.block_out_channels: 3 levels shrink images 4x, but the images are 10 "
         "wide (the images stage's image_size), not divisible by 4; use fewer levels or an "
         "image_size divisible by 4"),
        ({"image_size": 16}, {"space": "latent", "model": {"arch": "dit", "patch_size": 2}},
         VAE_STAGE, None),
    ],
)  # fmt: skip
def test_a_model_that_cannot_take_the_size_of_its_inputs_is_refused_by_the_plan(
    tmp_path: Path, images: dict, diffusion: dict, vae: dict | None, expected: str | None
) -> None:
    """Patch sizes, UNet levels and VAE levels against the size the images stage fixes (its
    image_size, or a built-in source's own): known before anything runs."""
    diffusion = dict(diffusion)  # the parameter is shared: leave it as it is
    model = diffusion.pop("model", {"arch": "dit"})
    if model["arch"] == "dit":
        model = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, **model}
    recipe = diffusion_recipe(tmp_path / "run", model=model, **diffusion)
    recipe["stages"]["images"].update(images)
    if vae is not None:
        recipe["stages"]["vae"] = vae
        recipe["stages"]["diffusion"]["after"] = ["vae"]
    assert plan_problems(validate_recipe(recipe)) == ([expected] if expected else [])


@pytest.mark.parametrize(
    ("space", "index", "problem", "fix"),
    [
        ("pixel", "images/export/index.json", "unreadable (Expecting ", "rerun the images stage"),
        ("latent", "vae/export/latents/index.json", "missing", "run the vae stage first"),
    ],
)
def test_a_damaged_upstream_export_is_one_line_naming_the_stage_to_rerun(
    tmp_path: Path, space: str, index: str, problem: str, fix: str
) -> None:
    """The shards' index.json is read through its record: a broken one names the file and fix."""
    run_dir = tmp_path / "run"
    recipe = diffusion_recipe(run_dir, space=space)
    recipe["stages"]["vae"] = {"kind": "vae", "after": ["images"]}
    recipe["stages"]["diffusion"]["after"] = ["vae"]
    for stage in ("images", "vae"):
        write_manifest(run_dir / stage, {"status": "done"})
    (run_dir / "images" / "export").mkdir()
    (run_dir / "images" / "export" / "index.json").write_text(
        '{"format": "image-shards/1", "shape": [1'
    )
    with pytest.raises(PipelineError) as info:
        diffusion.run(_context(run_dir, recipe, "diffusion"))
    message = str(info.value)
    assert message.startswith(f"{run_dir / index}: {problem}") and message.endswith(f"; {fix}")
    assert "\n" not in message


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(uninterrupted, killed-and-resumed) runs of a 2-process DDP diffusion stage."""
    tmp_path = tmp_path_factory.mktemp("resume")
    recipe = diffusion_recipe(tmp_path / "unused", nproc=2, max_steps=30, checkpoint_every=5)
    del recipe["stages"]["eval"], recipe["stages"]["report"]
    return kill_then_resume(tmp_path, recipe, "diffusion/checkpoints/step_00000010")


@pytest.mark.slow
@pytest.mark.e2e
def test_two_processes_keep_identical_replicas(resumed: tuple[Path, Path]) -> None:
    reference, _ = resumed
    summary = read_manifest(reference / "diffusion")["summary"]
    digests = summary["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert summary["images_seen"] == 30 * 2 * 32
    assert (reference / "diffusion" / "logs" / "rank1.log").is_file()


@pytest.mark.slow
@pytest.mark.e2e
def test_kill_then_resume_gives_the_uninterrupted_export(resumed: tuple[Path, Path]) -> None:
    import torch
    from safetensors.torch import load_file

    reference, killed = resumed
    manifest = read_manifest(killed / "diffusion")
    assert manifest["status"] == "done" and manifest["attempts"] == 2
    assert "resuming from step_" in (killed / "diffusion" / "stage.log").read_text()
    weights = "diffusion/export/transformer/diffusion_pytorch_model.safetensors"
    ours, theirs = load_file(killed / weights), load_file(reference / weights)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    steps = [r["step"] for r in read_metrics(killed / "diffusion") if "train/loss" in r]
    assert steps == sorted(set(steps)), "resumed run logged some steps twice"


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ({"model": {"arch": "unet", "patch_size": 4}}, "patch_size only applies to arch dit"),
        (
            {"objective": {"kind": "flow", "prediction": "v_prediction"}},
            "only applies to objective ddpm",
        ),
        ({"model": {"hidden_size": 30, "num_heads": 4}}, "must be divisible by num_heads"),
        ({"max_steps": 10, "schedule": {"warmup_steps": 10}}, "must be below max_steps"),
    ],
    ids=["arch-field", "objective-field", "heads", "warmup"],
)
def test_inconsistent_diffusion_configs_are_refused(stage: dict, message: str) -> None:
    from pipeline.engine.errors import RecipeError

    recipe = diffusion_recipe(Path("/tmp/unused"))
    recipe["stages"]["diffusion"].update(stage)
    with pytest.raises(RecipeError) as info:
        validate_recipe(recipe)
    assert message in str(info.value) and "stages.diffusion" in str(info.value)


def test_class_count_mismatch_is_one_line() -> None:
    from pipeline.models.diffusion import DiffusionModelConfig, resolve_num_classes

    assert resolve_num_classes(DiffusionModelConfig(), 10, "stages.d") == 10
    with pytest.raises(PipelineError) as info:
        resolve_num_classes(DiffusionModelConfig(num_classes=5), 10, "stages.d")
    assert str(info.value).startswith("stages.d.model.num_classes: 5, but the data has 10 classes")
