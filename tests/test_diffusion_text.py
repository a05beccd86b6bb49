"""Text-to-image diffusion on builtin:shapes: a PixArt-style (cross-attention) and an SD3-style
(MMDiT) transformer train on captions a text_encode stage cached, drop captions to the empty one
for guidance, export a TextToImagePipeline that samples for cached captions, and resume exactly
after kill -9. Tiny models and few steps: these tests check the wiring, not image quality."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.engine.manifest import read_manifest
from pipeline.engine.tracking import read_metrics
from tests.helpers import cli, kill_then_resume, write_recipe

pytestmark = pytest.mark.e2e


def text_recipe(
    run_dir: Path, arch: str = "pixart", encoder: Any = "builtin:bag-of-words", **diffusion: Any
) -> dict:
    """images (builtin:shapes, 32 px) -> text_encode (bag of words) -> a tiny text transformer
    -> image_eval (one sample per held-out caption, scored by the shapes detector)."""
    stage = {
        "kind": "diffusion",
        "after": ["text"],
        "model": {"arch": arch, "patch_size": 4, "hidden_size": 32, "num_layers": 2,
                  "num_heads": 2},
        "micro_batch_size": 16, "max_steps": 12, "optim": {"lr": 2e-3},
        "schedule": {"warmup_steps": 2}, "ema_decay": 0.9, "log_every": 3, "eval_every": 6,
        "eval_batches": 1, "checkpoint_every": 6, "cpu_threads": 1, **diffusion,
    }  # fmt: skip
    return {
        "name": "shapes-text",
        "run_dir": str(run_dir),
        "tracking": {"mode": "disabled"},
        "launch": {"nproc": 1},
        "stages": {
            "images": {"kind": "images", "image_size": 32,
                       "source": {"uri": "builtin:shapes", "max_images": 96, "val_images": 32}},
            "text": {"kind": "text_encode", "after": ["images"], "encoder": encoder},
            "diffusion": stage,
            "eval": {"kind": "image_eval", "after": ["diffusion", "images"],
                     "samplers": [{"sampler": "euler", "steps": 2}], "text_prompts": 24,
                     "classifier_epochs": 1, "grid_columns": 4, "cpu_threads": 1},
        },
    }  # fmt: skip


def run(tmp_path: Path, recipe: dict[str, Any]) -> Path:
    result = cli("run", str(write_recipe(tmp_path / "r.yaml", recipe)))
    assert result.returncode == 0, result.stdout + result.stderr
    return Path(recipe["run_dir"])


@pytest.fixture(scope="module", params=["pixart", "mmdit"])
def text_run(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, qwen2_dir: Path
) -> Path:
    """pixart on the bag of words; mmdit on a Qwen2 directory's states (its encoder exported)."""
    tmp_path = tmp_path_factory.mktemp(request.param)
    encoder = "builtin:bag-of-words" if request.param == "pixart" else {"path": str(qwen2_dir)}
    return run(tmp_path, text_recipe(tmp_path / "run", request.param, encoder))


def pipeline_of(run_dir: Path) -> Any:
    from pipeline.diffusion.text_to_image_pipeline import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(run_dir / "diffusion" / "export")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_trains_on_cached_captions_and_samples_for_a_caption(text_run: Path) -> None:
    """Loss falls; the export samples for a held-out caption, the same seed gives the same
    images, guidance against the empty caption changes them, and a prompt no stage encoded is
    encoded by the export's own encoder, which gives a cached caption its cached embedding."""
    import torch

    losses = [r["train/loss"] for r in read_metrics(text_run / "diffusion") if "train/loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    log = (text_run / "diffusion" / "stage.log").read_text()
    assert "resuming" not in log
    pipe = pipeline_of(text_run)
    from data_prep.image_captions import read_captions

    caption = read_captions(text_run / "images" / "export", "val")[0]

    def sample(scale: float, seed: int = 0) -> np.ndarray:
        out = pipe(prompt=[caption, caption], num_inference_steps=3, guidance_scale=scale,
                   generator=torch.Generator().manual_seed(seed), output_type="np")  # fmt: skip
        return out.images

    first = sample(2.0)
    assert first.shape == (2, 32, 32, 3) and np.isfinite(first).all()
    assert np.array_equal(first, sample(2.0))
    assert not np.array_equal(first, sample(1.0))
    assert not np.array_equal(first, sample(2.0, seed=1))
    new = pipe(prompt="a purple hexagon above it", num_inference_steps=1, output_type="np")
    assert new.images.shape == (1, 32, 32, 3)
    rows, table = pipe.cached_captions()
    fresh = pipe.encode_new([caption])
    for key, value in zip(("states", "mask", "pooled"), fresh, strict=True):
        cached = table[key][rows[caption]].float()
        torch.testing.assert_close(value[0], cached, atol=1e-3, rtol=1e-3, msg=key)


def test_eval_scores_held_out_captions_by_category(text_run: Path) -> None:
    """image_eval samples one image per held-out caption and scores it by category with the
    shapes detector, whose accuracy on the real held-out scenes is 1 (its stated accuracy);
    a 12-step model draws nothing it can recognise."""
    import json

    summary = read_manifest(text_run / "eval")["summary"]
    assert summary["detector_real_overall"] == 1.0
    assert 0.0 <= summary["shapes/overall"] < 0.5
    metrics = json.loads((text_run / "eval" / "export" / "metrics.json").read_text())
    assert metrics["euler_2"]["images"] == 24 and metrics["euler_2"]["fd_heldout"] > 0
    assert {"shapes/single", "shapes/position", "shapes/counting"} <= set(metrics["euler_2"])
    sections = (text_run / "eval" / "export").glob("*.json")
    assert any("Compositional accuracy" in p.read_text() for p in sections)


def test_export_loads_as_a_custom_pipeline_without_this_project(text_run: Path) -> None:
    import torch
    from diffusers import DiffusionPipeline

    export = text_run / "diffusion" / "export"
    pipe = DiffusionPipeline.from_pretrained(
        export, custom_pipeline=str(export / "text_to_image_pipeline.py"), trust_remote_code=True
    )
    ours = pipeline_of(text_run)
    rows, _ = ours.cached_captions()
    kwargs = {"prompt": next(iter(rows)), "num_inference_steps": 2, "output_type": "np"}
    a = pipe(generator=torch.Generator().manual_seed(3), **kwargs).images
    b = ours(generator=torch.Generator().manual_seed(3), **kwargs).images
    assert np.array_equal(a, b)


def test_a_text_arch_without_text_encode_is_refused_by_the_plan(tmp_path: Path) -> None:
    recipe = text_recipe(tmp_path / "run")
    del recipe["stages"]["text"]
    recipe["stages"]["diffusion"]["after"] = ["images"]
    result = cli("run", "--dry-run", str(write_recipe(tmp_path / "r.yaml", recipe)))
    assert result.returncode != 0
    line = result.stderr.strip().splitlines()[-1]
    assert "needs a text_encode stage upstream" in line and "Traceback" not in result.stderr


@pytest.mark.slow
def test_kill_then_resume_gives_the_uninterrupted_export(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    recipe = text_recipe(tmp_path / "unused", max_steps=12, checkpoint_every=3)
    reference, killed = kill_then_resume(tmp_path, recipe, "diffusion/checkpoints/step_00000006")
    assert read_manifest(killed / "diffusion")["attempts"] == 2
    assert "resuming from step_" in (killed / "diffusion" / "stage.log").read_text()
    weights = "diffusion/export/transformer/diffusion_pytorch_model.safetensors"
    ours, theirs = load_file(killed / weights), load_file(reference / weights)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
