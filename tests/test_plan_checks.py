"""Mistakes a plan can know, refused by `run --dry-run` in one line naming the field.

Each case makes one mistake in the valid LM recipe of test_bad_inputs (every LM stage kind):
a file a stage opens only when it starts, a name only the code that uses it checks, or a setting
that conflicts with another setting, another stage or the launch. Each would otherwise surface
at run time, often after hours of upstream work.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import run_in_process
from tests.test_bad_inputs import (
    Case,
    assert_one_line,
    assert_run_stops_before_any_stage,
    file,
    recipe,
)

Files = Callable[[Path], dict[str, Any]]


def task_file(*, rejected: bool = True, answer: Callable[[int], str] = str) -> Files:
    """A JSONL task of 400 problems (with or without `rejected`), as `task:` of a stage."""

    def rows(tmp: Path) -> str:
        lines = [
            {"prompt": f"Q{i}?", "answer": answer(i), **({"rejected": "x"} if rejected else {})}
            for i in range(400)
        ]
        return str(file(tmp, "task.jsonl", "".join(json.dumps(r) + "\n" for r in lines).encode()))

    return lambda tmp: {"name": "jsonl", "path": rows(tmp)}


def at(key: str, value: Callable[[Path], Any]) -> Files:
    """`files` setting `key` to what `value` makes in the test's folder."""
    return lambda tmp: {key: value(tmp)}


def jsonl(name: str, *rows: dict[str, Any]) -> Callable[[Path], str]:
    return lambda tmp: str(file(tmp, name, "".join(json.dumps(r) + "\n" for r in rows).encode()))


def text(name: str, content: str) -> Callable[[Path], str]:
    return lambda tmp: str(file(tmp, name, content.encode()))


def missing(name: str) -> Callable[[Path], str]:
    return lambda tmp: str(tmp / name)


TINY_SORT = {"name": "sort", "min_length": 1, "max_length": 2}  # 110 problems, ~11 held out
NOT_NUMBERS = task_file(answer=lambda i: f"a{i}")
# One case per line: `ruff format` would spread the table over three times the lines.
# fmt: off
CASES = {
    # files a stage opens only when it starts
    "tokenizer-task-file-missing": recipe("stages.tokenizer.source.0.task", {}, files=at("stages.tokenizer.source", lambda t: {"uri": "builtin:task", "task": {"name": "jsonl", "path": str(t / "no.jsonl")}})),
    "tokenizer-task-answers-not-numbers": recipe("stages.tokenizer.source.0.task", {}, files=at("stages.tokenizer.source", lambda t: {"uri": "builtin:task", "task": {**NOT_NUMBERS(t), "scorer": "numeric"}})),
    "tokenize-task-file-missing": recipe("stages.tokenize.source.0.task", {}, files=at("stages.tokenize.source", lambda t: {"uri": "builtin:task", "task": {"name": "jsonl", "path": str(t / "no.jsonl")}})),
    "pretrain-eval-task-file-missing": recipe("stages.pretrain.eval_task: task", {}, files=at("stages.pretrain.eval_task", lambda t: {"name": "jsonl", "path": str(t / "no.jsonl")})),
    "sft-data-missing": recipe("stages.sft.data: ", {}, files=at("stages.sft.data", missing("chat.jsonl"))),
    "sft-data-rows-of-another-format": recipe("stages.sft.data: ", {}, files=at("stages.sft.data", jsonl("rows.jsonl", {"text": "x"}))),
    "sft-chat-template-not-jinja": recipe("stages.sft.chat_template", {}, files=at("stages.sft.chat_template", text("t.jinja", "{% for m in messages %}{{ m['content'] }"))),
    "reward-data-rows-without-pairs": recipe("stages.reward.data: ", {}, files=at("stages.reward.data", jsonl("p.jsonl", {"prompt": "x", "completion": "y"}))),
    "reward-task-without-rejected": recipe("stages.reward.task", {"stages.reward.num_examples": 20, "stages.reward.eval_pairs": 5}, files=at("stages.reward.task", task_file(rejected=False))),
    "grpo-prompts-without-answers": recipe("stages.rlhf.data: ", {}, files=at("stages.rlhf.data", jsonl("p.jsonl", {"prompt": "What is 1 + 1?"}))),
    "dpo-data-rows-without-pairs": recipe("stages.rlhf.data: ", {"stages.rlhf.algorithm": "dpo"}, files=at("stages.rlhf.data", jsonl("p.jsonl", {"prompt": "x"}))),
    "dpo-task-without-rejected": recipe("stages.rlhf.task", {"stages.rlhf.algorithm": "dpo", "stages.rlhf.num_examples": 20, "stages.rlhf.eval_problems": 5}, files=at("stages.rlhf.task", task_file(rejected=False))),
    "rloo-chat-template-not-jinja": recipe("stages.rlhf.chat_template", {"stages.rlhf.algorithm": "rloo"}, files=at("stages.rlhf.chat_template", text("t.jinja", "{% if %}"))),
    "eval-task-file-missing": recipe("stages.eval.task", {}, files=at("stages.eval.task", lambda t: {"name": "jsonl", "path": str(t / "no.jsonl")})),
    "eval-task-choice-without-rejected": recipe("stages.eval.lm_eval_tasks", {"stages.eval.lm_eval_tasks": ["task_choice"], "stages.eval.lm_eval_limit": 5}, files=at("stages.eval.task", task_file(rejected=False))),
    "ds-micro-batch-disagrees": recipe("stages.pretrain: launch.deepspeed_config", {}, files=at("stages.pretrain.launch", lambda t: {"engine": "deepspeed", "deepspeed_config": text("ds.json", '{"train_micro_batch_size_per_gpu": 3}')(t)})),
    # names only the code that uses them checks
    "grpo-reward-function-misspelt": recipe("stages.rlhf.rewards.0", {"stages.rlhf.rewards": ["tests.helpers:completion_lenght_reward"]}),
    "compare-kind-misspelt": recipe("stages.compare.kinds", {"stages.compare.kinds": ["pretrian"]}),
    "scaling-kind-misspelt": recipe("stages.scaling.kinds", {"stages.scaling.kinds": ["pretrain", "sfft"]}),
    "tracking-project-with-slash": recipe("tracking.project", {"tracking.mode": "offline", "tracking.project": "team/pretrain"}),
    # settings that conflict with another setting, another stage or the launch
    "sft-num-examples-over-train-split": recipe("stages.sft.num_examples", {"stages.sft.task": TINY_SORT, "stages.sft.num_examples": 500, "stages.sft.eval_problems": 5}),
    "sft-guard-problems-over-train-split": recipe("stages.sft.guard.problems", {"stages.sft.task": TINY_SORT, "stages.sft.num_examples": 50, "stages.sft.eval_problems": 5, "stages.sft.guard": {"problems": 60}}),
    "sft-guard-on-jsonl-data": recipe("stages.sft", {"stages.sft.data": "rows.jsonl", "stages.sft.guard": {"every": 5}}),
    "sft-eval-problems-over-test-split": recipe("stages.sft.eval_problems", {"stages.sft.task": TINY_SORT, "stages.sft.num_examples": 50}),
    "reward-eval-pairs-over-test-split": recipe("stages.reward.eval_pairs", {"stages.reward.task": TINY_SORT, "stages.reward.num_examples": 50}),
    "grpo-generation-batch": recipe("stages.rlhf", {"stages.rlhf.micro_batch_size": 3, "stages.rlhf.num_generations": 2}),
    "grpo-sync-ref-without-kl": recipe("stages.rlhf.sync_ref_model", {"stages.rlhf.sync_ref_model": True}),
    "rloo-loss-type": recipe("stages.rlhf.loss_type", {"stages.rlhf.algorithm": "rloo", "stages.rlhf.loss_type": "dr_grpo"}),
    "rloo-sync-ref-with-adapter": recipe("stages.rlhf.sync_ref_model", {"stages.rlhf.algorithm": "rloo", "stages.rlhf.sync_ref_model": True, "stages.rlhf.adapter": {"kind": "lora"}}),
    "dpo-from-a-reward-model": recipe("stages.rlhf.model", {"stages.rlhf.algorithm": "dpo", "stages.rlhf.model": "reward"}),
    "dpo-with-reward-model": recipe("stages.rlhf.reward_model", {"stages.rlhf.algorithm": "dpo", "stages.rlhf.reward_model": "reward"}),
    "grpo-vllm-rollouts-without-cuda": recipe("stages.rlhf.rollouts: TRL's vLLM rollouts need a CUDA GPU", {"stages.rlhf.rollouts": {"engine": "vllm"}}),
    "grpo-vllm-server-without-url": recipe("stages.rlhf.rollouts.server_base_url", {"stages.rlhf.rollouts": {"engine": "vllm", "mode": "server"}}),
    "dpo-vllm-rollouts": recipe("stages.rlhf.rollouts", {"stages.rlhf.algorithm": "dpo", "stages.rlhf.rollouts": {"engine": "vllm"}}),
    "eval-vllm-python-missing": recipe("stages.eval.generation.python", {"stages.eval.task_problems": 10, "stages.eval.generation": {"engine": "vllm", "python": "/nonexistent/bin/python"}}),
    "sft-vllm-in-loop-on-two-processes": recipe("stages.sft.generation: engine vllm evaluates a model in training from one process", {"stages.sft.eval_every": 1, "stages.sft.launch": {"nproc": 2}, "stages.sft.generation": {"engine": "vllm"}}),
    "rlhf-vllm-generation-python-missing": recipe("stages.rlhf.generation.python", {"stages.rlhf.generation": {"engine": "vllm", "python": "/nonexistent/bin/python"}}),
    "pretrain-vllm-eval-task-on-two-processes": recipe("stages.pretrain.eval_generation", {"stages.pretrain.eval_task": {"name": "sort"}, "stages.pretrain.launch": {"nproc": 2}, "stages.pretrain.eval_generation": {"engine": "vllm"}}),
    "pretrain-eval-task-problems-over-test-split": recipe("stages.pretrain.eval_task_problems", {"stages.pretrain.eval_task": TINY_SORT, "stages.pretrain.eval_task_problems": 100}),
    "pretrain-on-tokens-without-val-split": recipe("stages.pretrain: validates on the val split", {"stages.tokenize.val_fraction": 0, "stages.eval.after": ["tokens_val", "pretrain"], "stages.pretrain_wide.after": ["tokens_val"], "stages.tokens_val": {"kind": "tokenize", "after": ["tokenizer"], "source": "builtin:python-stdlib"}}),
    "local-run-on-two-nodes": recipe("launch.nnodes", {"stages.pretrain.launch": {"nnodes": 2}}),
    "eval-task-problems-over-test-split": recipe("stages.eval.task_problems", {"stages.eval.task": TINY_SORT, "stages.eval.task_problems": 100}),
    "eval-pass-k-problems-over-task-problems": recipe("stages.eval.pass_k_problems", {"stages.eval.task_problems": 10, "stages.eval.pass_k_problems": 50}),
    "sft-max-length-over-learned-positions": recipe("stages.sft.max_length", {"stages.pretrain.model.arch": "gpt2", "stages.sft.max_length": 128}),
    "eval-seq-len-over-learned-positions": recipe("stages.eval.seq_len", {"stages.pretrain.model.arch": "gpt2", "stages.sft.max_length": 32, "stages.eval.seq_len": 64}),
    "eval-tokens-without-val-split": recipe("stages.eval", {"stages.eval.after": ["tokens_noval", "pretrain"], "stages.tokens_noval": {"kind": "tokenize", "after": ["tokenizer"], "source": "builtin:python-stdlib", "val_fraction": 0}}),
    "report-before-an-evaluation": recipe("stages.report.after", {"stages.report.after": ["compare", "scaling"]}),
    "compare-no-stage-of-its-kinds": recipe("stages.compare.after", {"stages.compare.after": ["tokenize"]}),
    "scaling-one-size": recipe("stages.scaling.after", {"stages.scaling.after": ["pretrain"]}),
    "tracking-online-without-key": recipe("tracking.mode", {"tracking.mode": "online"}),
    "slurm-signal-after-time-limit": recipe("slurm.signal_seconds", {"slurm.time": "00:01:00"}),
    "slurm-fewer-gpus-than-processes": recipe("stages.pretrain.launch.nproc", {"slurm.gpus_per_node": 2, "stages.pretrain.launch": {"nproc": 4}}),
}
# lm-eval indexes its ~15,000 task files before it can tell a name it does not know (10-20 s).
SLOW_CASES = {
    "eval-lm-eval-task-unknown": recipe("stages.eval.lm_eval_tasks", {"stages.eval.lm_eval_tasks": ["task_gen", "hellaswagg"]}),
}
# fmt: on


def params() -> list[Any]:
    fast = [pytest.param(make(id), id=id) for id, make in CASES.items()]
    slow = [
        pytest.param(make(id), id=id, marks=pytest.mark.slow) for id, make in SLOW_CASES.items()
    ]
    return fast + slow


@pytest.fixture(autouse=True)
def no_wandb_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No W&B key in the environment or in a ~/.netrc (HOME is the test's folder)."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))


@pytest.mark.parametrize("case", params())
def test_dry_run_refuses_in_one_line_naming_the_field(
    case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, err = run_in_process(case.setup(tmp_path), capsys)
    assert_one_line(code, err, case, tmp_path)


@pytest.mark.parametrize("case", [pytest.param(make(id), id=id) for id, make in CASES.items()])
def test_run_stops_on_the_same_line_before_any_stage(
    case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`run` makes the dry run's checks before it starts anything."""
    monkeypatch.chdir(tmp_path)
    assert_run_stops_before_any_stage(case, tmp_path, capsys)


def test_table_spreads_over_the_llm_stage_kinds_and_sections() -> None:
    ids = [*CASES, *SLOW_CASES]
    assert len(ids) >= 25
    wanted = {"tokenizer", "tokenize", "pretrain", "sft", "reward", "grpo", "rloo", "dpo", "eval",
              "report", "compare", "scaling", "tracking", "slurm", "ds"}  # fmt: skip
    assert wanted <= {i.split("-")[0] for i in ids}
