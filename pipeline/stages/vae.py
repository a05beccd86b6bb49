"""Stage kind `vae`: train a diffusers AutoencoderKL on image shards and cache their latents.

A downstream diffusion stage with `space: latent` trains on the cached latents and ships this
VAE in its export to decode samples. Loss: mean squared reconstruction error plus `kl_weight`
times the KL divergence to N(0, I) per latent element. Latents are the posterior means scaled by
1 / (their standard deviation on the train split), the VAE config's `scaling_factor`, so the
diffusion model sees inputs of unit scale (as Stable Diffusion does).

Export: `vae/` (AutoencoderKL.from_pretrained loads it), `latents/` (shards in the images
stage's format, dtype float32, normalisation "identity", same classes and splits) and a
reconstruction grid for the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from pipeline.diffusion.training import ImageTrainingConfig
from pipeline.engine.context import StageContext
from pipeline.engine.inputs import Input, PlanView, StageSpec
from pipeline.models.diffusion import VAEModelConfig

if TYPE_CHECKING:
    import torch

    from data_prep.images import ImageShards

ENCODE_BATCH = 256
# The export's parts a latent diffusion stage reads: the shards it trains on, the VAE it ships.
LATENTS_DIR = "latents"
VAE_DIR = "vae"


class Config(ImageTrainingConfig):
    """Train an AutoencoderKL on the upstream images stage and cache latents of both splits."""

    kind: Literal["vae"] = "vae"
    model: VAEModelConfig = VAEModelConfig()
    kl_weight: float = Field(1e-3, ge=0, description="weight of the KL term per latent element")


def run(ctx: StageContext) -> None:
    import torch

    from data_prep.images import ImageShards
    from pipeline.diffusion.training import train_images
    from pipeline.models.diffusion import build_vae, vae_with_loss
    from pipeline.train.runtime import torch_threads

    cfg = ctx.config
    assert isinstance(cfg, Config)
    images_dir = ctx.input("images").path
    splits = ImageShards(images_dir, "train"), ImageShards(images_dir, "val")
    channels, height, width = splits[0].shape
    torch.manual_seed(ctx.seed)
    vae = build_vae(cfg.model, channels, height, f"stages.{ctx.name}")
    kl_weight = cfg.kl_weight
    latents_per_image = cfg.model.latent_channels * (height // cfg.model.downsample) ** 2

    def loss_fn(
        model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, generator: Any
    ) -> tuple[torch.Tensor, dict[str, float]]:
        recon, kl = model(images, generator)  # [B, C, H, W], [B]
        mse = torch.nn.functional.mse_loss(recon.float(), images.float())
        kl_per_latent = kl.float().mean() / latents_per_image
        return mse + kl_weight * kl_per_latent, {
            "recon_mse": mse.detach(),
            "kl": kl_per_latent.detach(),
        }

    with torch_threads(cfg.cpu_threads):
        trained = train_images(
            ctx, cfg, vae_with_loss(vae), loss_fn, splits, None, ["DownEncoderBlock2D"]
        )
        state = trained.ema_state_dict()
        summary = dict(trained.summary)
        if trained.accelerator.is_main_process:
            from diffusers import AutoencoderKL

            model = AutoencoderKL.from_config(vae.config)
            model.load_state_dict({k.removeprefix("vae."): v for k, v in state.items()})
            model.to(trained.accelerator.device).eval()
            summary.update(export_vae(model, splits, ctx.export_dir))
        trained.accelerator.wait_for_everyone()
    ctx.write_summary(summary, headline="val_recon_mse")


def export_vae(
    vae: Any, splits: tuple[ImageShards, ImageShards], export_dir: Path
) -> dict[str, float]:
    """Write latents/ and vae/ (with its scaling_factor) and a reconstruction grid."""
    from data_prep.images import save_split
    from data_prep.images_meta import IDENTITY, ImageIndex
    from eval.images import save_grid_png
    from pipeline.engine.sections import write_sections

    train_latents = encode(vae, splits[0])
    scaling = float(1.0 / train_latents.std())
    vae.register_to_config(scaling_factor=scaling)
    entries = {}
    for shards, latents in ((splits[0], train_latents), (splits[1], encode(vae, splits[1]))):
        entries[shards.split] = save_split(
            export_dir / LATENTS_DIR, shards.split, latents * scaling, np.asarray(shards.labels)
        )
    ImageIndex(
        shape=list(train_latents.shape[1:]), dtype="float32", normalisation=IDENTITY,
        classes=splits[0].classes, splits=entries, scaling_factor=scaling,
        source=str(splits[0].export_dir),
    ).write(export_dir / LATENTS_DIR)  # fmt: skip
    vae.save_pretrained(export_dir / VAE_DIR, safe_serialization=True)
    originals, _ = splits[1].arrays(max_images=16)
    recon = reconstruct(vae, originals)
    save_grid_png(np.concatenate([originals, recon]), export_dir / "reconstructions.png", nrow=16)
    mse = float(((recon - originals) ** 2).mean())
    write_sections(
        export_dir,
        [
            {
                "title": "VAE reconstructions",
                "note": f"Top: validation images; bottom: decoded posterior means. "
                f"Latents {list(train_latents.shape[1:])}, scaling_factor {scaling:.3f}.",
                "images": ["reconstructions.png"],
            }
        ],
    )
    return {"val_recon_mse": mse, "scaling_factor": scaling}


def encode(vae: Any, shards: ImageShards) -> np.ndarray:
    """Posterior means [N, c, h, w] (float32) of every image of a split, in order."""
    import torch

    out = []
    with torch.no_grad():
        for start in range(0, len(shards), ENCODE_BATCH):
            images, _ = shards.take(np.arange(start, min(start + ENCODE_BATCH, len(shards))))
            latents = vae.encode(torch.from_numpy(images).to(vae.device)).latent_dist.mode()
            out.append(latents.float().cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def reconstruct(vae: Any, images: np.ndarray) -> np.ndarray:
    """Decoded posterior means of images [N, C, H, W] in [-1, 1], clipped to [-1, 1]."""
    import torch

    with torch.no_grad():
        latents = vae.encode(torch.from_numpy(images).to(vae.device)).latent_dist.mode()
        return vae.decode(latents).sample.clamp(-1, 1).float().cpu().numpy()


def size_problems(view: PlanView) -> list[str]:
    """The VAE halves the images' size once per level after the first: a size it does not
    divide would come back decoded at another size."""
    from data_prep.images import planned_size

    planned, factor = planned_size(view.first("images")), view.config.model.downsample
    if planned is None or planned[0] % factor == 0:
        return []
    (size, origin), levels = planned, len(view.config.model.block_out_channels)
    return [
        f"stages.{view.name}.model.block_out_channels: {levels} levels shrink images {factor}x, "
        f"but the images are {size} wide ({origin}), not divisible by {factor}; "
        f"use fewer levels or an image_size divisible by {factor}"
    ]


SPEC = StageSpec(
    Config, run, output="vae", inputs=(Input("images", ("images",)),), plan_check=size_problems
)
