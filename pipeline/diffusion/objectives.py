"""Diffusion training objectives: DDPM (epsilon or v prediction) and flow matching.

Each objective turns clean inputs x0 [B, C, H, W] and labels [B] into a loss, drawing every random
number (timesteps, noise, label dropout) from the generator it is given, so a step's loss is a
pure function of (seed, step, rank, micro step) and resume is exact. Each also builds the
diffusers scheduler its export samples with; the timestep conventions match those schedulers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from pipeline.engine.config import Strict

if TYPE_CHECKING:
    import torch

# Fields only one objective reads; setting one for the other is a mistake, not a no-op.
OBJECTIVE_FIELDS: dict[str, tuple[str, ...]] = {
    "ddpm": ("prediction", "beta_schedule"),
    "flow": ("logit_mean", "logit_std"),
}


class ObjectiveConfig(Strict):
    """What the denoiser learns to predict, and how training timesteps are drawn."""

    kind: Literal["flow", "ddpm"] = Field(
        "flow", description="flow: rectified flow (velocity); ddpm: denoising diffusion"
    )
    num_train_timesteps: int = Field(1000, ge=10)
    # ddpm
    prediction: Literal["epsilon", "v_prediction"] = Field(
        "epsilon", description="ddpm: predict the noise or the velocity v"
    )
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = Field(
        "squaredcos_cap_v2", description="ddpm: noise schedule (squaredcos_cap_v2 = cosine)"
    )
    # flow
    logit_mean: float = Field(0.0, description="flow: t = sigmoid(N(logit_mean, logit_std))")
    logit_std: float = Field(1.0, gt=0, description="flow: spread of logit-normal timesteps")

    @model_validator(mode="after")
    def _check(self) -> ObjectiveConfig:
        for kind, names in OBJECTIVE_FIELDS.items():
            stray = [
                n
                for n in names
                if kind != self.kind and getattr(self, n) != type(self).model_fields[n].default
            ]
            if stray:
                raise ValueError(
                    f"{', '.join(stray)} only applies to objective {kind}, not {self.kind}; "
                    f"remove it"
                )
        return self


class DiffusionObjective:
    """Loss of a denoiser on a batch, with classifier-free-guidance label dropout."""

    def __init__(
        self, cfg: ObjectiveConfig, null_label: int, label_dropout: float, clip_sample: bool
    ) -> None:
        self.cfg = cfg
        self.null_label = null_label
        self.label_dropout = label_dropout
        self.clip_sample = clip_sample
        self._scheduler = self.scheduler()

    def scheduler(self) -> Any:
        """The diffusers scheduler that samples from a model trained with this objective."""
        from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

        if self.cfg.kind == "flow":
            return FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.cfg.num_train_timesteps)
        return DDPMScheduler(
            num_train_timesteps=self.cfg.num_train_timesteps,
            beta_schedule=self.cfg.beta_schedule,
            prediction_type=self.cfg.prediction,
            clip_sample=self.clip_sample,  # pixels live in [-1, 1]; latents do not
        )

    def loss(
        self,
        model: torch.nn.Module,
        x0: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean squared error of the model's prediction; x0 [B, C, H, W], labels [B]."""
        import torch

        batch = len(x0)
        # Draw order is fixed: label dropout, timesteps, noise (all on the CPU generator).
        dropped = torch.rand(batch, generator=generator) < self.label_dropout
        if self.cfg.kind == "flow":
            logits = torch.randn(batch, generator=generator) * self.cfg.logit_std
            t = torch.sigmoid(logits + self.cfg.logit_mean)  # [B] in (0, 1); 1 = pure noise
        else:
            t = torch.randint(0, self.cfg.num_train_timesteps, (batch,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        dropped, t, noise = dropped.to(x0.device), t.to(x0.device), noise.to(x0)
        labels = torch.where(dropped, self.null_label, labels)
        if self.cfg.kind == "flow":
            t_b = t.view(-1, 1, 1, 1).to(x0.dtype)
            noisy = (1 - t_b) * x0 + t_b * noise
            target = noise - x0  # velocity d noisy / d t
            timesteps = t * self.cfg.num_train_timesteps  # FlowMatch schedulers' convention
        else:
            noisy = self._scheduler.add_noise(x0, noise, t)
            target = noise if self.cfg.prediction == "epsilon" else self._v(x0, noise, t)
            timesteps = t
        prediction = model(noisy, timesteps, class_labels=labels).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), target.float())
        return loss, {}

    def _v(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * x0 (diffusers' get_velocity)."""
        return self._scheduler.get_velocity(x0, noise, t)
