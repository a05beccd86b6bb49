"""Export of a trained language model: a Hugging Face directory with its tokenizer and provenance,
and the round trip that proves transformers loads it back as the model that was trained."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.engine import diskfull, faults
from pipeline.engine.errors import PipelineError
from pipeline.train.distributed import hf_zero3_off, reshard
from pipeline.train.provenance import write_provenance
from pipeline.train.workload import plain_names

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

# Largest |export logit - trained logit| allowed, relative to the largest |trained logit| (at least
# 1). The same weights through the same kernels on the same device differ only where another
# kernel or op order is picked (attention backend, a compiled graph): ~1e-6 relative in fp32, a
# few bf16 steps (2^-7 each) in bf16. A real fault (a config field save_pretrained loses, a tensor
# renamed, untied or re-initialised) moves logits by a large share of their scale.
RELATIVE_TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2}
ROUNDTRIP_BATCH, ROUNDTRIP_TOKENS, ROUNDTRIP_SEED = 2, 32, 1234
ADAPTER_DIR = "adapter"  # a peft model's export keeps its adapter here, the merged model beside
FIRST_ORDINARY_ID = 4  # ids below are unk, bos, eos, pad (data_prep.tokenizer)


def export_model(
    accelerator: Accelerator,
    model: torch.nn.Module,
    tokenizer_dir: Path,
    export_dir: Path,
    added_special_tokens: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
) -> None:
    """Gather the (possibly sharded) model and save it with its tokenizer as a HF directory.

    Every rank takes part in the gather (ZeRO-3 and FSDP hold shards); rank 0 writes into a
    temporary directory that is renamed into place, so a crash never leaves half an export.
    `config` (the resolved stage config) goes into provenance.json with the code and package
    versions. A tokenizer from our tokenizer stage brings its SentencePiece model and encoding
    flags, which llama.cpp's converter reads (pipeline/train/tokenizer_files.py).
    """
    from transformers import AutoTokenizer

    from pipeline.models import add_special_tokens, unmatch_special_tokens
    from pipeline.train.tokenizer_files import carry_sentencepiece

    # A compiled model's state dict names every tensor `_orig_mod.<name>`, which from_pretrained
    # would not find (it would load random weights): save the plain names.
    state_dict = plain_names(accelerator.get_state_dict(model)) or {}  # ZeRO-3: None off rank 0
    if accelerator.is_main_process:
        tmp = export_dir.parent / f".{export_dir.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        faults.point(export_dir.parent.name, "export_start")
        unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
        if getattr(unwrapped, "generation_config", None) is not None:  # encoders have none
            unwrapped.generation_config.pad_token_id = unwrapped.config.pad_token_id
        with writing_export(export_dir, tmp):
            unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
            if added_special_tokens:
                add_special_tokens(tokenizer, added_special_tokens)
            tokenizer.save_pretrained(tmp)
            unmatch_special_tokens(tmp / "tokenizer.json")  # save_pretrained adds them back
            carry_sentencepiece(tokenizer_dir, tmp)  # what llama.cpp's converter reads
            write_provenance(tmp, config)
        faults.point(export_dir.parent.name, "export_write")
        shutil.rmtree(export_dir, ignore_errors=True)
        tmp.rename(export_dir)
    accelerator.wait_for_everyone()


def export_trainer(
    trainer: Any,
    tokenizer: Any,
    export_dir: Path,
    config: dict[str, Any] | None = None,
    keep_tokenizer: Callable[[Path], None] | None = None,
) -> None:
    """Save a TRL/transformers trainer's model with its tokenizer and provenance as a HF
    directory, written into a temporary one and renamed into place like `export_model`.

    A peft model is saved twice: its adapter under `adapter/` and the merged model at the root,
    so both `PeftModel.from_pretrained` and `AutoModelForCausalLM` read the export; the merged
    one is made from the saved adapter as a user would (`_merged_from_base`).
    `keep_tokenizer(dir)` replaces the saved tokenizer files there (a user's model keeps its
    own), in the adapter's folder too.
    """
    from pipeline.models import unmatch_special_tokens
    from pipeline.train.tokenizer_files import carry_sentencepiece

    main = trainer.accelerator.is_main_process
    tmp = export_dir.parent / f".{export_dir.name}.tmp"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    faults.point(export_dir.parent.name, "export_start")
    peft = _is_peft(trainer.accelerator.unwrap_model(trainer.model))
    with writing_export(export_dir, tmp):
        # every rank takes part (sharded engines gather)
        trainer.save_model(str(tmp / ADAPTER_DIR if peft else tmp))
        if main:
            if peft:
                unwrapped = trainer.accelerator.unwrap_model(trainer.model)
                with hf_zero3_off():  # this rank alone loads: no partitioning
                    merged = _merged_from_base(unwrapped, tmp / ADAPTER_DIR)
                merged.save_pretrained(str(tmp), safe_serialization=True)
                (tmp / ADAPTER_DIR / "training_args.bin").unlink(missing_ok=True)
            tokenizer.save_pretrained(str(tmp))
            for folder in (tmp, tmp / ADAPTER_DIR) if peft else (tmp,):  # save_model wrote both
                if keep_tokenizer is not None:
                    keep_tokenizer(folder)
                elif (folder / "tokenizer.json").is_file():
                    unmatch_special_tokens(folder / "tokenizer.json")  # save_pretrained adds them
                    # what llama.cpp's converter reads: our tokenizer.model, add_bos/prefix flags
                    carry_sentencepiece(Path(tokenizer.name_or_path), folder)
            write_provenance(tmp, config)
    if main:
        faults.point(export_dir.parent.name, "export_write")
        shutil.rmtree(export_dir, ignore_errors=True)
        tmp.rename(export_dir)
    trainer.accelerator.wait_for_everyone()


def _merged_from_base(model: Any, adapter_dir: Path) -> Any:
    """The base of the peft `model` loaded again from its directory (fp32, with the trained
    model's config) and the adapter saved in `adapter_dir` merged into it. The trained model is
    left alone: under FSDP2 and ZeRO-3 each rank holds only shards of it, which no merge can use."""
    import torch
    import transformers
    from peft import PeftModel

    adapter = model.peft_config[model.active_adapter]
    auto = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification"}
    base = getattr(transformers, auto[adapter.task_type]).from_pretrained(
        adapter.base_model_name_or_path, config=model.get_base_model().config, dtype=torch.float32
    )
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()


def _is_peft(model: Any) -> bool:
    """Whether `model` is a peft model (an adapter over a frozen base)."""
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def writing_export(export_dir: Path, tmp: Path) -> Any:
    """A full disk while writing the export into `tmp`: remove it, stop with one line (the
    checkpoints are kept, so the rerun resumes from the last one and only exports again)."""
    return diskfull.writing("the export", export_dir, tmp, resume=" from its last checkpoint")


def verify_export(
    accelerator: Accelerator, model: torch.nn.Module, export_dir: Path, auto_class: str, where: str
) -> float:
    """Load the export with transformers' `auto_class` and compare its logits on a fixed batch
    with the trained model's; the max abs difference, or a PipelineError (export removed).

    Every rank runs the trained model's forward (sharded engines gather parameters in it); rank 0
    loads the export and compares; the verdict is broadcast so all ranks pass or fail together.
    """
    from accelerate.utils import broadcast_object_list

    unwrapped = accelerator.unwrap_model(model)
    inputs = roundtrip_inputs(unwrapped.config, accelerator.device)
    dtype = next(unwrapped.parameters()).dtype  # ZeRO's 16-bit weights export as such
    precision = "bf16" if accelerator.mixed_precision == "bf16" or dtype.itemsize == 2 else "fp32"
    with _evaluating(model):
        reference = _logits(model, inputs, accelerator)
    verdict: list[Any] = [None]
    if accelerator.is_main_process:
        tolerance = RELATIVE_TOLERANCE[precision] * max(1.0, reference.abs().max().item())
        diff, problem = _compare(export_dir, auto_class, dtype, inputs, reference, accelerator)
        verdict[0] = (diff, tolerance, problem)
    diff, tolerance, problem = broadcast_object_list(verdict)[0]
    if problem is None and diff <= tolerance:  # a NaN diff fails
        return diff
    if accelerator.is_main_process:
        shutil.rmtree(export_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    raise PipelineError(
        f"{where}: the export {export_dir} does not load back as the trained model "
        f"({problem or 'its logits differ'}): max abs logit diff {diff:.3g} > tolerance "
        f"{tolerance:.3g} ({precision}, {auto_class}); it was removed. Rerun the stage (it "
        f"resumes from its last checkpoint); if this repeats, the model family's export loses "
        f"a config field or tensor"
    )


def roundtrip_inputs(config: Any, device: Any) -> dict[str, torch.Tensor]:
    """A fixed batch of ordinary token ids (decoder inputs too, for encoder-decoders)."""
    import torch

    positions = getattr(config, "max_position_embeddings", None) or ROUNDTRIP_TOKENS
    shape = (ROUNDTRIP_BATCH, min(ROUNDTRIP_TOKENS, positions))
    generator = torch.Generator().manual_seed(ROUNDTRIP_SEED)
    ids = torch.randint(FIRST_ORDINARY_ID, config.vocab_size, shape, generator=generator)
    inputs = {"input_ids": ids.to(device)}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = inputs["input_ids"]
    return inputs


@contextmanager
def _evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode without gradients; afterwards training mode, FSDP2 parameters sharded again."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        reshard(model)
        model.train(was_training)


def _logits(model: Any, inputs: dict[str, Any], accelerator: Accelerator) -> torch.Tensor:
    """The model's fp32 logits in the run's precision (the training autocast)."""
    with accelerator.autocast():
        return model(**inputs).logits.float()


def _compare(
    export_dir: Path,
    auto_class: str,
    dtype: torch.dtype,
    inputs: dict[str, Any],
    reference: torch.Tensor,
    accelerator: Accelerator,
) -> tuple[float, str | None]:
    """(max abs logit diff, None) of the loaded export, or (inf, why it could not be loaded)."""
    import transformers

    try:
        with hf_zero3_off():  # this rank alone loads: no partitioning
            loaded = getattr(transformers, auto_class).from_pretrained(export_dir, dtype=dtype)
        loaded = loaded.to(accelerator.device)
        with _evaluating(loaded):
            logits = _logits(loaded, inputs, accelerator)
    except Exception as exc:  # noqa: BLE001 - any load failure is this export's verdict
        first_line = (str(exc).splitlines() or [""])[0]
        return float("inf"), f"loading failed: {type(exc).__name__}: {first_line}"
    if logits.shape != reference.shape:
        return float("inf"), f"logits of shape {tuple(logits.shape)}, not {tuple(reference.shape)}"
    return (logits - reference).abs().max().item(), None
