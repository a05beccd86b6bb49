"""Preference and reinforcement learning with TRL: GRPO or RLOO against rewards, or DPO on pairs.

GRPO/RLOO sample `num_generations` completions per prompt and score them with verifiable reward
functions named in the recipe (pipeline.stages.rewards) and/or a reward stage's model; `beta` is the KL
coefficient towards a reference model (the starting policy, optionally synced every few steps).
DPO trains on chosen/rejected pairs (the task's built-in pairs or a JSONL file). The trainer's
reward mean/std, fraction of zero-variance groups and completion lengths go to metrics.jsonl.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from pipeline.engine.context import StageContext
from pipeline.engine.inputs import Input, PlanView, StageSpec
from pipeline.engine.locations import Location
from pipeline.stages.base_model import MODEL_INPUT, model_problems
from pipeline.stages.chat import template_problems
from pipeline.stages.dpo_losses import DpoLoss
from pipeline.stages.posttrain import BUILTIN_TASK, TaskStageConfig, generation_problems
from pipeline.stages.reward_models import Ensemble
from pipeline.stages.rewards import RewardName, reward_columns, steps_problem
from pipeline.stages.rl_guard import GuardConfig
from pipeline.stages.rlhf_trainers import (
    RolloutConfig,
    generation_batch_problem,
    rollout_problem,
)
from pipeline.stages.rows import draws_problems, pairs_problem, task_stage_draws

# Fields only one algorithm reads (the others would ignore them), and the values that are off.
ONLY_FOR = {
    "reward_model": (("grpo", "rloo"), []),
    "ensemble": (("grpo", "rloo"), "mean"),
    "target_kl": (("grpo", "rloo"), None),
    "pairs": (("dpo",), None),
    "loss_type": (("grpo",), None),
    "scale_rewards": (("grpo",), None),
    "num_iterations": (("grpo",), 1),
    "dpo_sft_weight": (("dpo",), 0.0),
    "dpo_loss": (("dpo",), "sigmoid"),
    "rollouts": (("grpo", "rloo"), RolloutConfig()),
}

# Trainer log keys (GRPO/RLOO/DPO) recorded in the stage summary under our names.
SUMMARY_KEYS = {
    "loss": "train_loss",
    "reward": "reward_mean",
    "reward_std": "reward_std",
    "frac_reward_zero_std": "frac_reward_zero_std",
    "completions/mean_length": "completion_length",
    "kl": "kl",
    "clip_ratio/region_mean": "clip_fraction",
    "entropy": "entropy",
    "rewards/chosen": "rewards_chosen",
    "rewards/rejected": "rewards_rejected",
    "rewards/margins": "reward_margin",
}


class Config(TaskStageConfig):
    """GRPO/RLOO with verifiable rewards or a reward model, or DPO, from the upstream policy."""

    kind: Literal["rlhf"] = "rlhf"
    algorithm: Literal["grpo", "rloo", "dpo"] = "grpo"
    rewards: list[RewardName] = Field(
        ["exact"],
        description="exact | partial | format, or a function by import path package.module:function "
        "(pipeline.stages.rewards)",
    )
    reward_model: list[str | Location] = Field(
        [],
        description="reward stages or {path: DIR} reward models that also score; several are an "
        "ensemble combined by `ensemble`",
    )
    ensemble: Ensemble = Field(
        "mean", description="mean | min | mean_minus_std (mean - ensemble_lambda x std)"
    )
    ensemble_lambda: float = Field(1.0, ge=0, description="weight of the members' std")
    pairs: str | None = Field(
        None, description="dpo: a preferences stage whose pairs to train on, instead of `data`"
    )
    rollouts: RolloutConfig = Field(
        RolloutConfig(), json_schema_extra={"fingerprint": "when_set"},
        description="the engine of GRPO/RLOO rollouts: hf, or vllm through TRL (CUDA)",
    )  # fmt: skip
    guard: GuardConfig | None = Field(
        None,
        description="measure gold (held-apart task problems) and KL to the start every N steps, "
        "stop when gold stops rising, export the best policy (pipeline.stages.rl_guard)",
    )
    target_kl: float | None = Field(
        None, gt=0, description="adapt beta to hold the logged per-token KL here (needs beta > 0)"
    )
    kl_horizon: int = Field(100, ge=1, description="steps over which beta moves by its error")
    reward_weights: list[float] | None = Field(None, description="one per reward; default: 1 each")
    beta: float | None = Field(None, ge=0, description="KL coefficient; default: TRL's")
    sync_ref_model: bool = Field(False, description="move the reference towards the policy")
    ref_model_sync_steps: int = Field(64, ge=1)
    num_generations: int = Field(8, ge=2, description="completions per prompt (grpo/rloo)")
    max_completion_length: int = Field(8, ge=1, description="tokens per completion (grpo/rloo)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (grpo/rloo)")
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] | None = Field(
        None, description="GRPO loss aggregation; default: TRL's (dapo)"
    )
    scale_rewards: Literal["group", "batch", "none"] | None = Field(
        None, description="GRPO advantage scaling by the reward std; default: TRL's (group)"
    )
    num_iterations: int = Field(1, ge=1, description="policy updates per generation batch")
    max_length: int = Field(64, ge=8, description="prompt + response tokens (dpo)")
    dpo_loss: DpoLoss = Field(
        "sigmoid",
        description="dpo: TRL's preference loss (README: what each does); sigmoid is DPO's own",
    )
    dpo_sft_weight: float = Field(
        0.0, ge=0, description="dpo: weight of an NLL loss on the chosen answer (RPO); 0: plain DPO"
    )

    def data_signature(self) -> dict[str, Any]:
        """As every trainer stage, plus the files of reward functions named by import path."""
        from pipeline.train.user_code import code_signature, is_import_path

        code = {name: code_signature(name) for name in self.rewards if is_import_path(name)}
        return super().data_signature() | ({"reward_code": code} if code else {})

    def check_inputs(self) -> None:
        """As every trainer stage: DPO's data rows hold chosen/rejected pairs, GRPO/RLOO's a
        prompt and every column a reward function reads (the built-ins read `answer`)."""
        self.task.check_inputs()
        if self.data != BUILTIN_TASK:
            from pipeline.stages.rows import first_row

            if self.algorithm == "dpo":
                first_row(self.data, (("chosen", "rejected"),))
            else:
                columns = {c for name in self.rewards for c in reward_columns(name, self.task)}
                first_row(self.data, (("prompt", *sorted(columns)),))

    @field_validator(*ONLY_FOR)
    @classmethod
    def _for_its_algorithm(cls, value: Any, info: ValidationInfo) -> Any:
        algorithms, off = ONLY_FOR[info.field_name]  # type: ignore[index]
        algorithm = info.data.get("algorithm")  # absent when it failed validation itself
        if algorithm is not None and algorithm not in algorithms and value != off:
            raise ValueError(
                f"{algorithm} does not use {info.field_name} ({'/'.join(algorithms)} only); "
                f"remove it or use algorithm: {algorithms[0]}"
            )
        return value

    @field_validator("sync_ref_model")
    @classmethod
    def _sync_without_adapter(cls, sync: bool, info: ValidationInfo) -> bool:
        # With an adapter TRL's reference is the base with the adapter off: nothing to sync.
        if sync and info.data.get("adapter") is not None:
            raise ValueError(
                "an adapter's reference is its base with the adapter off, which TRL cannot sync; "
                "set sync_ref_model: false or train without an adapter"
            )
        return sync

    @model_validator(mode="after")
    def _check_rewards(self) -> Config:
        if self.algorithm != "dpo" and not self.rewards and not self.reward_model:
            raise ValueError("grpo/rloo need `rewards` names or a `reward_model` stage")
        if "steps" in self.rewards and (problem := steps_problem(self.task)):
            raise ValueError(problem)
        count = len(self.rewards) + bool(self.reward_model)  # an ensemble is one reward
        if self.reward_weights is not None and len(self.reward_weights) != count:
            raise ValueError(
                f"reward_weights has {len(self.reward_weights)} values for {count} rewards"
            )
        return self

    @field_validator("reward_model", mode="before")
    @classmethod
    def _as_list(cls, value: Any) -> Any:
        return [] if value is None else value if isinstance(value, list) else [value]

    @model_validator(mode="after")
    def _kl_and_pairs(self) -> Config:
        if self.target_kl is not None and not self.beta:
            raise ValueError("target_kl adapts beta from its start value: set beta above 0")
        if self.pairs is not None and self.data != BUILTIN_TASK:
            raise ValueError("pairs and data both name the DPO pairs; keep one")
        if self.guard is not None and self.data != BUILTIN_TASK:
            raise ValueError(
                "guard measures gold on the task's problems, so it needs data: builtin:task"
            )
        return self

    @model_validator(mode="after")
    def _check_checkpoint_every(self) -> Config:
        # TRL keeps a generation batch (reused for num_iterations updates) in memory only: a
        # checkpoint between its updates resumes with a new batch, not the interrupted run's.
        if self.algorithm == "grpo" and self.checkpoint_every % self.num_iterations:
            every, n = self.checkpoint_every, self.num_iterations
            raise ValueError(
                f"checkpoint_every={every} is not a multiple of num_iterations={n}: a checkpoint "
                f"between the updates of one generation batch cannot resume exactly; use "
                f"checkpoint_every: {max(n, every // n * n)}"
            )
        return self


def reference_problem(cfg: Config, where: str) -> str | None:
    """GRPO/RLOO load no reference model when the KL coefficient is 0 (TRL's GRPO default), so
    there is none to sync."""
    if not cfg.sync_ref_model or cfg.algorithm == "dpo":
        return None
    beta = cfg.beta
    if beta is None:  # TRL's default, read from its config class (importing TRL takes seconds)
        import dataclasses

        from trl import GRPOConfig, RLOOConfig

        trainer = GRPOConfig if cfg.algorithm == "grpo" else RLOOConfig
        beta = next(f.default for f in dataclasses.fields(trainer) if f.name == "beta")
    if beta:
        return None
    return (
        f"{where}.sync_ref_model: the KL coefficient beta is 0 ({cfg.algorithm}'s default when "
        f"unset), so no reference model is kept to sync; set beta above 0 or sync_ref_model: false"
    )


def plan_problems(view: PlanView) -> list[str]:
    """The model's checks (base_model.model_problems), the generation batch, the chat template,
    the reference model to sync and what the stage draws from its task."""
    cfg: Config = view.config
    where = f"stages.{view.name}"
    problems = model_problems(view) + template_problems(cfg.chat_template, f"{where}.chat_template")
    problems += generation_problems(cfg, view.world_size, where)
    for problem in (
        generation_batch_problem(cfg, view.world_size, where),
        reference_problem(cfg, where),
        rollout_problem(cfg, where),
    ):
        if problem:
            problems.append(problem)
    dpo_pairs = cfg.algorithm == "dpo" and cfg.data == BUILTIN_TASK and cfg.pairs is None
    if dpo_pairs and (problem := pairs_problem(cfg.task, f"{where}.task")):
        return [*problems, problem]
    draws = task_stage_draws(cfg)
    if cfg.pairs is not None:
        del draws["num_examples"]  # the preferences stage's pairs, not the task's
    return problems + draws_problems(cfg.task, draws, where)


def run(ctx: StageContext) -> None:
    """Train the policy, export it, record reward statistics and held-out accuracy."""
    from pipeline.stages.base_model import (
        base_model,
        causal_lm_twin,
        load_causal_lm,
        load_tokenizer,
    )
    from pipeline.stages.posttrain import fit, task_evaluation
    from pipeline.stages.rl_guard import guarded_build
    from pipeline.stages.rlhf_trainers import build_trainer, trainer_config

    cfg: Config = ctx.config  # type: ignore[assignment]
    source = base_model(ctx)
    tokenizer = load_tokenizer(source, cfg.chat_template)
    tokenizer.padding_side = "left"  # generation batches are left-padded
    args = trainer_config(ctx, cfg, causal_lm_twin(source))
    model = load_causal_lm(source, f"stages.{ctx.name}", cfg.adapter, args)
    ctx.log.info(
        "%s%s from %s, %d steps", cfg.algorithm.upper(), " (LoRA)" if cfg.adapter else "",
        source.label, cfg.max_steps,
    )  # fmt: skip
    evaluation = task_evaluation(ctx, cfg, tokenizer)
    # Without a held-out score, what the run optimised says more than its (policy-gradient) loss.
    fallback = "reward_margin" if cfg.algorithm == "dpo" else "reward_mean"
    evaluation.setdefault("headline", "guard_best_gold" if cfg.guard else fallback)
    build = guarded_build(
        ctx, cfg, tokenizer, source.path, evaluation,
        lambda callback: build_trainer(ctx, cfg, model, tokenizer, callback, args),
    )  # fmt: skip
    fit(ctx, tokenizer, build, SUMMARY_KEYS, **evaluation)
    if ctx.is_main and cfg.algorithm != "dpo":
        from eval.task_plots import rl_section
        from pipeline.engine.sections import write_sections
        from pipeline.engine.tracking import read_metrics

        rows = read_metrics(ctx.stage_dir)
        write_sections(ctx.export_dir, [rl_section(ctx.export_dir, rows, cfg.algorithm.upper())])


SPEC = StageSpec(
    Config,
    run,
    output="lm",
    inputs=(
        MODEL_INPUT,
        Input("reward_model", ("reward_model",), field="reward_model.*", location="model",
              required=False, nearest=False, many=True),
        Input("pairs", ("preferences",), field="pairs", required=False, nearest=False),
    ),
    plan_check=plan_problems,
)  # fmt: skip
