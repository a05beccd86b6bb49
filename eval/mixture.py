"""Validation loss per source of a mixture, in the eval stage and in the training loop.

The tokenize stage records in meta.json (data_prep.tokens_meta) which runs of the val token stream came from which
source (`mixture.val_runs`: [end, source index] pairs, see data_prep.mixture). A target token is
attributed to the source of the document it belongs to, so `val_loss/<name>` is the mean
next-token loss over the targets of that source's documents (each with its end-of-document
token). An export written before mixtures were recorded, or of a single source, has no runs:
then there is nothing per source and these functions return no metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from data_prep.tokens_meta import TokensMeta

if TYPE_CHECKING:
    import torch


def val_runs(tokenize_export: Path) -> tuple[list[str], np.ndarray, np.ndarray] | None:
    """(source names, run ends, run sources) of a tokenize export's val split; None if unrecorded."""
    mixture = TokensMeta.read(Path(tokenize_export)).mixture
    if mixture is None or not mixture.val_runs:
        return None
    runs = np.asarray(mixture.val_runs, dtype=np.int64).reshape(-1, 2)
    return [source.name for source in mixture.sources], runs[:, 0], runs[:, 1]


def target_sources(ends: np.ndarray, sources: np.ndarray, num_windows: int, seq_len: int) -> Any:
    """Source index of every target of the first `num_windows` val windows: (N, seq_len).

    Window i holds val tokens [i * seq_len, (i + 1) * seq_len], its targets the last seq_len.
    """
    positions = np.arange(num_windows)[:, None] * seq_len + 1 + np.arange(seq_len)[None, :]
    run = np.searchsorted(ends, positions, side="right")
    return sources[np.minimum(run, len(sources) - 1)]


def window_sources(
    runs: tuple[list[str], np.ndarray, np.ndarray] | None, windows: np.ndarray
) -> tuple[list[str], np.ndarray] | None:
    """(source names, source of every target) of val windows read from the start; None
    without recorded runs."""
    if runs is None:
        return None
    names, ends, sources = runs
    return names, target_sources(ends, sources, len(windows), windows.shape[1] - 1)


def losses_by_source(
    token_nll: np.ndarray, scored: np.ndarray, sources: np.ndarray, names: list[str]
) -> dict[str, float]:
    """`val_loss/<name>`: mean NLL of each source's scored targets (sources with none left out)."""
    metrics = {}
    for index, name in enumerate(names):
        mask = scored & (sources == index)
        if mask.any():
            metrics[f"val_loss/{name}"] = float(token_nll[mask].sum() / mask.sum())
    return metrics


def token_losses(
    model: torch.nn.Module, tokens: torch.Tensor, eos_id: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-token NLL per target, whether it is scored) for windows [B, T + 1], both [B, T].

    With `eos_id` (a model trained with document masking) positions restart after each end of
    document and the target right after it is not scored, as in training.
    """
    import torch.nn.functional as F

    from pipeline.train.objectives import IGNORE_INDEX, next_token_inputs

    kwargs, targets = next_token_inputs(tokens, eos_id)
    logits = model(**kwargs).logits.float()  # [B, T, V]
    nll = F.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return nll.view_as(targets), targets != IGNORE_INDEX


def per_source_val_evaluator(
    tokenize_export: Path,
    seq_len: int,
    max_windows: int,
    batch_size: int,
    eos_id: int | None = None,
) -> Callable[[torch.nn.Module], dict[str, float]]:
    """`evaluate(model) -> {val_loss/<source>: ...}` over the first `max_windows` val windows.

    For Workload.evaluators: every rank scores the same windows, so the result needs no reduction
    and sharded engines run the same collectives on every rank. Returns {} (no metrics) for an
    export without a recorded mixture.
    """
    from data_prep.shards import TokenShards

    recorded = val_runs(tokenize_export)
    if recorded is None:
        return lambda model: {}
    names, ends, sources = recorded
    windows = np.stack(
        list(TokenShards(Path(tokenize_export) / "val").windows(seq_len, max_windows))
    )
    window_sources = target_sources(ends, sources, len(windows), seq_len)

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        import torch

        device = next(model.parameters()).device
        nll_parts, scored_parts = [], []
        with torch.no_grad():
            for i in range(0, len(windows), batch_size):
                batch = torch.as_tensor(windows[i : i + batch_size], device=device)
                nll, scored = token_losses(model, batch, eos_id)
                nll_parts.append(nll.double().cpu().numpy())
                scored_parts.append(scored.cpu().numpy())
        nll, scored = np.concatenate(nll_parts), np.concatenate(scored_parts)
        return losses_by_source(nll, scored, window_sources, names)

    return evaluate
