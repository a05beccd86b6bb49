"""A class-conditional image pipeline for diffusers: what the diffusion stage exports.

diffusers' DiTPipeline assumes a VAE and ImageNet's 1000 classes; this pipeline takes a DiT
(`transformer`) or a UNet (`unet`), any number of classes, pixel or latent space (`vae`), either
objective (DDPM epsilon/v, or flow matching) and classifier-free guidance. It loads the standard
way, with this module's class (pipeline.diffusion.class_conditional_pipeline.ClassConditionalPipeline):

    pipe = ClassConditionalPipeline.from_pretrained("runs/digits-dit/diffusion/export")
    images = pipe(class_labels=[0, 1, 2], num_inference_steps=20, guidance_scale=2.0).images

The export holds a copy of this file, which needs only torch, numpy and diffusers, so without
this project: `DiffusionPipeline.from_pretrained(export_dir,
custom_pipeline="class_conditional_pipeline", trust_remote_code=True)`. (diffusers scans this
file's import lines for the packages it needs; keep examples in prose free of import lines.)
Samplers are diffusers schedulers chosen by name (`pipe.use_sampler("dpm++")`): ddpm, ddim and
dpm++ (DPM-Solver++) for DDPM models; euler and heun for flow matching models.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

# sampler name -> (diffusers scheduler class name, config overrides). DDIM clips its x0 estimate
# but keeps the unclipped noise estimate; with guidance the two disagree and samples degrade
# (FD 159 vs 12 on the digits UNet at 50 steps), so DDIM samples unclipped.
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {"clip_sample": False}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "heun": ("FlowMatchHeunDiscreteScheduler", {}),
}
OBJECTIVE_SAMPLERS = {"ddpm": ("ddpm", "ddim", "dpm++"), "flow": ("euler", "heun")}


class ClassConditionalPipeline(DiffusionPipeline):
    """Sample class-conditional images from a DiT or UNet, with classifier-free guidance.

    Label `num_classes` is the null label the model was trained with (label dropout); guided
    output = uncond + guidance_scale * (cond - uncond), so 1.0 is plain conditional sampling
    and 0.0 unconditional.
    """

    model_cpu_offload_seq = "transformer->unet->vae"
    _optional_components = ["transformer", "unet", "vae"]

    def __init__(
        self,
        scheduler: Any,
        transformer: Any = None,
        unet: Any = None,
        vae: Any = None,
        num_classes: int = 1,
        class_names: list[str] | None = None,
        objective: str = "flow",
    ) -> None:
        super().__init__()
        if (transformer is None) == (unet is None):
            raise ValueError("pass exactly one denoiser: transformer (DiT) or unet")
        if objective not in OBJECTIVE_SAMPLERS:
            raise ValueError(f"objective {objective!r}: expected one of {list(OBJECTIVE_SAMPLERS)}")
        self.register_modules(transformer=transformer, unet=unet, vae=vae, scheduler=scheduler)
        self.register_to_config(
            num_classes=num_classes,
            class_names=list(class_names or [str(i) for i in range(num_classes)]),
            objective=objective,
        )

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.transformer if self.transformer is not None else self.unet

    def use_sampler(self, name: str) -> None:
        """Swap the scheduler for sampler `name`, keeping the trained noise schedule."""
        import diffusers

        allowed = OBJECTIVE_SAMPLERS[self.config.objective]
        if name not in allowed:
            raise ValueError(
                f"sampler {name!r} does not fit a {self.config.objective} model; "
                f"use one of {', '.join(allowed)}"
            )
        class_name, overrides = SAMPLERS[name]
        scheduler_cls = getattr(diffusers, class_name)
        self.scheduler = scheduler_cls.from_config(self.scheduler.config, **overrides)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int] | torch.Tensor,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Images for `class_labels` (ints in 0..num_classes-1, or num_classes = unconditional).

        output_type: "pil", "np" (float [0, 1], NHWC) or "pt" (float [0, 1], NCHW).
        """
        model = self.denoiser
        device = self._execution_device
        labels = torch.as_tensor(class_labels, device=device, dtype=torch.long).reshape(-1)
        if labels.min() < 0 or labels.max() > self.config.num_classes:
            raise ValueError(f"class labels must lie in 0..{self.config.num_classes}")
        channels, size = model.config.in_channels, model.config.sample_size
        dtype = next(model.parameters()).dtype
        sample = randn_tensor(
            (len(labels), channels, size, size), generator=generator, device=device, dtype=dtype
        )
        sample = sample * getattr(self.scheduler, "init_noise_sigma", 1.0)
        guided = guidance_scale != 1.0
        null = torch.full_like(labels, self.config.num_classes)
        model_labels = torch.cat([labels, null]) if guided else labels
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            inputs = torch.cat([sample, sample]) if guided else sample
            if hasattr(self.scheduler, "scale_model_input"):
                inputs = self.scheduler.scale_model_input(inputs, t)
            timesteps = t.expand(len(inputs)).to(device)
            output = model(inputs, timesteps, class_labels=model_labels).sample
            if guided:
                cond, uncond = output.chunk(2)
                output = uncond + guidance_scale * (cond - uncond)
            sample = self.scheduler.step(output, t, sample, generator=generator).prev_sample
        if self.vae is not None:
            sample = self.vae.decode(sample / self.vae.config.scaling_factor).sample
        images = (sample.float().clamp(-1, 1) + 1) / 2  # [B, C, H, W] in [0, 1]
        if output_type == "pil":
            images = self.numpy_to_pil(_to_numpy(images))
        elif output_type == "np":
            images = _to_numpy(images)
        elif output_type != "pt":
            raise ValueError(f"output_type {output_type!r}: expected pil, np or pt")
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def _to_numpy(images: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] tensor -> [B, H, W, C] float numpy (grey keeps one channel)."""
    return images.permute(0, 2, 3, 1).cpu().numpy()
