"""Reward models as judges and as RL rewards: one model or an ensemble, scored as they were trained.

TRL's reward trainer appends EOS to every response and the model learns to score at it; TRL's
GRPO/RLOO score a reward model on prompt + completion without it, at the completion's last token,
where it never learned to score. `reward_scores` appends EOS as training did, and every path that
scores with a reward model here (the rlhf reward, the preferences judge) uses it.

Ensembles (Coste et al. 2023, "Reward Model Ensembles Help Mitigate Overoptimization") combine
members trained on different seeds and data orders: `mean`, `min` (worst case) or
`mean_minus_std` (mean - lambda * std, an uncertainty penalty). An optimiser exploits one model's
errors, which the other members do not share.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

Ensemble = Literal["mean", "min", "mean_minus_std"]


def combine(scores: Sequence[Sequence[float]], how: Ensemble, lam: float = 1.0) -> list[float]:
    """One reward per completion from `scores[member][completion]`."""
    columns = list(zip(*scores, strict=True))
    if how == "mean":
        return [statistics.fmean(c) for c in columns]
    if how == "min":
        return [min(c) for c in columns]
    return [
        statistics.fmean(c) - lam * (statistics.pstdev(c) if len(c) > 1 else 0.0) for c in columns
    ]


def reward_scores(
    model: Any, tokenizer: Any, texts: list[str], batch_size: int = 32
) -> list[float]:
    """A reward model's scalar for each text, with the tokenizer's EOS appended (as trained)."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[float] = []
    for start in range(0, len(texts), batch_size):
        encoded = [
            tokenizer.encode(t + tokenizer.eos_token, add_special_tokens=False)
            for t in texts[start : start + batch_size]
        ]
        width = max(map(len, encoded))
        ids = torch.tensor([e + [pad] * (width - len(e)) for e in encoded], device=model.device)
        mask = (torch.arange(width) < torch.tensor([[len(e)] for e in encoded])).long()
        with torch.inference_mode():
            logits = model(ids, attention_mask=mask.to(model.device)).logits[:, 0]
        out += [float(x) for x in logits]
    return out


def load_reward_model(path: Any, device: str = "cpu") -> Any:
    """A sequence-classification model with one output (the reward) from an HF directory."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, dtype=torch.float32
    )
    return model.to(device).eval()


def load_judge(path: Path, device: str) -> tuple[Any, Any]:
    """A reward model directory's model (eval mode) and tokenizer."""
    from transformers import AutoTokenizer

    return load_reward_model(path, device), AutoTokenizer.from_pretrained(path)


def ensemble_reward(
    paths: list[Path], how: Ensemble, lam: float, device: str
) -> Callable[..., list[float]]:
    """A reward function with TRL's signature scoring prompt + completion with every member and
    combining them; named `reward_model` (or `reward_ensemble`) in the trainer's logs."""
    members = [load_judge(path, device) for path in paths]

    def reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        pairs = list(zip(prompts, completions, strict=True))
        return combine(
            [reward_scores(m, t, [as_text(t, p, c) for p, c in pairs]) for m, t in members],
            how,
            lam,
        )

    reward.__name__ = "reward_model" if len(paths) == 1 else f"reward_ensemble_{how}"
    return reward


def as_text(tokenizer: Any, prompt: Any, completion: Any) -> str:
    """Prompt + completion as the reward model reads them: plain text joined, or a conversation
    rendered with the reward model's chat template."""
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    return prompt + completion
