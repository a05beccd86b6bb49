"""Post-training: SFT masking and loss, reward model ranking, DPO margins, GRPO rewards, rewards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import PipelineError
from pipeline.rewards import (
    answer_format,
    arithmetic_close,
    arithmetic_exact,
    parse_answer,
    reward_functions,
)
from pipeline.tracking import read_metrics
from tests.conftest import cli, tiny_recipe, write_recipe

# A preference a tiny model learns in a few steps: a number is preferred over a word.
WORDS = ("apple", "blue", "maybe", "river", "seven", "none")


def series(stage_dir: Path, key: str) -> list[float]:
    """Every logged value of `train/<key>` in a stage's metrics.jsonl, in step order."""
    return [row[f"train/{key}"] for row in read_metrics(stage_dir) if f"train/{key}" in row]


def summary(stage_dir: Path) -> dict[str, Any]:
    return json.loads((stage_dir / "stage.json").read_text())["summary"]


def format_pairs(path: Path, num: int) -> Path:
    """JSONL preference pairs: a bare number chosen, a word rejected."""
    rows = [
        {
            "prompt": f"What is {i} + {i % 7}?",
            "chosen": f" {i + i % 7}",
            "rejected": f" {WORDS[i % 6]}",
        }
        for i in range(num)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def posttrain_recipe(root: Path) -> dict[str, Any]:
    """tiny pretrain -> sft (arithmetic) -> reward (JSONL pairs) and dpo -> eval, one process."""
    recipe = tiny_recipe(root / "run")
    recipe["stages"]["pretrain"]["max_steps"] = 20
    common = {"micro_batch_size": 8, "log_every": 1, "checkpoint_every": 1000}
    pairs = str(format_pairs(root / "pairs.jsonl", 300))
    recipe["stages"] |= {
        "sft": {"kind": "sft", "after": ["pretrain"], "max_steps": 30, "num_examples": 240,
                "lr": 3e-3, "eval_problems": 20, **common},
        "reward": {"kind": "reward", "after": ["pretrain"], "data": pairs, "max_steps": 30,
                   "lr": 1e-3, "eval_pairs": 30, **common},
        "dpo": {"kind": "rlhf", "algorithm": "dpo", "after": ["sft"], "data": pairs,
                "max_steps": 12, "num_examples": 96, "lr": 3e-3, "beta": 0.1, "eval_problems": 0,
                **common},
    }  # fmt: skip
    recipe["stages"]["eval"] |= {
        "after": ["sft", "dpo"],
        "models": ["pretrain", "sft", "dpo"],
        "arithmetic_problems": 10,
    }
    return recipe


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run directory of `posttrain_recipe`, run once for the module."""
    root = tmp_path_factory.mktemp("posttrain")
    result = cli("run", str(write_recipe(root / "recipe.yaml", posttrain_recipe(root))))
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run"


def test_rewards_score_known_strings() -> None:
    answers = [12, 12, 12, 12, 12, -3, 7, 7, 7]
    completions: list[Any] = [
        " 12",
        "12\n",
        " 12 apples",
        " 13",
        "",
        " -3",
        None,
        [{"content": " 7"}],
        "x7",
    ]
    assert arithmetic_exact([""] * 9, completions, answer=answers) == [1, 1, 1, 0, 0, 1, 0, 1, 0]
    assert answer_format([""] * 9, completions) == [1, 1, 0, 1, 0, 1, 0, 1, 0]
    assert arithmetic_exact(["p"], [" 5"], answer=["five"]) == [0.0]
    close = arithmetic_close([""] * 9, completions, answer=answers)
    assert close == [1, 1, 1, 0.5, 0, 1, 0, 1, 0]
    assert arithmetic_close(["p", "p"], [" 9", " 3"], answer=[10, 10]) == [0.5, 0.125]
    assert parse_answer("  -42 is it") == -42 and parse_answer("forty") is None
    with pytest.raises(PipelineError, match="unknown reward function 'exact'"):
        reward_functions(["exact"], "stages.rlhf")


def test_sft_loss_falls_and_exports(run_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    losses = series(run_dir / "sft", "loss")
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    export = run_dir / "sft" / "export"
    model = AutoModelForCausalLM.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert model.config.model_type == "llama" and "{% generation %}" in tokenizer.chat_template
    assert 0 <= summary(run_dir / "sft")["arithmetic_accuracy"] <= 1


@pytest.mark.parametrize("conversational", [False, True])
def test_sft_loss_is_on_completions_only(
    run_dir: Path, tmp_path: Path, conversational: bool
) -> None:
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from pipeline.posttrain import dataset, load_tokenizer

    export = run_dir / "pretrain" / "export"
    tokenizer = load_tokenizer(export)
    prompt, completion = "What is 2 + 3?", " 5"
    row: dict[str, Any] = {"prompt": prompt, "completion": completion}
    if conversational:
        row = {
            "messages": [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": completion},
            ]
        }
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(export),
        args=SFTConfig(output_dir=str(tmp_path), report_to="none", per_device_train_batch_size=2,
                       assistant_only_loss=conversational, use_cpu=True),
        train_dataset=dataset([row, row]),
        processing_class=tokenizer,
    )  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    trained = [t for t, label in zip(ids, labels, strict=True) if label != -100]
    # Only the answer and its end-of-text token carry loss, not the prompt (nor chat roles).
    assert tokenizer.decode(trained).strip() == "5</s>" and trained[-1] == tokenizer.eos_token_id
    assert len(ids) > len(trained) + 3


def test_reward_model_ranks_held_out_pairs(run_dir: Path) -> None:
    scored = summary(run_dir / "reward")
    assert scored["pairwise_accuracy"] >= 0.8 and scored["reward_margin"] > 0


def test_dpo_raises_margin(run_dir: Path) -> None:
    margins = series(run_dir / "dpo", "rewards/margins")
    assert len(margins) == 12 and margins[0] == pytest.approx(0, abs=1e-3)
    assert sum(margins[-3:]) / 3 > 0.05


def test_eval_reports_accuracy_per_model(run_dir: Path) -> None:
    results = json.loads((run_dir / "eval" / "export" / "eval.json").read_text())["models"]
    assert list(results) == ["pretrain", "sft", "dpo"]
    assert all(
        0 <= m["arithmetic_accuracy"] <= 1 and m["arithmetic_problems"] == 10
        for m in results.values()
    )


def test_changing_an_rlhf_option_reruns_rlhf_and_eval_only(run_dir: Path) -> None:
    from pipeline.config import load_recipe
    from pipeline.graph import plan

    path = run_dir.parent / "recipe.yaml"
    assert not [step.name for step in plan(load_recipe(path)) if step.run]
    changed = load_recipe(path, ["stages.dpo.beta=0.3"])
    assert [step.name for step in plan(changed) if step.run] == ["dpo", "eval"]
    changed = load_recipe(path, ["stages.sft.lr=0.002"])
    assert [step.name for step in plan(changed) if step.run] == ["sft", "dpo", "eval"]


@pytest.mark.slow
def test_grpo_two_processes_raises_reward(run_dir: Path) -> None:
    recipe = posttrain_recipe(run_dir.parent)
    recipe["stages"]["grpo"] = {
        "kind": "rlhf", "after": ["sft"], "algorithm": "grpo", "rewards": ["answer_format"],
        "max_steps": 12, "num_examples": 96, "micro_batch_size": 16, "num_generations": 8,
        "max_completion_length": 2, "lr": 1e-2, "log_every": 1, "eval_problems": 0,
        "launch": {"nproc": 2},
    }  # fmt: skip
    path = write_recipe(run_dir.parent / "grpo.yaml", recipe)
    result = cli("run", str(path), "--only", "grpo")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "grpo" / "logs" / "rank1.log").is_file()
    rewards = series(run_dir / "grpo", "reward")
    # Two-token completions that are bare integers: the policy learns to answer with digits.
    assert len(rewards) == 12 and sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1
    for key in ("reward_std", "frac_reward_zero_std", "completions/mean_length"):
        assert len(series(run_dir / "grpo", key)) == 12
    assert {"reward_mean", "frac_reward_zero_std", "completion_length"} <= set(
        summary(run_dir / "grpo")
    )


def test_lm_eval_runs_shipped_tasks_on_an_export(run_dir: Path, tmp_path: Path) -> None:
    from eval.harness import run_harness

    results = run_harness(
        run_dir / "sft" / "export", ["arithmetic_gen", "arithmetic_choice"], tmp_path, num=8
    )
    # Exact match of generated answers and log-likelihood choice accuracy, as fractions.
    assert 0 <= results["arithmetic_gen/exact_match"] <= 1
    assert 0 <= results["arithmetic_choice/acc"] <= 1
    rows = (tmp_path / "arithmetic_choice.jsonl").read_text().splitlines()
    assert len(rows) == 8 and "choices" in json.loads(rows[0])
