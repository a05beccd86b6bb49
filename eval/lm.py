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
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from data_prep.task_base import task_file_signature
from data_prep.tasks import ArithmeticTask, TaskBase, TaskConfig
from eval.harness import SHIPPED, task_names_problem
from eval.lm_metrics import evaluate_model, greedy_samples
from eval.test_time import k_problems, ood_problem
from eval.vllm_engine import GenerationConfig, plan_problem
from pipeline.engine.config import StageConfig
from pipeline.engine.context import StageContext
from pipeline.engine.errors import PipelineError
from pipeline.engine.inputs import Input, PlanView, Resolved, StageSpec
from pipeline.engine.locations import Location
from pipeline.engine.manifest import atomic_write_json, atomic_write_text
from pipeline.stages.rows import draw_problem, pairs_problem

DEFAULT_PROMPTS = ["def fibonacci(n):\n", "import os\n", "class ", "    for i in range("]


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
    pass_k: int = Field(
        8, ge=2, description="samples per problem (at sample_temperature), for pass@k and maj@k"
    )
    sample_temperature: float = Field(
        1.0, gt=0, le=2, json_schema_extra={"fingerprint": "when_set"},
        description="temperature of the pass@k and maj@k samples (self-consistency usually "
        "samples below 1)",
    )  # fmt: skip
    pass_k_problems: int = Field(
        0, ge=0, description="first task_problems sampled for pass@k and maj@k; 0: off"
    )
    k_values: list[int] | None = Field(
        None,
        description="the k of pass@k and maj@k (self-consistency), each <= pass_k; default: 1, "
        "2, 4, 8, 16, 32 up to pass_k (pass_k itself is always scored)",
    )
    few_shot: int = Field(
        0, ge=0, le=32, json_schema_extra={"fingerprint": "when_set"},
        description="k > 0: also score the first model with k solved training problems before "
        "each prompt (k-shot in-context learning: the base model's baseline row, `NAME k-shot`)",
    )  # fmt: skip
    ood_problems: int = Field(
        0,
        ge=0,
        description="out-of-distribution problems answered greedily (generated tasks only: "
        "longer operands, more numbers); 0: off",
    )
    generation: GenerationConfig = Field(
        GenerationConfig(), json_schema_extra={"fingerprint": "when_set"},
        description="the engine that generates task answers (hf, or vllm: eval.vllm_engine)",
    )  # fmt: skip
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

    def data_signature(self) -> dict[str, Any]:
        """A JSONL task's file, so an edited task reruns the eval."""
        return task_file_signature(self.task)

    def check_inputs(self) -> None:
        if self.task is not None:
            self.task.check_inputs()


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
    from eval.few_shot import stage_task_metrics
    from eval.harness import run_harness

    completions = greedy_samples(model, tokenizer, config.prompts, config.max_new_tokens)
    samples = [
        {"model": stage.label, "prompt": p, "completion": c}
        for p, c in zip(config.prompts, completions, strict=True)
    ]
    metrics: dict[str, Any] = {}
    if config.task_problems:
        metrics = stage_task_metrics(config, task, stage, model, tokenizer)
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
    from eval.few_shot import check_positions
    from eval.mixture import window_sources

    model, tokenizer = load_model(stage.path, device)
    family = family_of(model.config.model_type)
    if family == "causal" and config.task_problems:
        check_positions(ctx.name, config, task, stage.label, model, tokenizer)
    if data is None:
        if family != "causal":
            raise PipelineError(
                f"stages.{ctx.name}: {stage.label} is a {family} model, scored on token data "
                f"only; add a tokenize stage to `after:`"
            )
        scored, samples = score_causal(ctx, config, task, model, tokenizer, stage)
        return scored, samples, family
    data.meta.require_tokenizer(tokenizer, str(stage.path), data.stage.label, ctx.name)
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
    from eval.few_shot import few_shot_row
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
            if index == 0 and config.few_shot and config.task_problems:  # ICL baseline row
                label, metrics = few_shot_row(ctx.name, config, task, stage, device)
                outcomes[label], _ = metrics.pop("outcomes"), metrics.pop("examples")
                results[label] = metrics
                tracker.log({f"{label}/{k}": v for k, v in metrics.items()}, step=index)
                summary.update({f"{label}/{k}": v for k, v in metrics.items()})
            if note := summary_note(stage.label, family, metrics):  # empty without token data
                notes.append(note)
                ctx.log.info("%s", note)
            leads = [k for k in (HEADLINES[family], "task_accuracy") if k in metrics]
            headline = headline if index else next(iter(leads), None)  # no tokens: accuracy
            prefix = "" if index == 0 else f"{stage.label}/"
            prefixed = {prefix + key: value for key, value in metrics.items()}
            tracker.log(prefixed, step=index)
            summary.update(prefixed)
        tests, macro_tests = task_report(ctx, task, results, outcomes)  # eval.task_outcomes
        for key, paired in (("paired", tests), ("paired_macro", macro_tests)):
            summary |= {f"{key}/{name}/{k}": v for name, t in paired.items() for k, v in t.items()}
        tracker.summary(summary)

    atomic_write_json(
        ctx.export_dir / "eval.json",
        {
            "tokenize": data.stage.label if data is not None else None,
            "task": task.model_dump(),
            "models": results,
            "paired": tests,
            "paired_macro": macro_tests,
        },
    )
    atomic_write_text(
        ctx.export_dir / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples)
    )
    note = "; ".join(notes)
    if outcomes:
        from eval.tasks import accuracy_table

        table = accuracy_table(results, tests, task, macro_tests)
        ctx.log.info("%s", table)
        note = f"{note}\n{table}" if note else table
    ctx.write_summary(summary, headline=headline, note=note)


def position_limit(model: Resolved) -> int | None:
    """`learned_positions` of a model the plan knows the shape of: a directory (its config.json)
    or a pretrain stage (the transformers config its family builds for its seq_len)."""
    from eval.families import learned_positions
    from pipeline.models.families import FAMILIES

    model_cfg = getattr(model.config, "model", None)
    path = model.location.resolved() if model.location is not None else None
    if path is None and getattr(model_cfg, "path", None) is not None:
        path = Path(model_cfg.path).expanduser()  # continued pretraining keeps the directory's
    if path is not None:
        try:
            return learned_positions(json.loads((path / "config.json").read_text("utf-8")))
        except (OSError, ValueError):
            return None  # the model input's own checks name the directory
    if model.kind != "pretrain" or model_cfg is None:
        return None
    hf_config = FAMILIES[model_cfg.arch].hf_config(model_cfg, 256, model.config.seq_len)
    return learned_positions(hf_config.to_dict())


def plan_problems(view: PlanView) -> list[str]:
    """What an eval knows before the models exist: the problems it draws from its task, its
    lm-eval task names, a val split to score and windows its models can take."""
    cfg: Config = view.config
    where = f"stages.{view.name}"
    models = view.inputs.get("models", [])
    task = eval_task(cfg, models)
    problems = [
        draw_problem(task, "test", cfg.task_problems, f"{where}.task_problems"),
        task_names_problem(cfg.lm_eval_tasks, f"{where}.lm_eval_tasks"),
    ]
    if cfg.pass_k_problems > cfg.task_problems:
        problems.append(
            f"{where}.pass_k_problems: {cfg.pass_k_problems} problems for pass@k, but pass@k "
            f"samples the task_problems={cfg.task_problems} the models answer greedily; lower "
            f"pass_k_problems or raise task_problems"
        )
    problems += k_problems(cfg.k_values, cfg.pass_k, cfg.pass_k_problems, f"{where}.k_values")
    if cfg.ood_problems:
        problems.append(ood_problem(task, cfg.ood_problems, f"{where}.ood_problems"))
    if cfg.task_problems:
        problems.append(plan_problem(cfg.generation, f"{where}.generation"))
    if any(name in SHIPPED for name in cfg.lm_eval_tasks):
        problems.append(draw_problem(task, "test", cfg.lm_eval_limit, f"{where}.lm_eval_limit"))
    if "task_choice" in cfg.lm_eval_tasks:
        problems.append(pairs_problem(task, f"{where}.lm_eval_tasks"))
    tokens = view.first("tokens")
    if tokens is not None and getattr(tokens.config, "val_fraction", None) == 0:
        problems.append(
            f"{where}: scores the val split of {tokens.stage}, which has none "
            f"(stages.{tokens.stage}.val_fraction: 0); give it a val_fraction above 0, or put a "
            f"tokenize stage with a val split first in stages.{view.name}.after"
        )
    if tokens is not None and cfg.seq_len is not None:
        for model in models:
            limit = position_limit(model)
            if limit is not None and cfg.seq_len > limit:
                problems.append(
                    f"{where}.seq_len: {cfg.seq_len} tokens per window, but {model.label} has "
                    f"learned positions for {limit}; use seq_len: {limit} or leave it unset "
                    f"(each model's own)"
                )
    return [problem for problem in problems if problem]


SPEC = StageSpec(
    Config,
    run,
    output="evaluation",
    inputs=(
        Input("models", ("lm",), field="models.*", location="model", many=True),
        Input("tokens", ("tokens",), required=False),
    ),
    plan_check=plan_problems,
)
