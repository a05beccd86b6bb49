"""Training FLOPs per token, the GPU peak table and MFU (pipeline/train/flops)."""

from __future__ import annotations

import pytest


def test_flops_and_peak_table() -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.train import flops

    # GPT-2 small: 124.4M parameters of which 38.6M + 0.8M are token/position embeddings;
    # the tied output projection is a matmul and counts. Counting needs shapes, not weights.
    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config())
    n = flops.matmul_params(model)
    assert n == sum(p.numel() for p in model.parameters()) - 1024 * 768
    assert flops.flops_per_token(n, 12, 768, 1024) == 6 * n + 12 * 12 * 768 * 1024
    assert flops.peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert flops.peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert flops.peak_flops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5e12
    assert flops.peak_flops(None, "bf16") is None
    assert flops.mfu(1000.0, 6e9, None) is None
    assert flops.mfu(1000.0, 6e9, 1.2e13) == pytest.approx(0.5)
