"""Export of a trained language model: a Hugging Face directory with its tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator


def export_model(
    accelerator: Accelerator,
    model: torch.nn.Module,
    tokenizer_dir: Path,
    export_dir: Path,
    added_special_tokens: dict[str, Any] | None = None,
) -> None:
    """Gather the (possibly sharded) model and save it with its tokenizer as a HF directory.

    Every rank takes part in the gather (ZeRO-3 and FSDP hold shards); rank 0 writes into a
    temporary directory that is renamed into place, so a crash never leaves half an export.
    """
    from transformers import AutoTokenizer

    from pipeline.models import add_special_tokens

    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        tmp = export_dir.parent / f".{export_dir.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped = accelerator.unwrap_model(model)
        if getattr(unwrapped, "generation_config", None) is not None:  # encoders have none
            unwrapped.generation_config.pad_token_id = unwrapped.config.pad_token_id
        unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        if added_special_tokens:
            add_special_tokens(tokenizer, added_special_tokens)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(export_dir, ignore_errors=True)
        tmp.rename(export_dir)
    accelerator.wait_for_everyone()
