"""What the post-training stages (sft, reward, rlhf) share: data, base model, TRL wiring, export.

TRL trainers do the training; this module only hands them our launch settings (through
`pipeline.distributed.trainer_arguments`), our tracker (a callback, rank 0) and our directories
(checkpoints under the stage's `checkpoints/`, the export under `export/`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from pipeline.config import StageConfig
from pipeline.context import StageContext
from pipeline.errors import PipelineError
from pipeline.tracking import Tracker

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, Trainer

# Stage kinds whose export is a causal LM a post-training stage can start from.
MODEL_KINDS = ("pretrain", "sft", "rlhf")
BUILTIN_ARITHMETIC = "builtin:arithmetic"
FINGERPRINT_FILE = "fingerprint.txt"
# Plain-text roles (our SentencePiece vocabulary has no role tokens); the assistant turn sits
# between generation markers so TRL can train on assistant tokens only.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ 'Assistant: ' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{%- else -%}"
    "{{ message['role'] | capitalize + ': ' + message['content'] + '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant: ' }}{%- endif -%}"
)


class TrainerStageConfig(StageConfig):
    """Fields every TRL-trained stage has: data, steps, batch, optimiser, logging, checkpoints."""

    data: str = Field(BUILTIN_ARITHMETIC, description="builtin:arithmetic or a JSONL file")
    num_examples: int = Field(2000, ge=1, description="training examples drawn from `data`")
    max_steps: int = Field(100, ge=1, description="optimizer steps")
    micro_batch_size: int = Field(16, ge=1, description="sequences per rank per micro step")
    grad_accum_steps: int = Field(1, ge=1)
    lr: float = Field(5e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(1, ge=1)

    distributed = True


def base_model_dir(ctx: StageContext, kinds: tuple[str, ...] = MODEL_KINDS) -> Path:
    """The export directory of the nearest upstream model stage."""
    return ctx.upstream(kinds).export_dir


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    """The model's tokenizer with our chat template (when it has none) and a pad token.

    Special tokens written as text (the `</s>` TRL appends to completions, the template's
    end of turn) must be parsed as the tokens themselves here, not spelled out as characters.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, split_special_tokens=False)
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def read_jsonl(path: str, required: tuple[tuple[str, ...], ...], where: str) -> list[dict]:
    """Rows of a JSONL file, each holding every key of one of the `required` key sets."""
    file = Path(path)
    if not file.is_file():
        raise PipelineError(
            f"{where}: data {path}: no such file; give a JSONL path or {BUILTIN_ARITHMETIC}"
        )
    from data_prep.sources import jsonl_records

    rows = []
    for number, row in jsonl_records(file):
        if not isinstance(row, dict) or not any(all(k in row for k in keys) for keys in required):
            wanted = " or ".join("/".join(keys) for keys in required)
            raise PipelineError(
                f"{where}: {path} line {number}: a row needs the keys {wanted}; fix the file"
            )
        rows.append(row)
    if not rows:
        raise PipelineError(f"{where}: {path} has no rows; add training examples")
    return rows


def prepare_checkpoints(ctx: StageContext) -> str | None:
    """The newest TRL checkpoint of this configuration to resume from; stale ones are removed."""
    from transformers.trainer_utils import get_last_checkpoint

    marker = ctx.checkpoint_dir / FINGERPRINT_FILE
    if ctx.is_main:
        if marker.is_file() and marker.read_text() != ctx.fingerprint:
            shutil.rmtree(ctx.checkpoint_dir)
        ctx.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(ctx.fingerprint)
    if not ctx.checkpoint_dir.is_dir():
        return None
    return get_last_checkpoint(str(ctx.checkpoint_dir))


def training_arguments(ctx: StageContext, cfg: TrainerStageConfig, model: Any) -> dict[str, Any]:
    """TrainingArguments fields shared by every TRL config: launch, schedule, logging, saving."""
    import torch

    from pipeline.distributed import TrainShape, trainer_arguments
    from pipeline.stages.pretrain import resolve_precision

    shape = TrainShape(
        cfg.micro_batch_size,
        cfg.grad_accum_steps,
        int(os.environ.get("WORLD_SIZE", "1")),
        resolve_precision(cfg.precision),
        cfg.grad_clip,
    )
    launch = ctx.recipe.launch_for(ctx.name)
    return {
        **trainer_arguments(launch, shape, list(getattr(model, "_no_split_modules", None) or [])),
        "output_dir": str(ctx.checkpoint_dir),
        "max_steps": cfg.max_steps,
        "learning_rate": cfg.lr,
        "warmup_steps": cfg.warmup_steps,
        "weight_decay": cfg.weight_decay,
        "lr_scheduler_type": "cosine",
        "logging_steps": cfg.log_every,
        "save_strategy": "steps",
        "save_steps": cfg.checkpoint_every,
        "save_total_limit": cfg.keep_checkpoints,
        "report_to": "none",
        "disable_tqdm": True,
        "seed": ctx.seed,
        "data_seed": ctx.seed,
        "use_cpu": not torch.cuda.is_available(),
        "dataloader_num_workers": 0,
    }


def tracker_callback(tracker: Tracker) -> Any:
    """A TrainerCallback that sends the trainer's numeric logs to our tracker as `train/*`."""
    from transformers import TrainerCallback

    class TrackerCallback(TrainerCallback):
        """Forwards `on_log` rows (rank 0) and keeps the last value of every key."""

        def __init__(self) -> None:
            self.last: dict[str, float] = {}

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
            numeric = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, int | float)}
            if state.is_world_process_zero and numeric:
                self.last.update(numeric)
                tracker.log({f"train/{k}": v for k, v in numeric.items()}, step=state.global_step)

    return TrackerCallback()


def train_and_export(
    ctx: StageContext,
    trainer: Trainer,
    tokenizer: PreTrainedTokenizerBase,
    resume: str | None,
) -> None:
    """Train (resuming when a checkpoint exists) and save model + tokenizer into the export dir."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # our tracker callback logs; no raw dicts on stdout
    if resume:
        ctx.log.info("resuming from %s", Path(resume).name)
    trainer.train(resume_from_checkpoint=resume)
    tmp = ctx.export_dir.parent / f".{ctx.export_dir.name}.tmp"
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(tmp))  # every rank takes part (sharded engines gather)
    if ctx.is_main:
        tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(ctx.export_dir, ignore_errors=True)
        tmp.rename(ctx.export_dir)
    trainer.accelerator.wait_for_everyone()


def fit(
    ctx: StageContext,
    tokenizer: PreTrainedTokenizerBase,
    build: Callable[[Any], Trainer],
    keys: dict[str, str],
    evaluate: Callable[[], dict[str, Any]] | None = None,
    headline: str = "train_loss",
) -> dict[str, Any]:
    """The part every TRL stage shares: train (resuming), export, evaluate, record the summary.

    `build(callback)` makes the trainer with our tracker callback; `keys` renames the trainer's
    last logged values for the summary; `evaluate()` (rank 0, after the export) adds held-out
    metrics.
    """
    resume = prepare_checkpoints(ctx)
    with ctx.tracker() as tracker:
        callback = tracker_callback(tracker)
        trainer = build(callback)
        train_and_export(ctx, trainer, tokenizer, resume)
        summary: dict[str, Any] = last_metrics(callback, keys)
        if evaluate is not None and ctx.is_main:
            summary |= evaluate()
        tracker.summary(summary)
    ctx.write_summary(summary, headline=headline)
    return summary


def held_out_accuracy(ctx: StageContext, tokenizer: PreTrainedTokenizerBase, num: int) -> dict:
    """Greedy exact-match accuracy of the exported model on `num` held-out arithmetic problems."""
    import torch

    from eval.families import load_model
    from eval.tasks import arithmetic_accuracy

    model, _ = load_model(ctx.export_dir, "cuda" if torch.cuda.is_available() else "cpu")
    accuracy = arithmetic_accuracy(model, tokenizer, num)["arithmetic_accuracy"]
    ctx.log.info("held-out arithmetic accuracy %.1f%%", 100 * accuracy)
    return {"arithmetic_accuracy": accuracy}


def last_metrics(callback: Any, keys: dict[str, str]) -> dict[str, float]:
    """The callback's last logged values, renamed by `keys` (trainer key -> summary key)."""
    return {ours: callback.last[theirs] for theirs, ours in keys.items() if theirs in callback.last}


def dataset(rows: list[dict[str, Any]], columns: Callable[[dict], dict] | None = None) -> Any:
    """A `datasets.Dataset` of rows (optionally mapped to the trainer's columns)."""
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # TRL's map() passes would print a bar each
    return Dataset.from_list([columns(r) for r in rows] if columns else rows)
