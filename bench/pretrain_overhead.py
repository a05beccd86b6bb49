"""Pretrain overhead: steady-state seconds/step of the pretrain stage against a bare PyTorch loop
(fused and unfused AdamW) and the Hugging Face Trainer, on the same model, batches and threads.

Every contender trains the same llama config on the same token batches in one process. The
stage's seconds/step come from its own metrics.jsonl (tokens/s windows after the first, with
evaluation and checkpoints outside the measured windows); the others time each step. Ratios are
of medians, with a 95% bootstrap interval over the measured steps. Targets: stage <= 1.03x the
bare fused loop, and no slower than the Trainer.

    .venv/bin/python bench/pretrain_overhead.py [--steps 60] [--hidden 256]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pipeline.engine.config import validate_recipe
from pipeline.engine.runner import run_recipe
from pipeline.engine.tracking import read_metrics

VOCAB = 4096
LOG_EVERY = 5


def stage_step_times(run_dir: Path, args: argparse.Namespace, kernel: str) -> tuple[list, object]:
    """Seconds/step of each steady log window of a pretrain stage run."""
    source = {"uri": "builtin:python-stdlib", "max_bytes": 3_000_000}
    pretrain = {
        "kind": "pretrain", "after": ["tokenize"],
        "model": {"hidden_size": args.hidden, "num_layers": args.layers,
                  "num_heads": args.hidden // 64},
        "seq_len": args.seq_len, "micro_batch_size": args.batch, "max_steps": args.steps,
        "optim": {"kernel": kernel}, "schedule": {"warmup_steps": 5}, "log_every": LOG_EVERY,
        "eval_every": args.steps, "checkpoint_every": args.steps,
    }  # fmt: skip
    recipe = validate_recipe(
        {
            "name": "bench-overhead",
            "run_dir": str(run_dir),
            "tracking": {"mode": "disabled"},
            "stages": {
                "tokenizer": {
                    "kind": "tokenizer",
                    "source": source,
                    "vocab_size": VOCAB,
                    "sample_bytes": 2_000_000,
                },
                "tokenize": {"kind": "tokenize", "after": ["tokenizer"], "source": source},
                "pretrain": pretrain,
            },
        }  # fmt: skip
    )
    run_recipe(recipe)
    rows = [r for r in read_metrics(run_dir / "pretrain") if "train/tokens_per_second" in r]
    tokens_per_step = args.batch * args.seq_len
    # Drop the first window (warm-up) and the last (it holds the final eval and checkpoint).
    return [tokens_per_step / r["train/tokens_per_second"] for r in rows[1:-1]], recipe.stages[
        "pretrain"
    ]


def _setup(run_dir: Path, cfg, steps: int):
    import numpy as np

    from data_prep.shards import TokenShards
    from pipeline.models.causal_lm import build_causal_lm

    shards = TokenShards(run_dir / "tokenize" / "export" / "train")
    torch.manual_seed(0)
    model = build_causal_lm(cfg.model, VOCAB, cfg.seq_len, bos_id=1, eos_id=2, pad_id=3)
    batches = [
        torch.from_numpy(np.asarray(shards.batch(0, s, 0, 1, cfg.micro_batch_size, cfg.seq_len)))
        for s in range(steps)
    ]
    return model, batches


def _loss(model, tokens):
    import torch.nn.functional as F

    logits = model(input_ids=tokens[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1))


def bare_step_times(run_dir: Path, cfg, steps: int, fused: bool) -> list[float]:
    """The same model, batches and AdamW in a plain loop (no Accelerate, no logging)."""
    from pipeline.train.optim import param_groups

    model, batches = _setup(run_dir, cfg, steps)
    kernel = {"fused": True} if fused else {"foreach": False}
    opt = cfg.optim
    optimizer = torch.optim.AdamW(
        param_groups(model, opt.weight_decay), lr=opt.lr, betas=(opt.beta1, opt.beta2), **kernel
    )
    times = []
    for tokens in batches:
        start = time.perf_counter()
        _loss(model, tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times[5:]


def trainer_step_times(run_dir: Path, cfg, steps: int) -> list[float]:
    """transformers.Trainer (its default fused AdamW, same loss, batches in order, no logging)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model, batches = _setup(run_dir, cfg, steps)

    class Batches(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(batches) * cfg.micro_batch_size

        def __getitem__(self, i: int) -> dict:
            return {"tokens": batches[i // cfg.micro_batch_size][i % cfg.micro_batch_size]}

    class OurLoss(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            return _loss(model, inputs["tokens"])

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, *a, **k) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k) -> None:
            self.times.append(time.perf_counter() - self.start)

    clock = Clock()
    args = TrainingArguments(
        output_dir=str(run_dir / "trainer"), max_steps=steps,
        per_device_train_batch_size=cfg.micro_batch_size, learning_rate=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay, adam_beta2=cfg.optim.beta2,
        max_grad_norm=cfg.optim.grad_clip, warmup_steps=5, lr_scheduler_type="cosine",
        logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
        use_cpu=True, dataloader_num_workers=0, remove_unused_columns=False,
    )  # fmt: skip
    trainer = OurLoss(
        model=model, args=args, train_dataset=Batches(), callbacks=[clock],
        data_collator=lambda rows: {"tokens": torch.stack([r["tokens"] for r in rows])},
    )  # fmt: skip
    trainer.train()
    return clock.times[5:]


def ratio(a: list[float], b: list[float], draws: int = 2000) -> tuple[float, float, float]:
    """median(a) / median(b) with a 95% bootstrap interval (steps resampled)."""
    rng = random.Random(0)
    samples = sorted(
        statistics.median(rng.choices(a, k=len(a))) / statistics.median(rng.choices(b, k=len(b)))
        for _ in range(draws)
    )
    point = statistics.median(a) / statistics.median(b)
    return point, samples[int(0.025 * draws)], samples[int(0.975 * draws)]


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
        stage, cfg = stage_step_times(run_dir, args, "auto")
        stage_loop, _ = stage_step_times(Path(tmp) / "run-loop", args, "loop")
        fused = bare_step_times(run_dir, cfg, args.steps, fused=True)
        unfused = bare_step_times(run_dir, cfg, args.steps, fused=False)
        trainer = trainer_step_times(run_dir, cfg, args.steps)
    print(
        f"threads: {torch.get_num_threads()}  model: llama hidden={args.hidden} "
        f"layers={args.layers} seq_len={args.seq_len} batch={args.batch}"
    )
    rows = {
        "pretrain stage (fused AdamW)": stage,
        "pretrain stage (optim.kernel=loop)": stage_loop,
        "bare loop, fused AdamW": fused,
        "bare loop, unfused AdamW": unfused,
        "HF Trainer (fused AdamW)": trainer,
    }
    for name, times in rows.items():
        print(
            f"{name:36s}: {statistics.median(times) * 1000:7.1f} ms/step (median of {len(times)})"
        )
    for label, a, b, target in (
        ("stage / bare fused", stage, fused, "target <= 1.03"),
        ("stage / HF Trainer", stage, trainer, "target <= 1.00"),
        ("bare fused / bare unfused", fused, unfused, ""),
        ("stage(loop) / bare unfused", stage_loop, unfused, ""),
    ):
        point, low, high = ratio(a, b)
        print(f"{label:28s}: {point:.3f}  [95% {low:.3f}, {high:.3f}]  {target}")


if __name__ == "__main__":
    main()
