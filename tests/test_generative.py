"""Generative baselines: the bundled digits recipe, shrunk, runs end to end with all six rows
scored by the same code; flow and PixelCNN bits/dim beat the uniform 8-bit baseline after a short
training; bits/dim are in the right units; bad model specs fail in one line before training."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from pipeline.engine.config import bundled_recipes_dir, validate_recipe
from pipeline.engine.errors import RecipeError
from pipeline.engine.inputs import plan_problems
from pipeline.engine.manifest import read_manifest
from tests.helpers import cli, write_recipe

RECIPE = bundled_recipes_dir() / "baselines" / "generative-digits.yaml"
NATIVE = ("vae", "gan", "flow", "pixelcnn")
LEVELS = 17
SAMPLES = 64
# Tiny budgets for the bundled recipe's stages: every model and stage kept, seconds each.
DIFFUSION = {
    "model": {"arch": "unet", "block_out_channels": [8, 16], "norm_num_groups": 8,
              "attention_levels": [False, False]},
    "micro_batch_size": 32, "max_steps": 12, "schedule": {"warmup_steps": 2},
    "log_every": 6, "eval_every": 12, "checkpoint_every": 12,
}  # fmt: skip
OPTIONS = {"epochs": 1, "num_samples": SAMPLES, "classifier_epochs": 2}


def shrunk_recipe(run_dir: Path) -> dict[str, Any]:
    """The bundled recipe with tiny budgets, plus a stage training flow and PixelCNN on 8-bit
    pixels (256 levels) just long enough to judge their bits/dim."""
    recipe = yaml.safe_load(RECIPE.read_text())
    stages = recipe["stages"]
    for name in ("ddpm", "flow_matching"):
        stages[name].update(DIFFUSION)
    generative = stages["generative"]
    generative["options"].update(OPTIONS)
    for model in generative["models"].values():
        model.pop("epochs", None)
        if "from_stage" in model:
            model["steps"] = 3
    stages["eight_bit"] = {
        "kind": "baseline",
        "task": "generative",
        "after": ["images"],
        "dataset": "builtin:digits",
        "options": {**OPTIONS, "epochs": 6, "levels": 256},
        "models": {"flow": {"net": "flow", "layers": 6}, "pixelcnn": {"net": "pixelcnn"}},
    }
    stages["report"]["after"] = ["generative", "eight_bit"]
    tracking = {"mode": "disabled"}
    return {**recipe, "run_dir": str(run_dir), "tracking": tracking}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp_path = tmp_path_factory.mktemp("generative")
    run_dir = tmp_path / "run"
    result = cli("run", str(write_recipe(tmp_path / "recipe.yaml", shrunk_recipe(run_dir))))
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir


def results(run_dir: Path, stage: str) -> dict[str, Any]:
    return json.loads((run_dir / stage / "export" / "results.json").read_text())


def column(table: dict[str, Any], name: str) -> dict[str, Any]:
    """{model: value} of one column of a results table."""
    index = table["columns"].index(name)
    return {row[0]: row[index] for row in table["rows"]}


@pytest.mark.e2e
def test_all_six_rows_are_scored_and_the_report_shows_table_and_grids(run_dir: Path) -> None:
    table = results(run_dir, "generative")
    recipe = yaml.safe_load(RECIPE.read_text())
    assert [row[0] for row in table["rows"]] == list(recipe["stages"]["generative"]["models"])
    fd = column(table, "fd")
    assert all(math.isfinite(v) and v > 0 for v in fd.values()), fd
    assert table["best"] == {"model": min(fd, key=fd.get), "value": min(fd.values())}
    bits = column(table, "bits_per_dim")
    likelihood = column(table, "likelihood")
    for name in ("vae", "flow", "pixelcnn"):
        assert 0 < bits[name] < math.log2(LEVELS), (name, bits[name])  # uniform: log2(17)
    assert likelihood == {
        "vae": "ELBO bound", "gan": "none", "flow": "dequantised bound", "pixelcnn": "exact",
        "ddpm": "none", "flow_matching": "none",
    }  # fmt: skip
    assert bits["gan"] is None and bits["ddpm"] is None and bits["flow_matching"] is None
    assert all(v > 0 for v in column(table, "samples_per_second").values())
    page = (run_dir / "report" / "index.html").read_text()
    assert "generative: generative baselines on builtin:digits" in page
    assert "generative_samples.png" in page and "generative_training_curves.png" in page
    png = (run_dir / "report" / "generative_samples.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.e2e
def test_diffusion_rows_take_training_time_and_size_from_their_stage(run_dir: Path) -> None:
    table = results(run_dir, "generative")
    seconds, params = column(table, "train_seconds"), column(table, "params")
    for stage in ("ddpm", "flow_matching"):
        manifest = read_manifest(run_dir / stage)
        assert seconds[stage] == manifest["duration_s"]
        assert params[stage] == manifest["summary"]["params"]
    assert table["models"]["ddpm"]["metrics"]["sampler"] == "dpm++ 3 steps"


@pytest.mark.e2e
def test_exported_samples_are_images_on_the_pixel_grid(run_dir: Path) -> None:
    for name in (*NATIVE, "ddpm", "flow_matching"):
        with np.load(run_dir / "generative" / "export" / "predictions" / f"{name}.npz") as data:
            samples = data["samples"]
        assert samples.shape == (SAMPLES, 1, 8, 8), name
        assert samples.max() <= LEVELS - 1 and len(np.unique(samples)) > 2, name
    with np.load(run_dir / "generative" / "export" / "predictions" / "ddpm.npz") as data:
        assert not np.array_equal(data["samples"][0], data["samples"][1])


@pytest.mark.e2e
def test_flow_and_pixelcnn_beat_the_uniform_8_bit_baseline(run_dir: Path) -> None:
    table = results(run_dir, "eight_bit")
    bits = column(table, "bits_per_dim")
    for name in ("flow", "pixelcnn"):
        assert math.isfinite(bits[name]) and bits[name] < 8.0 - 0.5, (name, bits[name])
        history = table["models"][name]["history"]
        assert history[-1]["test_bits_per_dim"] < history[0]["test_bits_per_dim"], name


def test_bits_per_dim_of_a_uniform_pixelcnn_is_log2_of_the_levels() -> None:
    """A PixelCNN whose output layer is zero predicts uniform categoricals: exactly log2(levels)."""
    import torch

    from pipeline.baselines.generative_nets import PixelCNN, bits_per_dim

    for levels in (17, 256):
        net = PixelCNN((1, 8, 8), levels, hidden=16, layers=1)
        torch.nn.init.zeros_(net.net[-1].weight)
        torch.nn.init.zeros_(net.net[-1].bias)
        pixels = torch.randint(0, levels, (5, 1, 8, 8))
        assert bits_per_dim(net, pixels) == pytest.approx(math.log2(levels), rel=1e-6)


def test_flow_couplings_invert_exactly_and_their_log_det_matches_the_jacobian() -> None:
    """Sampling runs the couplings backwards, and the likelihood needs the exact log |det J|."""
    import torch

    from pipeline.baselines.generative_nets import RealNVP

    torch.manual_seed(0)
    flow = RealNVP((1, 3, 3), 17, hidden=8, layers=4).double()
    for coupling in flow.couplings:  # random couplings, not the identity they start as
        torch.nn.init.normal_(coupling.net[-1].weight, std=0.3)

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_det = torch.zeros(len(x), dtype=x.dtype)
        for coupling in flow.couplings:
            x, step = coupling(x)
            log_det = log_det + step
        return x, log_det

    x = torch.randn(1, 1, 3, 3, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(lambda v: forward(v)[0], x).reshape(9, 9)
    assert forward(x)[1].item() == pytest.approx(torch.linalg.slogdet(jacobian)[1].item())
    y = forward(x)[0]
    for coupling in reversed(flow.couplings):
        y = coupling.inverse(y)
    assert torch.allclose(y, x, atol=1e-10)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"net": "vae", "from_stage": "ddpm"}, "set exactly one of net"),
        ({"net": "flow", "sampler": "euler"}, "sampler do not apply to a net: flow model"),
        ({"from_stage": "ddpm", "lr": 0.1}, "lr do not apply to a from_stage model"),
        ({"net": "gan", "optimizer": "sgd"}, "net gan trains with Adam"),
    ],
)
def test_bad_model_specs_are_refused_naming_the_model(model: dict, message: str) -> None:
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["stages"]["generative"]["models"] = {"bad": model}
    with pytest.raises(RecipeError, match=message) as info:
        validate_recipe(recipe)
    assert "stages.generative.models.bad" in str(info.value)


def test_the_plan_checks_the_images_and_samplers_a_generative_stage_reads(tmp_path: Path) -> None:
    """No images stage upstream, or a sampler that does not fit its from_stage's objective: one
    line each from the plan (`--dry-run`), before any stage runs."""
    recipe = shrunk_recipe(tmp_path / "run")
    stages = recipe["stages"]
    stages["generative"]["models"]["ddpm"]["sampler"] = "euler"
    stages["eight_bit"]["after"] = []
    assert plan_problems(validate_recipe(recipe)) == [
        "stages.generative.models.ddpm.sampler: euler does not fit the ddpm model of 'ddpm'; use "
        "ddpm or ddim or dpm++",
        "stages.eight_bit: task generative needs an upstream stage that makes images (images); "
        "add one to its `after:` list",
    ]


@pytest.mark.e2e
def test_a_from_stage_outside_after_fails_in_one_line(tmp_path: Path) -> None:
    recipe = shrunk_recipe(tmp_path / "run")
    stages = recipe["stages"]
    recipe["stages"] = {"images": stages["images"], "generative": stages["generative"]}
    stages["generative"]["after"] = ["images"]
    stages["generative"]["models"] = {"ddpm": {"from_stage": "ddpm"}}
    result = cli("run", str(write_recipe(tmp_path / "bad.yaml", recipe)))
    # Caught before any stage runs (pipeline/engine/checks.py), as every bad input is.
    assert result.returncode == 2
    assert result.stderr == (
        "error: stages.generative.models.ddpm.from_stage: no stage 'ddpm'; name a stage that "
        "makes diffusion (diffusion)\n"
    )
    assert not (tmp_path / "run" / "images" / "stage.json").exists()
