"""Language-model evaluation stage: validation loss, perplexity, bits per byte and greedy samples.

Causal LMs get all of these; masked and encoder-decoder LMs are scored with their own objective
(see eval.families), chosen from the exported config, not by the recipe.

Every model is scored on the same validation windows of the nearest upstream tokenize stage and
compared with a unigram model of that stage's training tokens, the simplest baseline a language
model has to beat. The first model's metrics are recorded unprefixed (so the headline `val_loss`
is its loss); those of further models carry their stage name, e.g. `sft/val_loss`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, model_validator

from data_prep.tasks import ArithmeticTask, TaskBase, TaskConfig
from pipeline.engine.config import StageConfig
from pipeline.engine.context import StageContext
from pipeline.engine.errors import PipelineError
from pipeline.engine.inputs import Input, StageSpec
from pipeline.engine.locations import Location
from pipeline.engine.manifest import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_PROMPTS = ["def fibonacci(n):\n", "import os\n", "class ", "    for i in range("]
BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")

BatchProgress = Callable[[list[np.ndarray]], Iterable[np.ndarray]]


class Config(StageConfig):
    """Score LMs on held-out tokens (causal ones against a unigram baseline, with samples)."""

    kind: Literal["eval"] = "eval"
    models: list[str | Location] = Field(
        [],
        description="models to score: stage names and {path: DIR} model directories, in any mix; "
        "default: the nearest upstream model stage",
    )
    max_tokens: int = Field(200_000, ge=1, description="validation target tokens scored")
    seq_len: int | None = Field(
        None, ge=1, description="window length; default: the model's seq_len"
    )
    batch_size: int = Field(8, ge=1, description="windows per forward pass")
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS))
    max_new_tokens: int = Field(48, ge=1, description="greedy tokens generated per prompt")
    task: TaskConfig | None = Field(
        None, description="the verifiable task scored; default: the models' post-training task"
    )
    task_problems: int = Field(
        0, ge=0, description="held-out task problems answered greedily (pass@1); 0: off"
    )
    pass_k: int = Field(8, ge=2, description="samples per problem for pass@k (temperature 1)")
    pass_k_problems: int = Field(0, ge=0, description="problems sampled for pass@k; 0: off")
    lm_eval_tasks: list[str] = Field(
        [], description="lm-eval tasks: task_gen, task_choice (over `task`) or installed names"
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "arithmetic_problems" in data:
            raise ValueError("arithmetic_problems was renamed to task_problems; use task_problems")
        return data

    lm_eval_limit: int = Field(100, ge=1, description="examples per lm-eval task")


def token_byte_lengths(tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """UTF-8 byte length of every token id of a SentencePiece-style vocabulary (specials: 0)."""
    special_ids = set(tokenizer.all_special_ids)
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    lengths = np.zeros(len(pieces), dtype=np.int64)
    for token_id, piece in enumerate(pieces):
        if token_id in special_ids or piece is None:
            continue
        if BYTE_PIECE.fullmatch(piece):
            lengths[token_id] = 1
        else:
            lengths[token_id] = len(piece.replace("\u2581", " ").encode("utf-8"))
    return lengths


def unigram_loss(train_counts: np.ndarray, val_tokens: np.ndarray) -> float:
    """Mean NLL (nats/token) of `val_tokens` under add-one smoothed training-token frequencies."""
    counts = train_counts.astype(np.float64) + 1.0
    log_probs = np.log(counts) - np.log(counts.sum())
    return float(-log_probs[val_tokens].mean())


def window_losses(
    model: PreTrainedModel,
    windows: np.ndarray,
    batch_size: int,
    progress: BatchProgress | None = None,
) -> np.ndarray:
    """Next-token NLL (nats) of every target of windows (N, seq_len + 1): (N, seq_len) float64."""
    import torch
    import torch.nn.functional as F

    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    losses = []
    with torch.inference_mode():
        for batch in progress(batches) if progress else batches:
            tokens = torch.as_tensor(batch, dtype=torch.long, device=model.device)  # (B, T+1)
            logits = model(tokens[:, :-1]).logits.float()  # (B, T, V)
            targets = tokens[:, 1:]  # (B, T)
            nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
            losses.append(nll.view_as(targets).double().cpu().numpy())
    return np.concatenate(losses) if losses else np.zeros((0, windows.shape[1] - 1))


def score_windows(
    model: PreTrainedModel,
    windows: np.ndarray,
    batch_size: int,
    progress: BatchProgress | None = None,
) -> tuple[float, int]:
    """Summed next-token NLL (nats) and target count over windows of shape (N, seq_len + 1)."""
    losses = window_losses(model, windows, batch_size, progress)
    return float(losses.sum()), losses.size


def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    windows: np.ndarray,
    train_counts: np.ndarray,
    batch_size: int,
    progress: BatchProgress | None = None,
    sources: tuple[list[str], np.ndarray] | None = None,
) -> dict[str, float]:
    """Validation loss, perplexity, bits per byte and the unigram baseline on the same targets.

    With `sources` (names, the source index of every target), also `val_loss/<name>` per source.
    """
    from eval.mixture import losses_by_source

    targets = windows[:, 1:].ravel()
    byte_lengths = token_byte_lengths(tokenizer)
    vocab_size = min(model.get_input_embeddings().num_embeddings, len(byte_lengths))
    if int(targets.max()) >= vocab_size:
        raise PipelineError(
            f"validation data has token id {int(targets.max())} but the model's vocabulary has "
            f"{vocab_size}; evaluate a model on data tokenized with its own tokenizer"
        )
    losses = window_losses(model, windows, batch_size, progress)
    total_nll, num_tokens = float(losses.sum()), losses.size
    num_bytes = int(byte_lengths[targets].sum())
    val_loss = total_nll / num_tokens
    baseline = unigram_loss(train_counts, targets)
    metrics = {
        "val_loss": val_loss,
        "perplexity": math.exp(val_loss),
        "bits_per_byte": total_nll / math.log(2) / num_bytes,
        "unigram_loss": baseline,
        "loss_vs_unigram": val_loss / baseline,
        "num_tokens": num_tokens,
        "num_bytes": num_bytes,
    }
    if sources is not None:
        names, of_target = sources
        metrics |= losses_by_source(losses, np.ones_like(losses, bool), of_target, names)
    return metrics


def greedy_samples(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
) -> list[str]:
    """Greedy completion of each prompt, started as a fresh document (after an end-of-text token)."""
    import torch

    eos_id = tokenizer.eos_token_id
    completions = []
    for prompt in prompts:
        start = [eos_id] if eos_id is not None else []
        ids = start + tokenizer.encode(prompt, add_special_tokens=False)
        inputs = torch.tensor([ids], dtype=torch.long, device=model.device)
        with torch.inference_mode():
            output = model.generate(
                inputs,
                attention_mask=torch.ones_like(inputs),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos_id,
                pad_token_id=eos_id,
            )
        completions.append(tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True))
    return completions


def load_windows(split_dir: Path, seq_len: int, max_tokens: int) -> np.ndarray:
    """Sequential int64 windows (N, seq_len + 1) of a split, about `max_tokens` targets in all."""
    from data_prep.shards import TokenShards

    windows = TokenShards(split_dir).windows(seq_len, max_windows=max(1, max_tokens // seq_len))
    return np.stack(list(windows))


def eval_task(config: Config, stages: list[Any]) -> TaskBase:
    """The task scored: the eval's own, else the first model stage's post-training task."""
    if config.task is not None:
        return config.task
    return next(
        (s.config.task for s in stages if isinstance(getattr(s.config, "task", None), TaskBase)),
        ArithmeticTask(),
    )


def score_causal(
    ctx: StageContext, config: Config, task: TaskBase, model: Any, tokenizer: Any, stage: Any
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Samples, task accuracy and lm-eval metrics of one causal LM; (metrics, sample rows)."""
    from eval.harness import run_harness
    from eval.tasks import score_task

    completions = greedy_samples(model, tokenizer, config.prompts, config.max_new_tokens)
    samples = [
        {"model": stage.label, "prompt": p, "completion": c}
        for p, c in zip(config.prompts, completions, strict=True)
    ]
    metrics: dict[str, Any] = {}
    if config.task_problems:
        metrics = score_task(
            model, tokenizer, task, config.task_problems, config.pass_k, config.pass_k_problems
        )
        samples += [{"model": stage.label, **e} for e in metrics.pop("examples")]
    if config.lm_eval_tasks:
        harness = run_harness(
            stage.path,
            config.lm_eval_tasks,
            ctx.stage_dir / "lm_eval_data",
            config.lm_eval_limit,
            task,
        )
        metrics |= {f"lm_eval/{key}": value for key, value in harness.items()}
    return metrics, samples


class EvalData:
    """What every model of an eval stage is scored against: validation shards and train counts."""

    def __init__(self, tokens: Any) -> None:
        from data_prep.shards import TokenShards
        from data_prep.tokens_meta import TokensMeta
        from eval.mixture import val_runs

        self.stage = tokens
        self.export_dir = tokens.path
        self.meta = TokensMeta.read(self.export_dir)
        self.vocab_size = self.meta.vocab_size
        self.train_counts = TokenShards(self.export_dir / "train").token_counts(self.vocab_size)
        self.val_runs = val_runs(self.export_dir)  # None: no mixture recorded


def score_model(
    ctx: StageContext,
    config: Config,
    task: TaskBase,
    data: EvalData | None,
    stage: Any,
    device: str,
) -> tuple[dict[str, Any], list[dict[str, Any]], str]:
    """All metrics of one model (a stage's export or a directory); (metrics incl. task
    `outcomes`, sample rows, family). Without token data, only samples and task metrics."""
    from eval.families import (
        family_metrics,
        family_of,
        load_model,
        objective_for,
        objective_metrics,
    )
    from eval.mixture import window_sources

    model, tokenizer = load_model(stage.path, device)
    if data is not None:  # scored on ids of another vocabulary, its metrics would be noise
        data.meta.require_tokenizer(tokenizer, str(stage.path), data.stage.label, ctx.name)
    family = family_of(model.config.model_type)
    if data is None:
        if family != "causal":
            raise PipelineError(
                f"stages.{ctx.name}: {stage.label} is a {family} model, scored on token data "
                f"only; add a tokenize stage to `after:`"
            )
        scored, samples = score_causal(ctx, config, task, model, tokenizer, stage)
        return scored, samples, family
    seq_len = (
        config.seq_len
        or getattr(stage.config, "seq_len", None)
        or model.config.max_position_embeddings
    )
    windows = load_windows(data.export_dir / "val", seq_len, config.max_tokens)
    progress = partial(ctx.progress, desc=f"eval {stage.label}")
    metrics: dict[str, Any] = {}
    samples: list[dict[str, Any]] = []
    if family == "causal":
        sources = window_sources(data.val_runs, windows)
        metrics = evaluate_model(
            model, tokenizer, windows, data.train_counts, config.batch_size, progress, sources
        )
        metrics["seq_len"] = seq_len
        scored, samples = score_causal(ctx, config, task, model, tokenizer, stage)
        metrics |= scored
        if metrics["loss_vs_unigram"] >= 1.0:
            ctx.log.warning("%s does not beat the unigram baseline; train it longer", stage.label)
    objective = objective_for(stage.config, model.config, data.vocab_size)
    if objective.name != "causal_lm":  # masked, span corruption or MoE routing
        scored = objective_metrics(model, objective, windows, config.batch_size, progress)
        metrics |= family_metrics(family, scored, len(windows), seq_len)
    return metrics, samples, family


def run(ctx: StageContext) -> None:
    """Score each model stage on validation tokens, sample from it, write eval.json/samples.jsonl."""
    import torch

    from eval.families import HEADLINES, summary_note
    from eval.task_outcomes import task_report

    config = ctx.config
    assert isinstance(config, Config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokens = ctx.optional_input("tokens")
    data = EvalData(tokens) if tokens is not None else None
    stages = ctx.inputs("models")
    task = eval_task(config, stages)

    results: dict[str, dict[str, Any]] = {}
    samples: list[dict[str, Any]] = []
    outcomes: dict[str, list[dict[str, Any]]] = {}
    summary: dict[str, Any] = {}
    notes: list[str] = []
    headline: str | None = None
    with ctx.tracker() as tracker:
        for index, stage in enumerate(stages):
            metrics, rows, family = score_model(ctx, config, task, data, stage, device)
            if "outcomes" in metrics:
                outcomes[stage.label] = metrics.pop("outcomes")
            samples += rows
            results[stage.label] = metrics
            if note := summary_note(stage.label, family, metrics):  # empty without token data
                notes.append(note)
                ctx.log.info("%s", note)
            if index == 0:  # without token data, the first model's task accuracy leads
                headline = next(
                    (k for k in (HEADLINES[family], "task_accuracy") if k in metrics), None
                )
            prefix = "" if index == 0 else f"{stage.label}/"
            prefixed = {prefix + key: value for key, value in metrics.items()}
            tracker.log(prefixed, step=index)
            summary.update(prefixed)
        tests = task_report(ctx, task, results, outcomes)  # eval.task_outcomes
        summary |= {f"paired/{name}/{k}": v for name, t in tests.items() for k, v in t.items()}
        tracker.summary(summary)

    atomic_write_json(
        ctx.export_dir / "eval.json",
        {
            "tokenize": data.stage.label if data is not None else None,
            "task": task.model_dump(),
            "models": results,
            "paired": tests,
        },
    )
    atomic_write_text(
        ctx.export_dir / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples)
    )
    note = "; ".join(notes)
    if outcomes:
        from eval.tasks import accuracy_table

        table = accuracy_table(results, tests, task)
        ctx.log.info("%s", table)
        note = f"{note}\n{table}" if note else table
    ctx.write_summary(summary, headline=headline, note=note)


SPEC = StageSpec(
    Config,
    run,
    output="evaluation",
    inputs=(
        Input("models", ("lm",), field="models.*", location="model", many=True),
        Input("tokens", ("tokens",), required=False),
    ),
)
