"""A text-to-image export that diffusers' own PixArtAlphaPipeline fits (pixart, latent space,
DDPM, a T5 encoder's final states) loads with a plain `DiffusionPipeline.from_pretrained(export)`
and samples the images TextToImagePipeline samples from the same directory; one it does not fit
(flow matching) stays a TextToImagePipeline and its stage log says why. Tiny models, few steps:
these check the loading and the sampling, not image quality."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers import cli, write_recipe
from tests.test_text_encode import build_t5

pytestmark = pytest.mark.e2e

TINY_PIXART = {"arch": "pixart", "patch_size": 2, "hidden_size": 32, "num_layers": 2,
               "num_heads": 2}  # fmt: skip


def diffusion(text: str, objective: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": "diffusion", "after": ["vae", text], "space": "latent", "model": TINY_PIXART,
        "objective": objective, "label_dropout": 0.2, "micro_batch_size": 16, "max_steps": 6,
        "optim": {"lr": 2e-3}, "schedule": {"warmup_steps": 1}, "ema_decay": 0.5,
        "log_every": 3, "eval_every": 6, "eval_batches": 1, "checkpoint_every": 6,
        "cpu_threads": 1,
    }  # fmt: skip


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory: pytest.TempPathFactory, qwen2_dir: Path, llama_dir: Path) -> Path:
    """shapes (32 px) -> a tiny VAE (8x8x4 latents) -> a T5 text_encode in float32 and in
    float16 -> pixart DDPM on each, and pixart flow on the float32 one; pixart DDPM on a Llama
    (a causal LM whose tokenizer adds BOS) and on a Qwen2 (no BOS: "" has no token)."""
    tmp = tmp_path_factory.mktemp("plain")
    t5 = build_t5(tmp / "t5")
    recipe = {
        "name": "plain",
        "run_dir": str(tmp / "run"),
        "tracking": {"mode": "disabled"},
        "launch": {"nproc": 1},
        "stages": {
            "images": {"kind": "images", "image_size": 32,
                       "source": {"uri": "builtin:shapes", "max_images": 48, "val_images": 16}},
            "vae": {"kind": "vae", "after": ["images"], "micro_batch_size": 16, "max_steps": 2,
                    "schedule": {"warmup_steps": 1},
                    "model": {"block_out_channels": [8, 8, 8], "layers_per_block": 1,
                              "latent_channels": 4, "norm_num_groups": 4},
                    "log_every": 1, "eval_every": 2, "checkpoint_every": 2, "cpu_threads": 1},
            "t5": {"kind": "text_encode", "after": ["images"], "encoder": {"path": str(t5)},
                   "dtype": "float32", "max_length": 16},
            "t5_16": {"kind": "text_encode", "after": ["images"], "encoder": {"path": str(t5)},
                      "max_length": 16},
            "qwen": {"kind": "text_encode", "after": ["images"],
                     "encoder": {"path": str(qwen2_dir)}, "max_length": 16},
            "llama": {"kind": "text_encode", "after": ["images"],
                      "encoder": {"path": str(llama_dir)}, "dtype": "float32",
                      "max_length": 16},
            "ddpm_llama": diffusion("llama", {"kind": "ddpm", "prediction": "epsilon"}),
            "ddpm": diffusion("t5", {"kind": "ddpm", "prediction": "epsilon"}),
            "ddpm_qwen": diffusion("qwen", {"kind": "ddpm", "prediction": "epsilon"}),
            "ddpm_16": diffusion("t5_16", {"kind": "ddpm", "prediction": "v_prediction"}),
            "flow": diffusion("t5", {"kind": "flow"}),
        },
    }  # fmt: skip
    result = cli("run", str(write_recipe(tmp / "r.yaml", recipe)))
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp / "run"


def sample_both(
    export: Path, prompt: str, steps: int, scale: float, sampler: str, seed: int = 5
) -> tuple[np.ndarray, np.ndarray, Any]:
    """(plain images, TextToImagePipeline images, the plain pipeline) for one prompt and seed;
    the plain pipeline keeps its own scheduler for ddpm, else gets the same sampler's."""
    import torch
    from diffusers import DiffusionPipeline

    from pipeline.diffusion.text_to_image_pipeline import TextToImagePipeline

    plain = DiffusionPipeline.from_pretrained(export)
    ours = TextToImagePipeline.from_pretrained(export)
    ours.use_sampler(sampler)
    if sampler != "ddpm":
        plain.scheduler = type(ours.scheduler).from_config(ours.scheduler.config)
    for pipe in (plain, ours):
        pipe.set_progress_bar_config(disable=True)
    common = {"num_inference_steps": steps, "guidance_scale": scale, "output_type": "np"}
    theirs = plain(
        prompt=prompt, generator=torch.Generator().manual_seed(seed), max_sequence_length=16,
        use_resolution_binning=False, clean_caption=False, **common,
    ).images  # fmt: skip
    mine = ours(prompt=prompt, generator=torch.Generator().manual_seed(seed), **common).images
    return theirs, mine, plain


@pytest.mark.parametrize(
    ("stage", "sampler", "steps", "scale"),
    [("ddpm", "ddpm", 4, 3.0), ("ddpm", "ddim", 3, 1.0), ("ddpm", "dpm++", 4, 2.0),
     ("ddpm_llama", "ddim", 3, 3.0)],
)  # fmt: skip
def test_a_plain_load_samples_what_text_to_image_pipeline_samples(
    plain_run: Path, stage: str, sampler: str, steps: int, scale: float
) -> None:
    """Cached and new prompts, with and without guidance against the empty caption: the same
    images from both classes (float32 caption cache); a different seed would differ. The
    custom_pipeline load still gives TextToImagePipeline."""
    from diffusers import DiffusionPipeline

    from data_prep.image_captions import read_captions

    export = plain_run / stage / "export"
    assert json.loads((export / "model_index.json").read_text())["_class_name"] == (
        "PixArtAlphaPipeline"
    )
    caption = read_captions(plain_run / "images" / "export", "val")[0]
    for prompt in (caption, "a purple hexagon left of a tiny star"):
        theirs, mine, plain = sample_both(export, prompt, steps, scale, sampler)
        assert type(plain).__name__ == "PixArtAlphaPipeline"
        assert theirs.shape == mine.shape == (1, 32, 32, 3)
        np.testing.assert_allclose(theirs, mine, atol=1e-5, err_msg=prompt)
    other, _, _ = sample_both(export, caption, steps, scale, sampler, seed=6)
    assert np.abs(other - theirs).max() > 1e-2  # the tolerance is far below a seed's change
    custom = DiffusionPipeline.from_pretrained(
        export, custom_pipeline="text_to_image_pipeline", trust_remote_code=True
    )
    assert type(custom).__name__ == "TextToImagePipeline"
    log = (plain_run / stage / "stage.log").read_text()
    assert "DiffusionPipeline.from_pretrained(export) loads a PixArtAlphaPipeline" in log
    assert "use_resolution_binning=False" in log and "max_sequence_length=16" in log


def test_a_float16_cache_agrees_up_to_its_rounding(plain_run: Path) -> None:
    """The plain class encodes in float32 where the cache (and so TextToImagePipeline) rounds
    to float16: the images differ by that rounding alone (v-prediction model)."""
    from data_prep.image_captions import read_captions

    export = plain_run / "ddpm_16" / "export"
    caption = read_captions(plain_run / "images" / "export", "train")[0]
    theirs, mine, plain = sample_both(export, caption, 4, 3.0, "ddim")
    assert type(plain).__name__ == "PixArtAlphaPipeline"
    np.testing.assert_allclose(theirs, mine, atol=2e-3)


def test_a_flow_model_stays_a_text_to_image_pipeline_and_the_log_says_why(
    plain_run: Path,
) -> None:
    """PixArtAlphaPipeline cannot drive flow-matching schedulers: the export keeps our class
    (which still loads) and the stage log says how to load it and why no plain load."""
    from pipeline.diffusion.text_to_image_pipeline import TextToImagePipeline

    export = plain_run / "flow" / "export"
    index = json.loads((export / "model_index.json").read_text())
    assert index["_class_name"] == "TextToImagePipeline"
    assert TextToImagePipeline.from_pretrained(export).config.objective == "flow"
    log = (plain_run / "flow" / "stage.log").read_text()
    assert 'custom_pipeline="text_to_image_pipeline"' in log
    assert "cannot drive the flow-matching schedulers" in log


def test_an_encoder_that_gives_the_empty_caption_no_token_stays_ours(plain_run: Path) -> None:
    """Qwen2's tokenizer gives "" no token: the cache holds zeros for it, PixArtAlphaPipeline
    would encode it through the model, so guidance would differ; the export keeps our class."""
    export = plain_run / "ddpm_qwen" / "export"
    assert json.loads((export / "model_index.json").read_text())["_class_name"] == (
        "TextToImagePipeline"
    )
    log = (plain_run / "ddpm_qwen" / "stage.log").read_text()
    assert "PixArtAlphaPipeline encodes the caption '' differently from the cache" in log


def test_the_probe_covers_captions_that_lowercasing_changes() -> None:
    from pipeline.diffusion.plain_pipeline import PROBE_CAPTIONS, probe_captions

    captions = [f"a red circle {i}" for i in range(20)] + ["A Red Circle", " a circle"]
    assert probe_captions(captions) == [*range(PROBE_CAPTIONS), 20, 21]


def test_the_exported_tokenizer_pads_on_the_right_as_the_stage_encoded(plain_run: Path) -> None:
    """A Llama tokenizer loads padding on the left unless its config says right: the export
    says so, and TextToImagePipeline encodes a caption as the cache holds it."""
    import torch

    from pipeline.diffusion.text_to_image_pipeline import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(plain_run / "ddpm_llama" / "export")
    assert pipe.tokenizer.padding_side == "right"
    rows, table = pipe.cached_captions()
    caption = next(iter(rows))
    states, mask, _ = pipe.encode_new([caption])
    assert torch.equal(mask[0], table["mask"][rows[caption]].float())
    torch.testing.assert_close(states[0], table["states"][rows[caption]].float())
