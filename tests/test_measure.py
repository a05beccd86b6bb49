"""In-loop measurement (pipeline/train/measure.py): a stage's evaluators run at every validation
on the unwrapped model in eval mode without gradients, their metrics are logged as val/<name>
and kept in the summary; the pretrain stage's task and lm-eval evaluators score what the eval
stage scores on the export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.engine.config import validate_recipe
from pipeline.engine.context import StageContext
from pipeline.engine.runner import run_recipe
from pipeline.engine.tracking import read_metrics
from tests.helpers import tiny_recipe


def test_evaluators_run_in_eval_mode_at_every_validation(tmp_path: Path) -> None:
    import torch

    from pipeline.train.loop import Workload, train

    stage = {"kind": "pretrain", "max_steps": 6, "micro_batch_size": 4, "log_every": 1,
             "eval_every": 2, "checkpoint_every": 6, "schedule": {"warmup_steps": 0}}  # fmt: skip
    recipe = validate_recipe({"name": "measure", "run_dir": str(tmp_path),
                              "tracking": {"mode": "disabled"}, "stages": {"pretrain": stage}})  # fmt: skip
    ctx = StageContext(run_dir=tmp_path, name="pretrain", recipe=recipe, fingerprint="toy")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    seen: list[tuple[bool, bool]] = []

    def weight_norm(live: torch.nn.Module) -> dict[str, float]:
        seen.append((live.training, torch.is_grad_enabled()))
        assert live is model  # the unwrapped module, not an engine wrapper
        return {"weight_norm": float(live.weight.norm())}

    def batch(step: int, micro: int, rank: int, world: int) -> np.ndarray:
        return np.random.default_rng([step, micro]).normal(size=(4, 5)).astype(np.float32)

    def loss(m: torch.nn.Module, rows: torch.Tensor, generator: object) -> tuple:
        return ((m(rows[:, :4]) - rows[:, 4:]) ** 2).mean(), {}

    val = [np.ones((4, 5), dtype=np.float32)]
    work = Workload(model, loss, batch, lambda rank, world: val, "rows", [],
                    evaluators=[weight_norm])  # fmt: skip
    summary = train(ctx, ctx.config, work).summary  # type: ignore[arg-type]
    assert seen == [(False, False)] * 3  # after steps 2, 4 and 6
    rows = [r for r in read_metrics(tmp_path / "pretrain") if "val/weight_norm" in r]
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert len({r["val/weight_norm"] for r in rows}) == 3  # measured anew each time
    final = float(model.weight.detach().norm())
    assert summary["weight_norm"] == rows[-1]["val/weight_norm"] == final
    assert model.training  # back to training after each evaluation


def test_pretrain_task_eval_in_loop_matches_the_eval_stage_on_the_export(tmp_path: Path) -> None:
    data = tiny_recipe(tmp_path)
    sort = {"uri": "builtin:task", "task": {"name": "sort"}, "problems": 2000}
    data["stages"]["tokenizer"] |= {"source": sort, "vocab_size": 300, "sample_bytes": 100_000}
    data["stages"]["tokenize"] |= {"source": sort}
    data["stages"]["pretrain"] |= {"model": {"hidden_size": 64, "num_layers": 2, "num_heads": 2},
                                   "micro_batch_size": 16, "seq_len": 64, "max_steps": 120,
                                   "log_every": 20, "eval_every": 60, "optim": {"lr": 3e-3},
                                   "eval_task": {"name": "sort"}, "eval_task_problems": 16,
                                   "eval_lm_eval_tasks": ["task_choice"],
                                   "eval_lm_eval_limit": 12}  # fmt: skip
    data["stages"]["eval"] |= {"task": {"name": "sort"}, "task_problems": 16,
                               "lm_eval_tasks": ["task_choice"], "lm_eval_limit": 12}  # fmt: skip
    run_recipe(validate_recipe(data))
    rows = [r for r in read_metrics(tmp_path / "pretrain") if "val/task_accuracy" in r]
    assert [r["step"] for r in rows] == [60, 120]
    pretrain = json.loads((tmp_path / "pretrain" / "stage.json").read_text())["summary"]
    evaluated = json.loads((tmp_path / "eval" / "stage.json").read_text())["summary"]
    # Trained on sort problems, the model answers with digits by step 120 (not yet sorted
    # right, nor followed by the end of text: accuracy and format rate may still be 0) ...
    assert pretrain["task_answer_rate"] > 0.5 and pretrain["task_partial_credit"] > 0.1
    # ... and the live model and its export, loaded by transformers, answer the same 16
    # held-out problems alike.
    for key in ("task_accuracy", "task_format_rate", "task_answer_rate", "task_partial_credit"):
        assert pretrain[key] == rows[-1][f"val/{key}"] == evaluated[key], key
    # lm-eval on the live model (HFLM around it) scores what it scores on the export.
    choice = "lm_eval/task_choice/acc"
    assert pretrain[choice] == rows[-1][f"val/{choice}"] == evaluated[choice]
