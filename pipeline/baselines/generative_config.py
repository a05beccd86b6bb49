"""The generative task's schema: a model row and the options every row shares (recipe keys),
and the quantised pixels, with the shared scorer's state, that every row is trained and scored on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from eval import images as image_eval
from pipeline.baselines.training import DeepOptions, TrainSettings

GRID_SIDE = 8  # sample grids are GRID_SIDE x GRID_SIDE images
SAMPLE_BATCH = 500


class GenerativeModel(TrainSettings):
    """A net trained here (`net`) or a diffusion stage's export sampled here (`from_stage`)."""

    net: Literal["vae", "gan", "flow", "pixelcnn"] | None = None
    hidden: int = Field(64, ge=4, description="vae: MLP width; gan: base channels; flow, "
                        "pixelcnn: conv channels")  # fmt: skip
    latent_dim: int = Field(16, ge=1, description="vae, gan: size of z")
    layers: int = Field(4, ge=1, description="flow: coupling layers; pixelcnn: residual blocks")
    epochs: int | None = Field(None, ge=1, description="default: options.epochs")
    from_stage: str | None = Field(None, description="a diffusion stage listed in `after:`")
    sampler: image_eval.Sampler | None = Field(None, description="default: euler / dpm++")
    steps: int = Field(20, ge=1, description="diffusion sampler steps")
    guidance_scale: float = Field(1.0, ge=0, description="classifier-free guidance; 1 = none")
    conditional: bool = Field(
        True, description="diffusion: class-balanced labels; false: the null (unconditional) label"
    )

    @model_validator(mode="after")
    def _check(self) -> GenerativeModel:
        if (self.net is None) == (self.from_stage is None):
            raise ValueError(
                "set exactly one of net (vae, gan, flow, pixelcnn) or from_stage (a diffusion "
                "stage of this recipe)"
            )
        diffusion_only = ("sampler", "steps", "guidance_scale", "conditional")
        unused = diffusion_only if self.net else tuple(TrainSettings.model_fields) + (
            "hidden", "latent_dim", "layers", "epochs",
        )  # fmt: skip
        # Compare with defaults: the resolved recipe spells out every default.
        stray = [n for n in unused if getattr(self, n) != type(self).model_fields[n].default]
        if stray:
            kind = f"net: {self.net}" if self.net else "from_stage"
            raise ValueError(f"{', '.join(stray)} do not apply to a {kind} model; remove them")
        if self.net == "gan" and self.optimizer != "adam":
            raise ValueError(
                "net gan trains with Adam (betas 0.5, 0.999, as DCGAN); drop optimizer"
            )
        return self


class GenerativeOptions(DeepOptions):
    """Budget and scoring every model of the stage shares."""

    epochs: int = Field(20, ge=1, description="epochs of each net trained here")
    batch_size: int = Field(64, ge=1)
    levels: int = Field(
        256, ge=2, le=256, description="grey levels per pixel; 17 is lossless for builtin:digits"
    )
    num_samples: int = Field(1000, ge=GRID_SIDE**2, description="samples scored per model")
    classifier_epochs: int = Field(20, ge=1, description="epochs of the shared feature classifier")
    knn_k: int = Field(3, ge=1, description="k of the precision/recall manifolds")


@dataclass(frozen=True)
class Pixels:
    """Quantised images (int64 [N, C, H, W] in 0..levels-1) and the shared scorer's state."""

    train: np.ndarray
    test: np.ndarray
    levels: int
    lossless: bool
    classifier: Any  # eval.images feature classifier, trained on the training images
    test_features: np.ndarray
    classifier_accuracy: float
    references: dict[str, float]  # FD of real training images and of uniform noise


def unit(q: np.ndarray, levels: int) -> np.ndarray:
    """Integer pixels as float32 in [-1, 1], the scale eval/images.py expects."""
    return (q * (2 / (levels - 1)) - 1).astype(np.float32)
