"""A text-to-image pipeline for diffusers: what the diffusion stage exports for a text-conditioned
transformer (PixArt-style cross-attention or SD3-style MMDiT).

It samples from caption embeddings: the text_encode stage's cached ones for the captions it
encoded (the export's `captions/` folder: every train and held-out caption and the empty one), or
embeddings the caller passes (`prompt_embeds=(states, mask, pooled)`), with classifier-free
guidance against the empty caption:

    pipe = TextToImagePipeline.from_pretrained("runs/shapes-text/diffusion/export")
    images = pipe(prompt=["a red circle left of a blue square"], guidance_scale=3.0).images

A prompt that is not among the cached captions is refused with a ValueError: this export holds
no text encoder yet. The export holds a copy of this file, which needs only torch, numpy,
safetensors and diffusers, so without this project: `DiffusionPipeline.from_pretrained(
export_dir, custom_pipeline="text_to_image_pipeline", trust_remote_code=True)`. (diffusers scans
this file's import lines for the packages it needs; keep examples in prose free of import lines.)
Samplers as in class_conditional_pipeline: ddpm, ddim, dpm++ for DDPM models; euler, heun for
flow matching models (`pipe.use_sampler(name)`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import load_file

SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {"clip_sample": False}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "heun": ("FlowMatchHeunDiscreteScheduler", {}),
}
OBJECTIVE_SAMPLERS = {"ddpm": ("ddpm", "ddim", "dpm++"), "flow": ("euler", "heun")}
CAPTIONS_DIR = "captions"  # captions.json + embeddings.safetensors (states, mask, pooled)


class TextToImagePipeline(DiffusionPipeline):
    """Sample images for captions from a text-conditioned transformer, with guidance:
    uncond + guidance_scale * (cond - uncond), uncond being the empty caption."""

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]

    def __init__(self, transformer: Any, scheduler: Any, vae: Any = None, objective: str = "flow"):
        super().__init__()
        if objective not in OBJECTIVE_SAMPLERS:
            raise ValueError(f"objective {objective!r}: expected one of {list(OBJECTIVE_SAMPLERS)}")
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler)
        self.register_to_config(objective=objective)
        self._captions: tuple[dict[str, int], dict[str, torch.Tensor]] | None = None

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
        self.scheduler = getattr(diffusers, class_name).from_config(
            self.scheduler.config, **overrides
        )

    def cached_captions(self) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
        """(caption -> row, {states, mask, pooled}) of the export's caption embeddings; the last
        row is the empty caption."""
        if self._captions is None:
            folder = os.path.join(self.config._name_or_path, CAPTIONS_DIR)
            with open(os.path.join(folder, "captions.json"), encoding="utf-8") as handle:
                captions = json.load(handle)
            table = load_file(os.path.join(folder, "embeddings.safetensors"))
            self._captions = ({c: i for i, c in enumerate(captions)}, table)
        return self._captions

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, ...]:
        """(states, mask, pooled) of cached captions, float32; a ValueError for others."""
        rows, table = self.cached_captions()
        missing = [p for p in prompts if p not in rows]
        if missing:
            raise ValueError(
                f"prompt {missing[0]!r} is not among the {len(rows)} cached captions and this "
                f"export has no text encoder; pass prompt_embeds=(states, mask, pooled)"
            )
        index = torch.tensor([rows[p] for p in prompts])
        return tuple(table[k][index].float() for k in ("states", "mask", "pooled"))

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_embeds: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Images for `prompt` (cached captions) or `prompt_embeds`. output_type: "pil", "np"
        (float [0, 1], NHWC) or "pt" (float [0, 1], NCHW)."""
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of prompt and prompt_embeds")
        if prompt is not None:
            prompt_embeds = self.encode([prompt] if isinstance(prompt, str) else list(prompt))
        device = self._execution_device
        cond = [t.to(device) for t in prompt_embeds]  # type: ignore[union-attr]
        sample = self._sample(cond, num_inference_steps, guidance_scale, generator, device)
        if self.vae is not None:
            sample = self.vae.decode(sample / self.vae.config.scaling_factor).sample
        images = (sample.float().clamp(-1, 1) + 1) / 2  # [B, C, H, W] in [0, 1]
        if output_type == "pil":
            images = self.numpy_to_pil(_to_numpy(images))
        elif output_type == "np":
            images = _to_numpy(images)
        elif output_type != "pt":
            raise ValueError(f"output_type {output_type!r}: expected pil, np or pt")
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _sample(
        self, cond: list[torch.Tensor], steps: int, scale: float, generator: Any, device: Any
    ) -> torch.Tensor:
        model = self.transformer
        batch = len(cond[0])
        guided = scale != 1.0
        if guided:
            _, table = self.cached_captions()
            empty = [table[k][-1:].float().to(device) for k in ("states", "mask", "pooled")]
            pairs = zip(cond, empty, strict=True)
            cond = [torch.cat([c, e.expand(batch, *e.shape[1:])]) for c, e in pairs]
        channels, size = model.config.in_channels, model.config.sample_size
        dtype = next(model.parameters()).dtype
        sample = randn_tensor(
            (batch, channels, size, size), generator=generator, device=device, dtype=dtype
        )
        sample = sample * getattr(self.scheduler, "init_noise_sigma", 1.0)
        self.scheduler.set_timesteps(steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            inputs = torch.cat([sample, sample]) if guided else sample
            if hasattr(self.scheduler, "scale_model_input"):
                inputs = self.scheduler.scale_model_input(inputs, t)
            timesteps = t.expand(len(inputs)).to(device)
            output = call_text_denoiser(model, inputs, timesteps, *cond).sample
            if guided:
                conditional, unconditional = output.chunk(2)
                output = unconditional + scale * (conditional - unconditional)
            sample = self.scheduler.step(output, t, sample, generator=generator).prev_sample
        return sample


def call_text_denoiser(
    transformer: Any, sample: Any, timestep: Any, states: Any, mask: Any, pooled: Any
) -> Any:
    """One forward of a PixArt or SD3 transformer on caption embeddings; `.sample` out (the call
    training makes too: pipeline.models.text_denoisers)."""
    if type(transformer).__name__ == "PixArtTransformer2DModel":
        return transformer(
            sample,
            encoder_hidden_states=states,
            encoder_attention_mask=mask,
            timestep=timestep,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        )
    return transformer(
        sample, encoder_hidden_states=states, pooled_projections=pooled, timestep=timestep
    )


def _to_numpy(images: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] tensor -> [B, H, W, C] float numpy."""
    return images.permute(0, 2, 3, 1).cpu().numpy()
