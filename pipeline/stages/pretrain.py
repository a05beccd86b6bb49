"""Pretraining on token shards: a language model of any family, trained by the shared loop.

The loop (`pipeline.train.loop`) brings the engine, optimizer, schedule, checkpoints and resume;
the objective (causal, masked, span corruption, MoE) comes from the model family through
`pipeline.models`. Batches are pure functions of (seed, step, rank, micro step) over the token
shards, so resuming from a checkpoint replays exactly the data an uninterrupted run would have
seen, and the resumed run ends with the same weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, ValidationInfo, field_validator, model_validator

from data_prep.task_base import task_file_signature
from data_prep.tasks import TaskConfig
from data_prep.tokens_meta import TokensMeta
from eval.vllm_engine import GenerationConfig, plan_problem
from pipeline.engine.config import StageConfig, Strict
from pipeline.engine.context import StageContext
from pipeline.engine.errors import PipelineError
from pipeline.engine.inputs import Input, PlanView, StageSpec
from pipeline.models import document_mask_problem
from pipeline.models.causal_lm import ModelConfig
from pipeline.stages.pretrain_tokenizer import (
    adopted_special_ids,
    adopted_tokenizer_problems,
    tokenizer_fix,
    tokenizer_source,
    tokens_tokenizer_problems,
    users_tokenizer,
)
from pipeline.train.config import LoopConfig

if TYPE_CHECKING:
    from pipeline.models import BuiltModel
    from pipeline.train.loop import Workload


class AnnealFrom(Strict):
    """A checkpoint in the stable phase of another pretrain stage, to decay from."""

    stage: str = Field(description="an upstream pretrain stage (in `after`), constant or wsd")
    step: int = Field(ge=1, description="its checkpoint to start from, inside its stable phase")


class Config(LoopConfig, StageConfig):
    kind: Literal["pretrain"]
    model: ModelConfig = ModelConfig()
    seq_len: int = Field(256, ge=8)
    activation_checkpointing: bool = False
    peak_flops: float | None = Field(None, gt=0, description="per-device peak FLOP/s for MFU")
    document_mask: bool = Field(
        False,
        description="keep the documents packed into a window apart: attention stops and "
        "positions restart after each end-of-document token, whose own target (the next "
        "document's first token) is not scored; causal archs only (llama, gpt2, mixtral, qwen2)",
    )
    eval_task: TaskConfig | None = Field(
        None,
        description="a verifiable task (name: arithmetic | reverse | sort) scored greedily at "
        "every validation on eval_task_problems held-out problems (val/task_accuracy)",
    )
    eval_task_problems: int = Field(
        32, ge=1, description="problems of eval_task per validation: a fixed test-split subset"
    )
    eval_generation: GenerationConfig = Field(
        GenerationConfig(), json_schema_extra={"fingerprint": "when_set"},
        description="the engine that answers eval_task (hf, or vllm on a snapshot of the live "
        "weights: eval.vllm_engine)",
    )  # fmt: skip
    eval_lm_eval_tasks: list[str] = Field(
        [],
        description="lm-eval tasks scored at every validation on the live model (one process): "
        "task_gen, task_choice (over eval_task, default arithmetic) or installed names",
    )
    eval_lm_eval_limit: int = Field(20, ge=1, description="examples per in-loop lm-eval task")
    anneal_from: AnnealFrom | None = Field(
        None,
        description="start from another stage's stable-phase checkpoint (weights, optimizer, "
        "step) and only decay: lr falls linearly from optim.lr to schedule.min_lr_ratio x lr "
        "at max_steps (the rest of `schedule` is not used)",
    )

    distributed = True

    def data_signature(self) -> dict[str, Any]:
        """A JSONL eval_task's file, so an edited task reruns the stage."""
        return task_file_signature(self.eval_task)

    def check_inputs(self) -> None:
        if self.eval_task is not None:
            try:
                self.eval_task.check_inputs()
            except PipelineError as exc:
                raise PipelineError(f"eval_task: {exc}") from None

    @model_validator(mode="after")
    def _anneal_from_upstream(self) -> Config:
        anneal = self.anneal_from
        if anneal is not None and anneal.stage not in self.after:
            raise ValueError(f"anneal_from.stage {anneal.stage!r} must be listed in `after`")
        if anneal is not None and anneal.step >= self.max_steps:
            raise ValueError(
                f"anneal_from.step ({anneal.step}) must be below max_steps ({self.max_steps})"
            )
        return self

    @field_validator("document_mask")
    @classmethod
    def _arch_keeps_documents_apart(cls, document_mask: bool, info: ValidationInfo) -> bool:
        model = info.data.get("model")  # absent when the model block itself failed validation
        if document_mask and model is not None and (problem := document_mask_problem(model.arch)):
            raise ValueError(problem)
        return document_mask


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
    """Train, export, and check that transformers loads the export back as the trained model."""
    from pipeline.train.export import export_model, verify_export
    from pipeline.train.loop import train

    work, built = workload(ctx)
    trained = train(ctx, ctx.config, work)  # type: ignore[arg-type]
    accelerator, model = trained.accelerator, trained.model
    tokenizer_dir = tokenizer_source(ctx)
    export_model(
        accelerator, model, tokenizer_dir, ctx.export_dir,
        built.added_special_tokens, config=ctx.config.model_dump(mode="json"),
    )  # fmt: skip
    if users_tokenizer(ctx) and ctx.is_main:
        from pipeline.train.tokenizer_files import copy_tokenizer_files

        copy_tokenizer_files(tokenizer_dir, ctx.export_dir)  # the user's files, unchanged
    diff = verify_export(accelerator, model, ctx.export_dir, built.auto_class, f"stages.{ctx.name}")
    ctx.log.info("export round trip: max abs logit diff %.3g", diff)
    summary = {**trained.summary, "export_max_abs_logit_diff": diff}
    ctx.write_summary(summary, headline="val_loss")


def workload(ctx: StageContext) -> tuple[Workload, BuiltModel]:
    """The model (seeded), its objective and the batches over the upstream token shards."""
    import torch

    from data_prep.shards import TokenShards
    from pipeline.models import build_model
    from pipeline.train import flops
    from pipeline.train.loop import Workload

    cfg: Config = ctx.config  # type: ignore[assignment]
    tokens = ctx.input("tokens")
    data_dir = tokens.path
    meta = TokensMeta.read(data_dir)
    source = tokenizer_source(ctx)  # the tokenizer the model has and its export carries
    meta.require_tokenizer(source, str(source), tokens.label, ctx.name, tokenizer_fix(ctx, tokens))
    shards, val = TokenShards(data_dir / "train"), TokenShards(data_dir / "val")
    mb, accum, seq_len = cfg.micro_batch_size, cfg.grad_accum_steps, cfg.seq_len

    torch.manual_seed(ctx.seed)
    eos_id = meta.eos_id if cfg.document_mask else None  # positions restart after it
    model_cfg, load_weights = cfg.model, None
    if cfg.model.path is not None:  # continued pretraining of the user's model
        built, model_cfg, load_weights = pretrained(Path(cfg.model.path), cfg, eos_id)
    else:
        built = build_model(
            cfg.model, meta.vocab_size, seq_len, eos_id, adopted_special_ids(ctx, meta)
        )
    model, objective = built.model, built.objective
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    experts = model_cfg.experts_per_token, model_cfg.num_experts
    counts = parameter_counts(model, *experts)
    matmul = flops.matmul_params(model, *experts)
    flops_token = flops.flops_per_token(
        matmul, model_cfg.num_layers, model_cfg.hidden_size, seq_len
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
        describe=f"{model_cfg.arch} ({objective.name}): {counts['params'] / 1e6:.2f}M params",
        summary={**counts, "flops_per_token": flops_token},
        load_weights=load_weights,
    )
    if meta.mixture is not None and objective.name in ("causal_lm", "moe_causal_lm"):
        from eval.mixture import per_source_val_evaluator  # val_loss/<source> at each validation

        work.evaluators.append(
            per_source_val_evaluator(data_dir, seq_len, cfg.eval_batches * mb, mb, eos_id)
        )
    if cfg.anneal_from is not None:
        work.anneal_from = anneal_checkpoint(ctx, cfg.anneal_from)
    work.evaluators += task_evaluators(ctx, cfg)
    return work, built


def pretrained(path: Path, cfg: Config, eos_id: int | None) -> tuple[BuiltModel, Any, Any]:
    """A model directory to continue pretraining: a meta-device twin that describes it, and the
    loader that builds it sharded as the launch trains it and streams its weights in (no rank
    holds the whole model under FSDP2 or ZeRO-3; pipeline.train.sharded_load)."""
    from functools import partial

    from pipeline.models import describe_pretrained
    from pipeline.train.sharded_load import causal_lm_from_config, load_sharded, on_meta

    def build() -> Any:
        model = causal_lm_from_config(path)
        if cfg.activation_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        return model

    built, model_cfg = describe_pretrained(path, on_meta(build), document_eos_id=eos_id)
    return built, model_cfg, partial(load_sharded, path, build=build)


def task_evaluators(ctx: StageContext, cfg: Config) -> list[Any]:
    """The in-loop task evaluators the config asks for: verifiable-task accuracy, lm-eval."""
    tokenizer_dir = tokenizer_source(ctx)
    evaluators: list[Any] = []
    if cfg.eval_task is not None:
        from eval.tasks import task_evaluator

        evaluators.append(
            task_evaluator(
                cfg.eval_task, tokenizer_dir, cfg.eval_task_problems, cfg.eval_generation
            )
        )
    if cfg.eval_lm_eval_tasks:
        if ctx.world_size > 1:  # lm-eval splits its requests over ranks; untested with our engines
            raise PipelineError(
                f"stages.{ctx.name}.eval_lm_eval_tasks: in-loop lm-eval runs in one process, this "
                f"launch has {ctx.world_size}; use launch.nproc: 1, or lm_eval_tasks on an eval stage"
            )
        from data_prep.tasks import ArithmeticTask
        from eval.harness import lm_eval_evaluator

        data = ctx.stage_dir / "lm_eval_data" / f"rank{ctx.rank}"  # each rank writes its own
        task, tasks = cfg.eval_task or ArithmeticTask(), cfg.eval_lm_eval_tasks
        evaluators.append(
            lm_eval_evaluator(tasks, task, tokenizer_dir, data, cfg.eval_lm_eval_limit)
        )
    return evaluators


def anneal_checkpoint(ctx: StageContext, anneal: AnnealFrom) -> Path:
    """The upstream checkpoint to anneal from, once it is known to be in a stable phase of the
    same model (the loop checks that it verifies and has the same global batch)."""
    from pipeline.engine.rundir import CHECKPOINTS_DIR
    from pipeline.train.checkpoint import step_dir
    from pipeline.train.optim import decay_steps

    cfg: Config = ctx.config  # type: ignore[assignment]
    where = f"stages.{ctx.name}.anneal_from"
    up = ctx.input("anneal_from")  # a pretrain stage: the plan checks its kind
    theirs: Config = up.config  # type: ignore[assignment]
    if up.kind != "pretrain" or theirs.model != cfg.model:
        raise PipelineError(
            f"{where}: {anneal.stage} is not a pretrain stage of the same model; anneal the "
            f"stage whose model block this stage repeats"
        )
    schedule, steps = theirs.schedule, theirs.max_steps
    stable_end = steps - decay_steps(schedule, steps) if schedule.kind == "wsd" else steps
    if schedule.kind not in ("constant", "wsd") or not (
        schedule.warmup_steps <= anneal.step <= stable_end
    ):
        raise PipelineError(
            f"{where}: step {anneal.step} is not in a stable phase of {anneal.stage} (schedule "
            f"{schedule.kind}, warmup {schedule.warmup_steps}, stable until {stable_end}); pick "
            f"a step of a constant or wsd schedule between its warmup and its decay"
        )
    return up.stage_dir / CHECKPOINTS_DIR / step_dir(Path(), anneal.step).name


def plan_problems(view: PlanView) -> list[str]:
    """What a plan can know beyond the inputs: a tokenizer to export, an anneal source of the
    same kind."""
    cfg: Config = view.config
    where = f"stages.{view.name}"
    problems = tokens_tokenizer_problems(view) + adopted_tokenizer_problems(view)
    if cfg.model.path is None and not view.inputs.get("tokenizer") and not problems:
        problems.append(
            f"{where}: needs a tokenizer stage upstream (its export carries the tokenizer), or "
            f"model.path: DIR to continue pretraining a model directory"
        )
    if cfg.eval_lm_eval_tasks and view.world_size > 1:
        problems.append(
            f"{where}.eval_lm_eval_tasks: in-loop lm-eval runs in one process, this launch has "
            f"{view.world_size}; use launch.nproc: 1, or lm_eval_tasks on an eval stage"
        )
    problems += in_loop_eval_problems(view)
    anneal = view.first("anneal_from")
    if anneal is not None and anneal.kind != "pretrain":
        problems.append(
            f"{where}.anneal_from.stage: {anneal.stage!r} is a {anneal.kind} stage; name a "
            f"pretrain stage"
        )
    return problems


def in_loop_eval_problems(view: PlanView) -> list[str]:
    """The in-loop evaluations need a val split, problems the task's test split has, and lm-eval
    task names lm-eval knows."""
    from eval.harness import task_names_problem
    from pipeline.stages.rows import draw_problem

    cfg: Config = view.config
    where = f"stages.{view.name}"
    problems = [task_names_problem(cfg.eval_lm_eval_tasks, f"{where}.eval_lm_eval_tasks")]
    if cfg.eval_task is not None:
        problems.append(
            draw_problem(
                cfg.eval_task, "test", cfg.eval_task_problems, f"{where}.eval_task_problems"
            )
        )
        problems.append(
            plan_problem(cfg.eval_generation, f"{where}.eval_generation", view.world_size)
        )
    tokens = view.first("tokens")
    if tokens is not None and getattr(tokens.config, "val_fraction", None) == 0:
        problems.append(
            f"{where}: validates on the val split of {tokens.stage}, which has none "
            f"(stages.{tokens.stage}.val_fraction: 0); give it a val_fraction above 0"
        )
    return [problem for problem in problems if problem]


SPEC = StageSpec(
    Config,
    run,
    output="lm",
    inputs=(
        Input("tokens", ("tokens",)),
        Input("tokenizer", ("tokenizer",), required=False),
        Input("model", (), field="model.path", location="model", required=False, nearest=False),
        Input("anneal_from", ("lm",), field="anneal_from.stage", required=False, nearest=False),
    ),
    plan_check=plan_problems,
)
