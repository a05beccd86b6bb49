"""The language-model metrics of the eval stage: loss, perplexity, bits per byte against a unigram
baseline, and greedy samples."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from pipeline.engine.errors import PipelineError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")

BatchProgress = Callable[[list[np.ndarray]], Iterable[np.ndarray]]


def token_byte_lengths(tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """UTF-8 byte length of every token id of a SentencePiece-style vocabulary (specials: 0)."""
    special_ids = set(tokenizer.all_special_ids)
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    lengths = np.zeros(len(pieces), dtype=np.int64)
    for token_id, piece in enumerate(pieces):
        if token_id in special_ids or piece is None:
            continue
        if BYTE_PIECE.fullmatch(piece):
            lengths[token_id] = 1
        else:
            lengths[token_id] = len(piece.replace("\u2581", " ").encode("utf-8"))
    return lengths


def unigram_loss(train_counts: np.ndarray, val_tokens: np.ndarray) -> float:
    """Mean NLL (nats/token) of `val_tokens` under add-one smoothed training-token frequencies."""
    counts = train_counts.astype(np.float64) + 1.0
    log_probs = np.log(counts) - np.log(counts.sum())
    return float(-log_probs[val_tokens].mean())


def window_losses(
    model: PreTrainedModel,
    windows: np.ndarray,
    batch_size: int,
    progress: BatchProgress | None = None,
) -> np.ndarray:
    """Next-token NLL (nats) of every target of windows (N, seq_len + 1): (N, seq_len) float64."""
    import torch
    import torch.nn.functional as F

    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    losses = []
    with torch.inference_mode():
        for batch in progress(batches) if progress else batches:
            tokens = torch.as_tensor(batch, dtype=torch.long, device=model.device)  # (B, T+1)
            logits = model(tokens[:, :-1]).logits.float()  # (B, T, V)
            targets = tokens[:, 1:]  # (B, T)
            nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
            losses.append(nll.view_as(targets).double().cpu().numpy())
    return np.concatenate(losses) if losses else np.zeros((0, windows.shape[1] - 1))


def score_windows(
    model: PreTrainedModel,
    windows: np.ndarray,
    batch_size: int,
    progress: BatchProgress | None = None,
) -> tuple[float, int]:
    """Summed next-token NLL (nats) and target count over windows of shape (N, seq_len + 1)."""
    losses = window_losses(model, windows, batch_size, progress)
    return float(losses.sum()), losses.size


def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    windows: np.ndarray,
    train_counts: np.ndarray,
    batch_size: int,
    progress: BatchProgress | None = None,
    sources: tuple[list[str], np.ndarray] | None = None,
) -> dict[str, float]:
    """Validation loss, perplexity, bits per byte and the unigram baseline on the same targets.

    With `sources` (names, the source index of every target), also `val_loss/<name>` per source.
    """
    from eval.mixture import losses_by_source

    targets = windows[:, 1:].ravel()
    byte_lengths = token_byte_lengths(tokenizer)
    vocab_size = min(model.get_input_embeddings().num_embeddings, len(byte_lengths))
    if int(targets.max()) >= vocab_size:
        raise PipelineError(
            f"validation data has token id {int(targets.max())} but the model's vocabulary has "
            f"{vocab_size}; evaluate a model on data tokenized with its own tokenizer"
        )
    losses = window_losses(model, windows, batch_size, progress)
    total_nll, num_tokens = float(losses.sum()), losses.size
    num_bytes = int(byte_lengths[targets].sum())
    val_loss = total_nll / num_tokens
    baseline = unigram_loss(train_counts, targets)
    metrics = {
        "val_loss": val_loss,
        "perplexity": math.exp(val_loss),
        "bits_per_byte": total_nll / math.log(2) / num_bytes,
        "unigram_loss": baseline,
        "loss_vs_unigram": val_loss / baseline,
        "num_tokens": num_tokens,
        "num_bytes": num_bytes,
    }
    if sources is not None:
        names, of_target = sources
        metrics |= losses_by_source(losses, np.ones_like(losses, bool), of_target, names)
    return metrics


def greedy_samples(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
) -> list[str]:
    """Greedy completion of each prompt, started as a fresh document (after an end-of-text token)."""
    import torch

    eos_id = tokenizer.eos_token_id
    completions = []
    for prompt in prompts:
        start = [eos_id] if eos_id is not None else []
        ids = start + tokenizer.encode(prompt, add_special_tokens=False)
        inputs = torch.tensor([ids], dtype=torch.long, device=model.device)
        with torch.inference_mode():
            output = model.generate(
                inputs,
                attention_mask=torch.ones_like(inputs),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos_id,
                pad_token_id=eos_id,
            )
        completions.append(tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True))
    return completions
