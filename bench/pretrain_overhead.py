"""Pretrain overhead: seconds/step of the pretrain stage's loop against a bare PyTorch loop
(fused and unfused AdamW) and the Hugging Face Trainer, on the same model, batches and threads.

Every contender trains the same llama config on the same token batches in one process, and the
contenders take turns: round r runs `--block` steps of each, one after another, so a change in
the machine's load (other jobs, thermal state) hits every contender alike. The stage is its own
`_Loop` built from the pretrain stage's workload (engine, fused optimizer, schedule, non-finite
guard, logging every 5 steps); the Trainer runs in a thread that hands control back after each
block. A step is timed end to end (batch, forward, backward, clip, update, bookkeeping). Each
round gives one ratio per pair (median step time of each block); the figure is the median of
the round ratios with a 95% bootstrap interval over rounds. Targets: stage <= 1.03x the bare
fused loop, and no slower than the Trainer.

    .venv/bin/python bench/pretrain_overhead.py [--rounds 12] [--block 5] [--hidden 256]
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline.engine.config import validate_recipe
from pipeline.engine.context import StageContext
from pipeline.engine.runner import run_recipe

VOCAB = 4096
LOG_EVERY = 5
WARMUP_STEPS = 3  # per contender, before the first timed round


def recipe_for(run_dir: Path, args: argparse.Namespace, kernel: str, max_steps: int) -> Any:
    source = {"uri": "builtin:python-stdlib", "max_bytes": 3_000_000}
    pretrain = {
        "kind": "pretrain", "after": ["tokenize"],
        "model": {"hidden_size": args.hidden, "num_layers": args.layers,
                  "num_heads": args.hidden // 64},
        "seq_len": args.seq_len, "micro_batch_size": args.batch, "max_steps": max_steps,
        "optim": {"kernel": kernel}, "schedule": {"warmup_steps": 5}, "log_every": LOG_EVERY,
        "eval_every": max_steps, "checkpoint_every": max_steps,
    }  # fmt: skip
    return validate_recipe(
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


def stage_stepper(run_dir: Path, recipe: Any, kernel: str) -> Callable[[], None]:
    """One optimizer step of the pretrain stage's own loop per call (never its final step)."""
    from pipeline.stages import pretrain
    from pipeline.train.loop import _Loop

    stage_recipe = recipe.model_copy(deep=True)
    stage_recipe.stages["pretrain"].optim.kernel = kernel
    ctx = StageContext(run_dir=run_dir, name="pretrain", recipe=stage_recipe,
                       fingerprint=f"bench-{kernel}")  # fmt: skip
    work, _ = pretrain.workload(ctx)
    loop = _Loop(ctx, ctx.config, work)  # type: ignore[arg-type]
    tracker = ctx.tracker().__enter__()
    steps = iter(range(ctx.config.max_steps - 1))  # type: ignore[attr-defined]
    return lambda: loop.step(next(steps), tracker)


def _setup(run_dir: Path, cfg: Any, steps: int) -> tuple[torch.nn.Module, list[torch.Tensor]]:
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


def _loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    logits = model(input_ids=tokens[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1))


def bare_stepper(run_dir: Path, cfg: Any, steps: int, fused: bool) -> Callable[[], None]:
    """The same model, batches and AdamW in a plain loop (no Accelerate, no logging)."""
    from pipeline.train.optim import param_groups

    model, batches = _setup(run_dir, cfg, steps)
    kernel = {"fused": True} if fused else {"foreach": False}
    opt = cfg.optim
    optimizer = torch.optim.AdamW(
        param_groups(model, opt.weight_decay), lr=opt.lr, betas=(opt.beta1, opt.beta2), **kernel
    )
    order = iter(batches)

    def step() -> None:
        _loss(model, next(order)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


class TrainerTurns:
    """transformers.Trainer (its default fused AdamW, same loss and batches, no logging) in a
    thread that runs `n` steps when asked and then waits: `run(n)` returns their step times."""

    def __init__(self, run_dir: Path, cfg: Any, steps: int) -> None:
        from transformers import Trainer, TrainerCallback, TrainingArguments

        model, batches = _setup(run_dir, cfg, steps)
        turns = self

        class Batches(torch.utils.data.Dataset):
            def __len__(self) -> int:
                return len(batches) * cfg.micro_batch_size

            def __getitem__(self, i: int) -> dict:
                return {"tokens": batches[i // cfg.micro_batch_size][i % cfg.micro_batch_size]}

        class OurLoss(Trainer):
            def compute_loss(self, model, inputs, return_outputs=False, **kwargs):  # noqa: ANN001
                return _loss(model, inputs["tokens"])

        class Turns(TrainerCallback):
            def on_train_begin(self, *a: Any, **k: Any) -> None:
                turns._wait()

            def on_step_end(self, *a: Any, **k: Any) -> None:
                turns._stepped()

        args = TrainingArguments(
            output_dir=str(run_dir / "trainer"), max_steps=steps,
            per_device_train_batch_size=cfg.micro_batch_size, learning_rate=cfg.optim.lr,
            weight_decay=cfg.optim.weight_decay, adam_beta2=cfg.optim.beta2,
            max_grad_norm=cfg.optim.grad_clip, warmup_steps=5, lr_scheduler_type="cosine",
            logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
            use_cpu=True, dataloader_num_workers=0, remove_unused_columns=False,
        )  # fmt: skip
        self.trainer = OurLoss(
            model=model, args=args, train_dataset=Batches(), callbacks=[Turns()],
            data_collator=lambda rows: {"tokens": torch.stack([r["tokens"] for r in rows])},
        )  # fmt: skip
        self._go, self._done = threading.Semaphore(0), threading.Semaphore(0)
        self._left, self._times, self._start = 0, [], 0.0
        threads = torch.get_num_threads()
        self._thread = threading.Thread(target=self._train, args=(threads,), daemon=True)
        self._thread.start()

    def _train(self, threads: int) -> None:
        torch.set_num_threads(threads)
        self.trainer.train()
        self._done.release()

    def _wait(self) -> None:
        self._go.acquire()
        self._start = time.perf_counter()

    def _stepped(self) -> None:
        now = time.perf_counter()
        self._times.append(now - self._start)
        self._start = now
        self._left -= 1
        if self._left == 0:
            self._done.release()
            self._wait()

    def run(self, n: int) -> list[float]:
        self._left, self._times = n, []
        self._go.release()
        self._done.acquire()
        return self._times

    def finish(self) -> None:
        """Let the thread run out its last (untimed) steps."""
        self._left = -1
        self._go.release()
        self._thread.join()


def timed(step: Callable[[], None], n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def paired_ratio(a: list[float], b: list[float], draws: int = 2000) -> tuple[float, float, float]:
    """Median of the per-round ratios a[r] / b[r], with a 95% bootstrap interval over rounds."""
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    rng = random.Random(0)
    samples = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(draws))
    return statistics.median(ratios), samples[int(0.025 * draws)], samples[int(0.975 * draws)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--block", type=int, default=5, help="steps of each contender per round")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    steps = WARMUP_STEPS + args.rounds * args.block + 2
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        recipe = recipe_for(run_dir, args, "auto", steps)
        run_recipe(recipe, only=["tokenizer", "tokenize"])
        cfg = recipe.stages["pretrain"]
        trainer = TrainerTurns(run_dir, cfg, steps)
        steppers = {
            "pretrain stage (fused AdamW)": stage_stepper(run_dir, recipe, "auto"),
            "pretrain stage (optim.kernel=loop)": stage_stepper(run_dir, recipe, "loop"),
            "bare loop, fused AdamW": bare_stepper(run_dir, cfg, steps, fused=True),
            "bare loop, unfused AdamW": bare_stepper(run_dir, cfg, steps, fused=False),
        }
        contenders: dict[str, Callable[[int], list[float]]] = {
            name: functools.partial(timed, stepper) for name, stepper in steppers.items()
        }
        contenders["HF Trainer (fused AdamW)"] = trainer.run
        for run in contenders.values():
            run(WARMUP_STEPS)
        medians: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(args.rounds):
            for name, run in contenders.items():
                medians[name].append(statistics.median(run(args.block)))
        trainer.finish()
    print(
        f"threads: {torch.get_num_threads()}  model: llama hidden={args.hidden} "
        f"layers={args.layers} seq_len={args.seq_len} batch={args.batch}  "
        f"rounds: {args.rounds} x {args.block} steps each, interleaved"
    )
    for name, values in medians.items():
        print(f"{name:36s}: {statistics.median(values) * 1000:7.1f} ms/step (median of rounds)")
    names = list(contenders)
    stage, stage_loop, fused, unfused, hf = (medians[n] for n in names)
    for label, a, b, target in (
        ("stage / bare fused", stage, fused, "target <= 1.03"),
        ("stage / HF Trainer", stage, hf, "target <= 1.00"),
        ("bare fused / bare unfused", fused, unfused, ""),
        ("stage(loop) / bare unfused", stage_loop, unfused, ""),
        ("HF Trainer / bare fused", hf, fused, ""),
    ):
        point, low, high = paired_ratio(a, b)
        print(f"{label:28s}: {point:.3f}  [95% {low:.3f}, {high:.3f}]  {target}")


if __name__ == "__main__":
    main()
