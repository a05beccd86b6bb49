"""The DPO losses an rlhf stage offers (`dpo_loss`), as TRL 1.x implements them.

With r_w, r_l the policy's log-ratios to the reference on the chosen and the rejected answer
(summed over tokens) and d = r_w - r_l (d-bar: from per-token means):

- `sigmoid`: DPO (Rafailov et al. 2023), -log sigmoid(beta d).
- `hinge`: SLiC (Zhao et al. 2023), max(0, 1 - beta d).
- `ipo`: IPO (Azar et al. 2023), (d-bar - 1 / (2 beta))^2: a target margin rather than an ever
  larger one, so deterministic preferences do not drive the policy away from the reference.
- `sigmoid_norm`: DPO on d-bar (length-normalised).
- `nca_pair`: NCA (Chen et al. 2024), -log sigmoid(beta r_w) - 1/2 log sigmoid(-beta r_w)
  - 1/2 log sigmoid(-beta r_l): absolute likelihoods, not only their difference.
- `bco_pair`: BCO (Jung et al. 2024), -log sigmoid(beta r_w) - log sigmoid(-beta r_l): each
  answer classified as chosen or rejected on its own.
- `sppo_hard`: SPPO (Wu et al. 2024), (r_w - 1/(2 beta))^2 + (r_l + 1/(2 beta))^2.
- `aot`: AOT (Melnyk et al. 2024), -log sigmoid(beta x) over the batch's sorted d of the policy
  minus the reference's, sorted: the distributions aligned, not each pair.
- `apo_zero` / `apo_down`: APO (D'Oosterlinck et al. 2024), for chosen answers better (zero: the
  chosen up, the rejected down) or worse (down: both down, the rejected more) than the model's own.
- `discopop`: DiscoPOP (Chris Lu et al. 2024), -log sigmoid(beta d) blended with exp(-beta d) by
  sigmoid(beta d / 0.05).

`dpo_sft_weight` adds an NLL term on the chosen answer (RPO, Pang et al. 2024) to any of them.
"""

from __future__ import annotations

from typing import Any, Literal

# TRL's DPO losses that need no setting beyond beta (robust and exo_pair need label smoothing).
DpoLoss = Literal[
    "sigmoid", "hinge", "ipo", "nca_pair", "bco_pair", "sppo_hard", "aot", "apo_zero", "apo_down",
    "discopop", "sigmoid_norm",
]  # fmt: skip


def dpo_losses(cfg: Any) -> dict[str, Any]:
    """DPOConfig loss fields: the preference loss (TRL's default: sigmoid DPO), plus a weighted
    NLL term on the chosen answer (RPO) when dpo_sft_weight is set."""
    if cfg.dpo_loss == "sigmoid" and not cfg.dpo_sft_weight:
        return {}
    if not cfg.dpo_sft_weight:
        return {"loss_type": [cfg.dpo_loss]}
    return {"loss_type": [cfg.dpo_loss, "sft"], "loss_weights": [1.0, cfg.dpo_sft_weight]}
