"""The TRL trainers of the rlhf stage: their configs (made before the model, so that a ZeRO-3
launch loads it partitioned), their data and their rewards. `cfg` is the rlhf stage's Config
(typed loosely here: that module imports this one)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from pipeline.engine.config import Strict
from pipeline.engine.errors import PipelineError
from pipeline.stages.dpo_losses import dpo_losses
from pipeline.stages.posttrain import BUILTIN_TASK

if TYPE_CHECKING:
    from pipeline.engine.context import StageContext


class RolloutConfig(Strict):
    """Which engine generates GRPO/RLOO rollouts: TRL's own (`use_vllm`, `vllm_mode`)."""

    engine: Literal["hf", "vllm"] = Field(
        "hf", description="hf: the policy's own generate; vllm: TRL's vLLM generation (CUDA)"
    )
    mode: Literal["colocate", "server"] = Field(
        "colocate",
        description="colocate: vLLM inside each training process; server: a `trl vllm-serve` "
        "server at server_base_url (weights sent after each optimiser step)",
    )
    server_base_url: str | None = Field(
        None, description="mode server: the server's URL, e.g. http://gen-node:8000"
    )


def rollout_settings(rollouts: RolloutConfig) -> dict[str, Any]:
    """The GRPOConfig/RLOOConfig arguments of `rollouts` (none for hf)."""
    if rollouts.engine != "vllm":
        return {}
    server = {"vllm_server_base_url": rollouts.server_base_url} if rollouts.mode == "server" else {}
    return {"use_vllm": True, "vllm_mode": rollouts.mode, **server}


def rollout_problem(cfg: Any, where: str, cuda: bool | None = None) -> str | None:
    """vLLM rollouts run where TRL can run them: on CUDA (its server mode sends weights over
    NCCL; its colocate mode imports vLLM beside our transformers, which vLLM's CPU build pins
    below ours), with a server URL in server mode (ONLY_FOR keeps it to GRPO/RLOO)."""
    rollouts = cfg.rollouts
    if rollouts.engine != "vllm":
        return None
    if rollouts.mode == "server" and not rollouts.server_base_url:
        return f"{where}.rollouts.server_base_url: mode server needs the server's URL; set it"
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if not cuda:
        return (
            f"{where}.rollouts: TRL's vLLM rollouts need a CUDA GPU (server mode syncs weights "
            f"over NCCL; colocate mode needs vLLM beside this transformers, which vLLM's CPU build "
            f"refuses); use engine: hf here"
        )
    return None


def generation_batch_problem(cfg: Any, world_size: int, where: str) -> str | None:
    """GRPO/RLOO score whole groups: the completions of one step must be a multiple of
    num_generations (known from the recipe and its launch, so the plan checks it)."""
    generation_batch = cfg.micro_batch_size * world_size * cfg.grad_accum_steps
    if cfg.algorithm == "dpo" or generation_batch % cfg.num_generations == 0:
        return None
    return (
        f"{where}: micro_batch_size x processes x grad_accum_steps = {generation_batch} "
        f"completions per step is not a multiple of num_generations={cfg.num_generations}; "
        f"change one of them"
    )


def prompt_rows(cfg: Any, seed: int, where: str) -> list[dict[str, Any]]:
    """GRPO/RLOO prompts: the task's train problems (with `answer`) or the user's JSONL rows."""
    from data_prep.tasks import task_problems
    from pipeline.stages.rows import read_jsonl

    if cfg.data == BUILTIN_TASK:
        return [
            {"prompt": p["prompt"], "answer": p["answer"]}
            for p in task_problems(cfg.task, "train", cfg.num_examples, seed)
        ]
    return read_jsonl(cfg.data, (("prompt",),), where)[: cfg.num_examples]


def trainer_config(ctx: StageContext, cfg: Any, twin: Any) -> Any:
    """The TRL config for `cfg.algorithm` (made before the model: a ZeRO-3 launch loads it
    partitioned); `twin` is the model on the meta device."""
    from pipeline.stages.posttrain import training_arguments

    common = training_arguments(ctx, cfg, twin)
    ref = {"sync_ref_model": cfg.sync_ref_model, "ref_model_sync_steps": cfg.ref_model_sync_steps}
    beta = {} if cfg.beta is None else {"beta": cfg.beta}
    if cfg.algorithm == "dpo":
        from trl import DPOConfig

        return DPOConfig(**common, **ref, **beta, **dpo_losses(cfg), max_length=cfg.max_length)
    if problem := generation_batch_problem(cfg, ctx.world_size, f"stages.{ctx.name}"):
        raise PipelineError(problem)
    if problem := rollout_problem(cfg, f"stages.{ctx.name}"):
        raise PipelineError(problem)
    sampling = {
        **rollout_settings(cfg.rollouts),
        "num_generations": cfg.num_generations,
        "max_completion_length": cfg.max_completion_length,
        "temperature": cfg.temperature,
        "reward_weights": cfg.reward_weights,
        **ref,
        **beta,
    }
    if cfg.algorithm == "grpo":
        from trl import GRPOConfig

        sampling |= {"num_iterations": cfg.num_iterations}
        sampling |= {"loss_type": cfg.loss_type} if cfg.loss_type else {}
        sampling |= {"scale_rewards": cfg.scale_rewards} if cfg.scale_rewards else {}
        return GRPOConfig(**common, **sampling)
    from trl import RLOOConfig

    return RLOOConfig(**common, **sampling)


def build_trainer(
    ctx: StageContext, cfg: Any, model: Any, tokenizer: Any, callback: Any, args: Any
) -> Any:
    """The TRL trainer for `cfg.algorithm` with its data and rewards, configured by `args`.
    A reference model TRL needs (no adapter, and for GRPO/RLOO beta > 0) is the stage's base
    model, loaded sharded under FSDP2 or ZeRO-3 (pipeline.train.trl_load)."""
    from pipeline.stages.base_model import base_model, peft_config
    from pipeline.stages.reward import preference_rows
    from pipeline.stages.rewards import reward_functions
    from pipeline.stages.rows import dataset
    from pipeline.train.trl_load import load_for_trainer, sharded_reference

    where = f"stages.{ctx.name}"
    source = base_model(ctx).path
    if cfg.algorithm == "dpo":
        from trl import DPOTrainer

        pairs = ctx.input("pairs").path if cfg.pairs else None
        rows, _ = preference_rows(cfg.data, cfg.task, cfg.num_examples, ctx.seed, where, 0, pairs)
        columns = ("prompt", "chosen", "rejected")
        ref = None if cfg.adapter else load_for_trainer(source, args, what="reference model ")
        return DPOTrainer(
            model=model,
            **({} if ref is None else {"ref_model": ref}),
            args=args,
            train_dataset=dataset(rows, lambda r: {k: r[k] for k in columns}),
            processing_class=tokenizer,
            callbacks=[callback],
            **peft_config(cfg, model=model),  # with an adapter, the base is the reference
        )
    funcs: list[Any] = reward_functions(cfg.rewards, cfg.task, where)
    if cfg.reward_model:
        import torch

        from pipeline.stages.reward_models import ensemble_reward

        paths = [r.path for r in ctx.inputs("reward_model")]
        device = "cuda" if torch.cuda.is_available() else "cpu"
        funcs.append(ensemble_reward(paths, cfg.ensemble, cfg.ensemble_lambda, device))
    from trl.trainer import grpo_trainer, rloo_trainer

    grpo = cfg.algorithm == "grpo"
    with sharded_reference(grpo_trainer if grpo else rloo_trainer, source, args):
        return (grpo_trainer.GRPOTrainer if grpo else rloo_trainer.RLOOTrainer)(
            model=model,
            reward_funcs=funcs,
            args=args,
            train_dataset=dataset(prompt_rows(cfg, ctx.seed, where)),
            processing_class=tokenizer,
            callbacks=[callback],
            **peft_config(cfg, model=model),
        )
