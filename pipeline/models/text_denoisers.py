"""Text-conditioned denoisers: PixArt-style cross-attention and SD3-style MMDiT transformers
(diffusers' `PixArtTransformer2DModel` and `SD3Transformer2DModel`), built from a config.

The objective calls a denoiser as a class-conditional one, `model(sample, timestep,
class_labels=rows).sample`; for text the "labels" are rows of a table of cached caption
embeddings (the text_encode stage's export: per-token states, their mask and a pooled vector),
whose last row is the empty caption. Dropping a label to the null label is then dropping the
caption to "" (classifier-free guidance), drawn from the objective's replayable generator like
every other random number, so resume stays exact. `TextConditioned` does the lookup inside its
forward (DDP and FSDP see one module call) and keeps the table out of its parameters, buffers
and state dict: it is data, shared read-only, never trained, checkpointed or broadcast.

- pixart: patches of the sample attend to themselves, then to the caption's states through
  cross-attention (padded tokens masked out); the timestep modulates every block (adaLN-single).
  The caption states are projected to the width by the model's own caption projection.
- mmdit: the sample's patches and the caption's tokens form one joint sequence with separate
  weights per stream; the pooled caption vector joins the timestep embedding. diffusers' SD3
  blocks take no attention mask, so the caption's padding is attended like its tokens (as SD3
  does with its zero-padded T5 states).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.engine.errors import PipelineError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from pipeline.models.diffusion import DiffusionModelConfig

TEXT_ARCHES = ("pixart", "mmdit")


Rows = tuple["np.ndarray", "np.ndarray", "np.ndarray"]  # states [B, L, D], mask [B, L], pooled


@dataclass(frozen=True)
class CaptionTable:
    """Cached caption embeddings: `lookup(rows)` gives (states, mask, pooled) of caption rows
    0..size-1 as numpy arrays; the last row (`null_row`) is the empty caption. Read a batch at a
    time (a memory-mapped export stays on disk)."""

    size: int
    dim: int
    pooled_dim: int
    lookup: Callable[[np.ndarray], Rows]

    @property
    def null_row(self) -> int:
        return self.size - 1

    def rows(self, ids: torch.Tensor, device: Any) -> tuple[torch.Tensor, ...]:
        """(states, mask, pooled) of the rows `ids` [B] as float32 tensors on `device`."""
        import numpy as np
        import torch

        arrays = self.lookup(ids.detach().cpu().numpy().astype(np.int64))
        return tuple(torch.as_tensor(np.asarray(a), dtype=torch.float32).to(device) for a in arrays)


def text_table(states: np.ndarray, mask: np.ndarray, pooled: np.ndarray) -> CaptionTable:
    """A CaptionTable of whole arrays whose last row is the empty caption (shapes checked)."""
    if not (len(states) == len(mask) == len(pooled)) or states.shape[:2] != mask.shape:
        raise PipelineError(
            f"caption embeddings disagree: states {states.shape}, mask {mask.shape}, pooled "
            f"{pooled.shape}; rerun the text_encode stage"
        )
    return CaptionTable(
        len(states), states.shape[-1], pooled.shape[-1], lambda r: (states[r], mask[r], pooled[r])
    )


def build_text_denoiser(
    cfg: DiffusionModelConfig, channels: int, sample_size: int, table: CaptionTable, where: str
) -> torch.nn.Module:
    """The `cfg.arch` transformer (pixart or mmdit) over patches of [B, channels, size, size]
    inputs, conditioned on `table`'s captions, behind the class-conditional call."""
    from pipeline.models.diffusion import size_problem

    if problem := size_problem(cfg, sample_size, where):
        raise PipelineError(problem)
    heads, head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads
    if cfg.arch == "pixart":
        from diffusers import PixArtTransformer2DModel

        model = PixArtTransformer2DModel(
            num_attention_heads=heads,
            attention_head_dim=head_dim,
            in_channels=channels,
            out_channels=channels,
            num_layers=cfg.num_layers,
            cross_attention_dim=cfg.hidden_size,
            sample_size=sample_size,
            patch_size=cfg.patch_size,
            caption_channels=table.dim,
            use_additional_conditions=False,  # no resolution/aspect embeddings: square inputs
        )
    else:
        from diffusers import SD3Transformer2DModel

        model = SD3Transformer2DModel(
            sample_size=sample_size,
            patch_size=cfg.patch_size,
            in_channels=channels,
            out_channels=channels,
            num_layers=cfg.num_layers,
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=table.dim,
            caption_projection_dim=cfg.hidden_size,
            pooled_projection_dim=table.pooled_dim,
            pos_embed_max_size=sample_size // cfg.patch_size,
        )
    return TextConditioned(model, table)


@functools.cache
def text_conditioned_class() -> type:
    """TextConditioned, defined on first use (torch is imported lazily)."""
    import torch

    class _TextConditioned(torch.nn.Module):
        """A text transformer called as a class-conditional denoiser (module docstring)."""

        def __init__(self, transformer: torch.nn.Module, table: CaptionTable) -> None:
            super().__init__()
            self.transformer = transformer
            object.__setattr__(self, "table", table)  # not a submodule, buffer or parameter

        def forward(self, sample: Any, timestep: Any, class_labels: Any) -> Any:
            # the exported pipeline's own call (its file is self-contained)
            from pipeline.diffusion.text_to_image_pipeline import call_text_denoiser

            states, mask, pooled = self.table.rows(class_labels, sample.device)
            return call_text_denoiser(self.transformer, sample, timestep, states, mask, pooled)

    return _TextConditioned


def TextConditioned(transformer: torch.nn.Module, table: CaptionTable) -> torch.nn.Module:  # noqa: N802
    """`transformer` behind forward(sample, timestep, class_labels=caption rows)."""
    return text_conditioned_class()(transformer, table)
