"""Diffusion model builders: DiT and UNet denoisers and the AutoencoderKL, from diffusers configs.

Every model is built from a config (never downloaded weights). Class conditioning uses one extra
label, index `num_classes`, as the null ("no class") label of classifier-free guidance; the
training loop drops labels to it itself, from its replayable generator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from pipeline.engine.config import Strict
from pipeline.engine.errors import PipelineError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DenoiserSpec:
    """One denoiser architecture: its builder, the config fields only it reads, its FSDP units."""

    # (cfg, channels, sample_size, num_classes, where) -> a module taking (sample, timestep,
    # class_labels) and returning `.sample` of the input's shape
    # None for the text-conditioned arches: pipeline.models.text_denoisers builds those
    build: Callable[[DiffusionModelConfig, int, int, int, str], torch.nn.Module] | None
    fields: tuple[str, ...]
    wrap_classes: tuple[str, ...]  # module class names FSDP wraps as units
    text: bool = False  # conditioned on caption embeddings (a text_encode stage), not classes


def size_problem(
    cfg: DiffusionModelConfig, sample_size: int, where: str, origin: str = ""
) -> str | None:
    """Why `cfg`'s denoiser cannot take square inputs of `sample_size` (`origin`: where that
    size comes from, for the message), or None."""
    size = f"{sample_size}{f' ({origin})' if origin else ''}"
    if cfg.arch == "unet":
        levels = len(cfg.block_out_channels)
        if sample_size % 2 ** (levels - 1):
            return (
                f"{where}.model.block_out_channels: {levels} levels halve the input {levels - 1} "
                f"times, but its size {size} is not divisible by {2 ** (levels - 1)}; "
                f"use fewer levels"
            )
    elif sample_size % cfg.patch_size:
        return (
            f"{where}.model.patch_size: {cfg.patch_size} does not divide the input size {size}; "
            f"choose a divisor"
        )
    return None


def build_dit(
    cfg: DiffusionModelConfig, channels: int, sample_size: int, num_classes: int, where: str
) -> torch.nn.Module:
    """A DiTTransformer2DModel over patches of the input."""
    if problem := size_problem(cfg, sample_size, where):
        raise PipelineError(problem)
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=channels,
        num_layers=cfg.num_layers,
        sample_size=sample_size,
        patch_size=cfg.patch_size,
        num_embeds_ada_norm=num_classes,
    )
    # Every DiT block embeds the label itself and, in training mode, drops it to the null
    # row with torch's global RNG, independently per block. We drop labels ourselves (one
    # decision per sample, from the replayable generator), so switch that off; the null row
    # (index num_classes) exists because the built-in dropout probability is non-zero.
    for module in model.modules():
        if type(module).__name__ == "LabelEmbedding":
            module.dropout_prob = 0.0
    return model


def build_unet(
    cfg: DiffusionModelConfig, channels: int, sample_size: int, num_classes: int, where: str
) -> torch.nn.Module:
    """A UNet2DModel with a class embedding (one row more for the null label)."""
    if problem := size_problem(cfg, sample_size, where):
        raise PipelineError(problem)
    levels = len(cfg.block_out_channels)
    from diffusers import UNet2DModel

    attention = cfg.attention_levels or [level > 0 for level in range(levels)]
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        norm_num_groups=cfg.norm_num_groups,
        attention_head_dim=8,
        num_class_embeds=num_classes + 1,  # + the null label
    )


TRANSFORMER_FIELDS = ("patch_size", "hidden_size", "num_layers", "num_heads")
DENOISERS: dict[str, DenoiserSpec] = {
    "dit": DenoiserSpec(
        build_dit,
        fields=TRANSFORMER_FIELDS,
        # Not DiT's BasicTransformerBlock: DiT's forward reuses block 0's label embedder after
        # the blocks ran, when a wrapped block's parameters are resharded.
        wrap_classes=("Attention", "FeedForward"),
    ),
    "unet": DenoiserSpec(
        build_unet,
        fields=("block_out_channels", "layers_per_block", "attention_levels", "norm_num_groups"),
        wrap_classes=(
            "DownBlock2D",
            "AttnDownBlock2D",
            "UpBlock2D",
            "AttnUpBlock2D",
            "UNetMidBlock2D",
        ),
    ),
    # PixArt-alpha: self-attention, cross-attention to the caption, adaLN-single (timestep)
    "pixart": DenoiserSpec(None, TRANSFORMER_FIELDS, ("BasicTransformerBlock",), text=True),
    # SD3's MMDiT: one joint sequence of patches and caption tokens, pooled caption + timestep
    "mmdit": DenoiserSpec(None, TRANSFORMER_FIELDS, ("JointTransformerBlock",), text=True),
}
# FSDP units per arch, as the diffusion stage reads them; DENOISERS[arch].wrap_classes is the spec.


class DiffusionModelConfig(Strict):
    """The denoiser: class-conditional, a DiT (DiTTransformer2DModel) or a UNet (UNet2DModel);
    or conditioned on captions, pixart (PixArtTransformer2DModel) or mmdit
    (SD3Transformer2DModel), which read a text_encode stage's embeddings."""

    arch: Literal[tuple(DENOISERS)] = "dit"
    num_classes: int | None = Field(
        None, ge=1, description="default: the data's class count; if set, the data must agree"
    )
    # transformers: dit, pixart, mmdit
    patch_size: int = Field(2, ge=1, description="transformers: pixels (or latents) per patch side")
    hidden_size: int = Field(128, ge=8, description="transformers: width (num_heads x head dim)")
    num_layers: int = Field(4, ge=1, description="transformers: blocks")
    num_heads: int = Field(4, ge=1, description="transformers: attention heads")
    # unet
    block_out_channels: list[int] = Field(
        [32, 64], min_length=1, description="unet: channels per resolution level"
    )
    layers_per_block: int = Field(1, ge=1, description="unet: resnet layers per level")
    attention_levels: list[bool] | None = Field(
        None, description="unet: self-attention per level; default: every level but the first"
    )
    norm_num_groups: int = Field(8, ge=1, description="unet: GroupNorm groups")

    @model_validator(mode="after")
    def _check(self) -> DiffusionModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}"
            )
        if self.attention_levels is not None and len(self.attention_levels) != len(
            self.block_out_channels
        ):
            raise ValueError("attention_levels needs one entry per block_out_channels entry")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"block_out_channels {bad} must be divisible by norm_num_groups "
                f"{self.norm_num_groups}"
            )
        own = DENOISERS[self.arch].fields
        for arch, spec in DENOISERS.items():
            # Compare with defaults: the resolved recipe.yaml spells out every default.
            stray = [
                n
                for n in spec.fields
                if n not in own and getattr(self, n) != type(self).model_fields[n].default
            ]
            if stray:
                raise ValueError(
                    f"{', '.join(stray)} only applies to arch {arch}, not {self.arch}; remove it"
                )
        return self


class VAEModelConfig(Strict):
    """An AutoencoderKL: each level after the first halves the resolution."""

    block_out_channels: list[int] = Field([32, 64], min_length=1)
    layers_per_block: int = Field(1, ge=1)
    latent_channels: int = Field(4, ge=1)
    norm_num_groups: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _check(self) -> VAEModelConfig:
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"block_out_channels {bad} must be divisible by norm_num_groups "
                f"{self.norm_num_groups}"
            )
        return self

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


def resolve_num_classes(cfg: DiffusionModelConfig, data_classes: int, where: str) -> int:
    """The class count: the data's, which a configured num_classes must equal."""
    if cfg.num_classes is not None and cfg.num_classes != data_classes:
        raise PipelineError(
            f"{where}.model.num_classes: {cfg.num_classes}, but the data has {data_classes} "
            f"classes; remove num_classes or fix the data"
        )
    return data_classes


def build_denoiser(
    cfg: DiffusionModelConfig, channels: int, sample_size: int, num_classes: int, where: str
) -> torch.nn.Module:
    """A class-conditional DiT or UNet for [B, channels, sample_size, sample_size] inputs.

    Both take (sample, timestep, class_labels) with labels in 0..num_classes (num_classes =
    null label) and return `.sample` of the input's shape.
    """
    build = DENOISERS[cfg.arch].build
    assert build is not None, f"{cfg.arch} is text-conditioned: text_denoisers builds it"
    return build(cfg, channels, sample_size, num_classes, where)


def build_vae(cfg: VAEModelConfig, channels: int, sample_size: int, where: str) -> torch.nn.Module:
    """An AutoencoderKL for [B, channels, sample_size, sample_size] images in [-1, 1]."""
    if sample_size % cfg.downsample:
        raise PipelineError(
            f"{where}.model.block_out_channels: {len(cfg.block_out_channels)} levels downsample "
            f"by {cfg.downsample}, which does not divide the image size {sample_size}; "
            f"use fewer levels or resize the images"
        )
    from diffusers import AutoencoderKL

    levels = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=sample_size,
    )


def vae_with_loss(vae: torch.nn.Module) -> torch.nn.Module:
    """The VAE behind one forward that returns (reconstruction, KL per sample).

    DDP synchronises gradients only for work done inside the wrapped module's forward, so the
    encode-sample-decode step must be one forward call.
    """
    import torch

    class VAEWithLoss(torch.nn.Module):
        def __init__(self, vae: torch.nn.Module) -> None:
            super().__init__()
            self.vae = vae

        def forward(
            self, images: torch.Tensor, generator: torch.Generator
        ) -> tuple[torch.Tensor, torch.Tensor]:
            posterior = self.vae.encode(images).latent_dist
            latents = posterior.sample(generator=generator)  # [B, c, h, w]
            return self.vae.decode(latents).sample, posterior.kl()

    return VAEWithLoss(vae)
