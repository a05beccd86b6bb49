"""Pretraining on token shards: a language model of any family, trained by the shared loop.

The loop (`pipeline.train.loop`) brings the engine, optimizer, schedule, checkpoints and resume;
the objective (causal, masked, span corruption, MoE) comes from the model family through
`pipeline.models`. Batches are pure functions of (seed, step, rank, micro step) over the token
shards, so resuming from a checkpoint replays exactly the data an uninterrupted run would have
seen, and the resumed run ends with the same weights.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import numpy as np
from pydantic import Field

from pipeline.engine.config import StageConfig
from pipeline.engine.context import StageContext
from pipeline.engine.errors import PipelineError
from pipeline.models.causal_lm import ModelConfig
from pipeline.train.config import LoopConfig


class Config(LoopConfig, StageConfig):
    kind: Literal["pretrain"]
    model: ModelConfig = ModelConfig()
    seq_len: int = Field(256, ge=8)
    activation_checkpointing: bool = False
    peak_flops: float | None = Field(None, gt=0, description="per-device peak FLOP/s for MFU")

    distributed = True


def parameter_counts(model: Any, experts_per_token: int, num_experts: int) -> dict[str, int]:
    """Total, non-embedding and active non-embedding parameter counts (scaling-law N).

    Non-embedding (Kaplan et al. 2020) leaves out every nn.Embedding table (tokens, positions,
    token types, relative-position buckets) and the projection to the vocabulary; active counts
    each MoE expert at experts_per_token / num_experts, the share a token passes through.
    """
    import torch

    tables = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    tables.append(model.get_output_embeddings() or torch.nn.Module())
    vocabulary = {id(p) for table in tables for p in table.parameters()}
    counts = {"params": 0, "non_embedding_params": 0, "active_non_embedding_params": 0}
    for name, param in model.named_parameters():
        counts["params"] += param.numel()
        if id(param) not in vocabulary:
            counts["non_embedding_params"] += param.numel()
            share = (experts_per_token, num_experts) if ".experts." in name else (1, 1)
            counts["active_non_embedding_params"] += param.numel() * share[0] // share[1]
    return counts


def run(ctx: StageContext) -> None:
    import torch

    from data_prep.shards import TokenShards
    from pipeline.models import build_model
    from pipeline.train import flops
    from pipeline.train.export import export_model
    from pipeline.train.loop import Workload, train

    cfg: Config = ctx.config  # type: ignore[assignment]
    data_dir = ctx.upstream("tokenize").export_dir
    meta = json.loads((data_dir / "meta.json").read_text())
    shards, val = TokenShards(data_dir / "train"), TokenShards(data_dir / "val")
    mb, accum, seq_len = cfg.micro_batch_size, cfg.grad_accum_steps, cfg.seq_len

    torch.manual_seed(ctx.seed)
    built = build_model(cfg.model, meta["vocab_size"], seq_len)
    model, objective = built.model, built.objective
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    experts = cfg.model.experts_per_token, cfg.model.num_experts
    counts = parameter_counts(model, *experts)
    matmul = flops.matmul_params(model, *experts)
    flops_token = flops.flops_per_token(
        matmul, cfg.model.num_layers, cfg.model.hidden_size, seq_len
    )

    def train_batch(step: int, micro: int, rank: int, world: int) -> np.ndarray:
        return shards.batch(ctx.seed, step, rank, world, mb, seq_len, micro, accum)  # [B, T + 1]

    def val_batches(rank: int, world: int) -> list[np.ndarray]:
        """Windows split evenly, so that sharded engines run the same collectives per rank."""
        windows = np.stack(list(val.windows(seq_len, cfg.eval_batches * mb * world)))
        windows = windows[: len(windows) // world * world][rank::world]  # [N, T + 1]
        if len(windows) == 0:
            raise PipelineError(
                f"stages.{ctx.name}: the val split has fewer than {world} windows of seq_len+1"
            )
        return [windows[i : i + mb] for i in range(0, len(windows), mb)]

    work = Workload(
        model=model,
        loss=objective.loss,
        train_batch=train_batch,
        val_batches=val_batches,
        item="sequences",
        wrap_classes=list(model._no_split_modules or []),
        tokens_per_item=seq_len,
        flops_per_token=flops_token,
        peak_flops=cfg.peak_flops,
        describe=f"{cfg.model.arch} ({objective.name}): {counts['params'] / 1e6:.2f}M params",
        summary={**counts, "flops_per_token": flops_token},
    )
    trained = train(ctx, cfg, work)
    export_model(
        trained.accelerator, trained.model, ctx.upstream("tokenizer").export_dir, ctx.export_dir,
        built.added_special_tokens,
    )  # fmt: skip
    ctx.write_summary(trained.summary, headline="val_loss")
