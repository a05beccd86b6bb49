"""A text-to-image pipeline for diffusers: what the diffusion stage exports for a text-conditioned
transformer (PixArt-style cross-attention or SD3-style MMDiT).

It samples from caption embeddings with classifier-free guidance against the empty caption. A
prompt the text_encode stage encoded (every train and held-out caption: the export's `captions/`
folder) reads its cached embedding, exactly what training saw; any other prompt is encoded by
the export's own text encoder (`text_encoder` + `tokenizer`, the model the text_encode stage
used, or the hashed bag of words, `config.encoder`) with the functions at the end of this file,
which the text_encode stage encodes with too, rounded to the cache's dtype. Or pass
`prompt_embeds=(states, mask, pooled)`:

    pipe = TextToImagePipeline.from_pretrained("runs/shapes-text/diffusion/export")
    images = pipe(prompt=["a red circle left of a blue square"], guidance_scale=3.0).images

The export holds a copy of this file, which needs only torch, numpy,
safetensors and diffusers, so without this project: `DiffusionPipeline.from_pretrained(
export_dir, custom_pipeline="text_to_image_pipeline", trust_remote_code=True)`. (diffusers scans
this file's import lines for the packages it needs; keep examples in prose free of import lines.)
Samplers as in class_conditional_pipeline: ddpm, ddim, dpm++ for DDPM models; euler, heun for
flow matching models (`pipe.use_sampler(name)`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
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
WORD = re.compile(r"\w+")
BAG_OF_WORDS_DIM = 64


class TextToImagePipeline(DiffusionPipeline):
    """Sample images for captions from a text-conditioned transformer, with guidance:
    uncond + guidance_scale * (cond - uncond), uncond being the empty caption."""

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["vae", "text_encoder", "tokenizer"]

    def __init__(
        self,
        transformer: Any,
        scheduler: Any,
        vae: Any = None,
        text_encoder: Any = None,
        tokenizer: Any = None,
        objective: str = "flow",
        encoder: dict[str, Any] | None = None,
    ):
        super().__init__()
        if objective not in OBJECTIVE_SAMPLERS:
            raise ValueError(f"objective {objective!r}: expected one of {list(OBJECTIVE_SAMPLERS)}")
        self.register_modules(
            transformer=transformer,
            vae=vae,
            scheduler=scheduler,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
        )
        # encoder: {kind: model | bag-of-words | none, max_length, layer, pooled_output, dim,
        # dtype (of the cache, which new prompts are rounded to)}
        self.register_to_config(objective=objective, encoder=encoder or {"kind": "none"})
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
        """(states, mask, pooled) of the prompts, float32: cached, else encoded (module
        docstring); a ValueError where the export has no encoder."""
        rows, table = self.cached_captions()
        out = [
            table[k][[rows.get(p, 0) for p in prompts]].float()
            for k in ("states", "mask", "pooled")
        ]
        new = [i for i, p in enumerate(prompts) if p not in rows]
        if new:
            fresh = self.encode_new([prompts[i] for i in new])
            for tensor, values in zip(out, fresh, strict=True):
                tensor[new] = values
        return tuple(out)

    def encode_new(self, prompts: list[str]) -> tuple[torch.Tensor, ...]:
        """(states, mask, pooled) of prompts the cache lacks, by the export's encoder."""
        spec = self.config.encoder
        if spec["kind"] == "bag-of-words":
            arrays = bag_of_words(prompts, spec["max_length"], spec["dim"])[:3]
        elif spec["kind"] == "model" and self.text_encoder is not None:
            arrays = encode_with_model(
                self.text_encoder, self.tokenizer, prompts, spec["max_length"], spec.get("layer"),
                spec.get("pooled_output"),
            )[:3]  # fmt: skip
        else:
            raise ValueError(
                f"prompt {prompts[0]!r} is not among the cached captions and this export has no "
                f"text encoder; pass prompt_embeds=(states, mask, pooled)"
            )
        dtype = getattr(np, spec.get("dtype", "float32"))
        states, mask, pooled = (a.astype(dtype).astype(np.float32) for a in arrays)
        return torch.from_numpy(states), torch.from_numpy(mask), torch.from_numpy(pooled)

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


# ---------------------------------------------------------------------------------------------
# Caption encoding: the text_encode stage encodes with these functions, and so does this
# pipeline for a prompt it has not cached, so the two agree by construction.


def masked_mean(states: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[B, D]: the mean of states [B, L, D] over positions where mask [B, L]; zeros for none."""
    counts = np.maximum(mask.sum(axis=1, keepdims=True), 1).astype(np.float32)
    return (states * mask[..., None]).sum(axis=1) / counts


def word_vector(word: str, dim: int = BAG_OF_WORDS_DIM) -> np.ndarray:
    """float32 [dim]: a word's fixed random vector, seeded by its SHA-256 (the same everywhere)."""
    seed = int.from_bytes(hashlib.sha256(word.encode("utf-8")).digest()[:8], "big")
    return (np.random.default_rng(seed).standard_normal(dim) / np.sqrt(dim)).astype(np.float32)


def bag_of_words(
    texts: list[str], max_length: int, dim: int = BAG_OF_WORDS_DIM
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(states [B, L, D], mask [B, L], pooled [B, D], truncated [B]) of lowercase words."""
    states = np.zeros((len(texts), max_length, dim), np.float32)
    mask = np.zeros((len(texts), max_length), bool)
    truncated = np.zeros(len(texts), bool)
    vectors: dict[str, np.ndarray] = {}
    for row, text in enumerate(texts):
        words = WORD.findall(text.lower())
        truncated[row] = len(words) > max_length
        for position, word in enumerate(words[:max_length]):
            if word not in vectors:
                vectors[word] = word_vector(word, dim)
            states[row, position], mask[row, position] = vectors[word], True
    return states, mask, masked_mean(states, mask), truncated


def encode_with_model(
    model: Any,
    tokenizer: Any,
    texts: list[str],
    max_length: int,
    layer: int | None = None,
    pooled_output: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(states, mask, pooled, truncated) from a frozen text encoder: captions padded on the
    right to max_length and cut there; states of `layer` (None: the final output); pooled the
    model's `pooled_output` or the masked mean. A caption with no token runs with one position
    unmasked (no attention row is empty) and is zeroed. ValueError for a layer out of range."""
    lengths = [len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]]
    batch = tokenizer(
        texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    mask = batch["attention_mask"].bool()
    empty = ~mask.any(dim=1)
    attention = mask.clone()
    attention[empty, 0] = True
    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=attention.long().to(device),
            output_hidden_states=layer is not None,
        )
    if layer is None:
        hidden = out.last_hidden_state
    elif -len(out.hidden_states) <= layer < len(out.hidden_states):
        hidden = out.hidden_states[layer]
    else:
        raise ValueError(
            f"{layer}, but the model has hidden states 0..{len(out.hidden_states) - 1} "
            f"(0: embeddings; -1: the last block)"
        )
    states = hidden.float().cpu().numpy().copy()
    mask_np = mask.numpy()
    if pooled_output is None:
        pooled = masked_mean(states, mask_np)
    else:
        pooled = getattr(out, pooled_output).float().cpu().numpy().copy()
    states[empty.numpy()], pooled[empty.numpy()] = 0.0, 0.0
    return states, mask_np, pooled, np.asarray(lengths) > max_length
