"""Model FLOPs per token and utilisation (MFU) against a table of accelerator peaks.

FLOPs per trained token = 6 * N + 12 * L * d * T (PaLM, appendix B): N the parameters taking part
in matmuls (not embedding lookups; MoE experts counted at top-k/E), L layers, d width, T context.
On a CPU there is no honest peak, so MFU is left empty unless the recipe gives one.
"""

from __future__ import annotations

from typing import Any

# Dense peak FLOP/s per device from vendor datasheets (no sparsity). fp32 is plain FP32, not TF32,
# since PyTorch does not use TF32 for matmuls unless asked to.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989e12, "fp32": 67e12},
    "H100 PCIe": {"bf16": 756e12, "fp32": 51e12},
    "H100": {"bf16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp32": 19.5e12},
    "A10G": {"bf16": 70e12, "fp32": 35e12},
    "L4": {"bf16": 121e12, "fp32": 30e12},
}

EMBEDDING_NAMES = ("embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings", "shared")


def matmul_params(
    model: Any, experts_per_token: int | None = None, num_experts: int | None = None
) -> int:
    """Parameters used in matmuls per token: all but embedding lookups, tied heads counted once."""
    total = 0
    for name, param in model.named_parameters():
        count = param.numel()
        if any(part in name for part in EMBEDDING_NAMES):
            continue
        if experts_per_token and num_experts and ".experts." in name:
            count = count * experts_per_token // num_experts
        total += count
    config = model.config
    if getattr(config, "tie_word_embeddings", False):
        total += config.vocab_size * _hidden(config)
    return total


def _hidden(config: Any) -> int:
    for attr in ("hidden_size", "n_embd", "d_model"):
        if getattr(config, attr, None):
            return int(getattr(config, attr))
    raise ValueError(f"cannot find the hidden size of {type(config).__name__}")


def flops_per_token(
    num_matmul_params: int, num_layers: int, hidden_size: int, seq_len: int
) -> float:
    """Training FLOPs (forward + backward) per token."""
    return 6 * num_matmul_params + 12 * num_layers * hidden_size * seq_len


def peak_flops(device_name: str | None, precision: str) -> float | None:
    """Peak FLOP/s of a known accelerator (longest matching name), None when unknown or a CPU."""
    if not device_name:
        return None
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):
        if name.lower() in device_name.lower():
            return PEAK_FLOPS[name]["bf16" if precision == "bf16" else "fp32"]
    return None


def device_name() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def mfu(
    tokens_per_second_per_device: float, flops_token: float, peak: float | None
) -> float | None:
    return tokens_per_second_per_device * flops_token / peak if peak else None
