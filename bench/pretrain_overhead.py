"""Pretrain overhead: steady-state seconds/step of the pretrain stage over a bare PyTorch loop.

Both run in one process on the same model config, batch shape, optimizer and thread count. The
stage's seconds/step come from its own metrics.jsonl (tokens/s windows after the first, with
evaluation and checkpoints placed outside the measured windows). Target: ratio <= 1.10.

    .venv/bin/python bench/pretrain_overhead.py [--steps 60] [--hidden 256]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pipeline.engine.config import validate_recipe
from pipeline.engine.runner import run_recipe
from pipeline.engine.tracking import read_metrics


def stage_seconds_per_step(run_dir: Path, args: argparse.Namespace) -> tuple[float, dict]:
    source = {"uri": "builtin:python-stdlib", "max_bytes": 3_000_000}
    pretrain = {
        "kind": "pretrain",
        "after": ["tokenize"],
        "model": {
            "hidden_size": args.hidden,
            "num_layers": args.layers,
            "num_heads": args.hidden // 64,
        },
        "seq_len": args.seq_len,
        "micro_batch_size": args.batch,
        "max_steps": args.steps,
        "schedule": {"warmup_steps": 5},
        "log_every": 5,
        "eval_every": args.steps,
        "checkpoint_every": args.steps,
    }
    recipe = validate_recipe(
        {
            "name": "bench-overhead",
            "run_dir": str(run_dir),
            "tracking": {"mode": "disabled"},
            "stages": {
                "tokenizer": {
                    "kind": "tokenizer",
                    "source": source,
                    "vocab_size": 4096,
                    "sample_bytes": 2_000_000,
                },
                "tokenize": {"kind": "tokenize", "after": ["tokenizer"], "source": source},
                "pretrain": pretrain,
            },
        }
    )
    run_recipe(recipe)
    rows = [r for r in read_metrics(run_dir / "pretrain") if "train/tokens_per_second" in r]
    tokens_per_step = args.batch * args.seq_len
    # Drop the first window (warm-up) and the last (it holds the final eval and checkpoint).
    steady = [tokens_per_step / r["train/tokens_per_second"] for r in rows[1:-1]]
    return statistics.median(steady), recipe.stages["pretrain"]


def bare_seconds_per_step(run_dir: Path, cfg, steps: int) -> float:
    """The same model, batch and optimizer in a plain loop (no Accelerate, no logging)."""
    import numpy as np
    import torch.nn.functional as F

    from data_prep.shards import TokenShards
    from pipeline.models.causal_lm import build_causal_lm
    from pipeline.train.optim import param_groups

    shards = TokenShards(run_dir / "tokenize" / "export" / "train")
    torch.manual_seed(0)
    model = build_causal_lm(cfg.model, 4096, cfg.seq_len, bos_id=1, eos_id=2, pad_id=3)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr)
    batches = [
        torch.from_numpy(np.asarray(shards.batch(0, s, 0, 1, cfg.micro_batch_size, cfg.seq_len)))
        for s in range(steps)
    ]
    times = []
    for tokens in batches:
        start = time.perf_counter()
        logits = model(input_ids=tokens[:, :-1]).logits
        loss = F.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[5:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        stage, cfg = stage_seconds_per_step(run_dir, args)
        bare = bare_seconds_per_step(run_dir, cfg, args.steps)
    print(
        f"threads: {torch.get_num_threads()}  model: llama hidden={args.hidden} layers={args.layers}"
    )
    print(f"pretrain stage: {stage * 1000:.1f} ms/step (median, steady state)")
    print(f"bare PyTorch  : {bare * 1000:.1f} ms/step (median)")
    print(f"overhead ratio (stage / bare): {stage / bare:.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
