"""The preferences stage: pairing by a judge, the user's labels, reward-model scoring, and the
plan's refusals (end-to-end rounds on a trained policy are in tests/test_posttrain_grpo.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, get_args

import pytest

from pipeline.engine.errors import PipelineError
from pipeline.stages.dpo_losses import DpoLoss, dpo_losses
from pipeline.stages.preferences import best_and_each, best_and_worst, label_rows, with_prior
from pipeline.stages.reward_models import combine, reward_scores
from tests.helpers import run_in_process, write_recipe


def test_the_best_is_paired_with_the_worst_and_ties_give_no_pair() -> None:
    assert best_and_worst(["a", "b", "c"], [(0.0, 0.5), (1.0, 1.0), (0.0, 0.2)]) == (1, 2)
    assert best_and_worst(["a", "b"], [(1.0, 1.0), (1.0, 1.0)]) is None
    assert best_and_worst(["a", "b", "c"], [(1.0,), (0.0,), (1.0,)]) == (0, 1)  # first of equals


def test_best_vs_each_pairs_the_best_with_every_distinct_lower_text_worst_first() -> None:
    texts = ["x", "y", "x", "z", "y", "w"]
    scores = [(0.0, 0.5), (1.0, 1.0), (0.0, 0.5), (0.0, 0.9), (1.0, 1.0), (0.0, 0.1)]
    assert best_and_each(texts, scores) == [(1, 5), (1, 0), (1, 3)]  # one pair per distinct text
    assert best_and_each(["a", "a"], [(1.0,), (1.0,)]) == []
    one = best_and_worst(texts, scores)
    assert best_and_each(texts, scores)[0] == one  # its first pair is best_vs_worst's


def test_the_prior_lets_the_answer_the_policy_gives_most_win_what_the_reward_cannot_split() -> None:
    import math

    texts = [" 12", " 12", " 12", " 21", " 11", " 12"]
    rewards = [1.0, 1.2, 0.8, 1.3, -2.0, 1.0]  # copies of one text score a little apart
    assert with_prior(rewards, texts, None) == [(r,) for r in rewards]
    scored = with_prior(rewards, texts, 1.0)
    assert scored[0] == pytest.approx((1.0 + math.log(4 / 6), 1.0))  # mean of its 4 copies
    assert scored[3] == pytest.approx((1.3 + math.log(1 / 6), 1.3))
    assert best_and_worst(texts, scored) == (0, 4)  # the reward alone picks " 21"
    assert best_and_worst(texts, with_prior(rewards, texts, 0.1)) == (3, 4)  # small beta: reward


def write_rows(path: Path, rows: list[Any]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_labels_take_text_or_messages(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "p.jsonl", [
        {"prompt": "2+2=", "chosen": " 4", "rejected": " 5"},
        {"prompt": [{"role": "user", "content": "hi"}],
         "chosen": [{"role": "assistant", "content": "hello"}],
         "rejected": [{"role": "assistant", "content": "go away"}]},
        {"chosen": "yes", "rejected": "no"},
    ])  # fmt: skip
    assert label_rows(path, "stages.p") == [
        {"prompt": "2+2=", "chosen": " 4", "rejected": " 5"},
        {"prompt": "hi", "chosen": "hello", "rejected": "go away"},
        {"prompt": "", "chosen": "yes", "rejected": "no"},
    ]


@pytest.mark.parametrize(
    "bad, line",
    [({"chosen": 4, "rejected": "5"}, 2), ({"prompt": "x", "chosen": "y"}, 2)],
)
def test_a_bad_label_row_is_one_line_naming_it(tmp_path: Path, bad: dict, line: int) -> None:
    path = write_rows(tmp_path / "p.jsonl", [{"chosen": "a", "rejected": "b"}, bad])
    with pytest.raises(PipelineError) as err:
        label_rows(path, "stages.prefs")
    message = str(err.value)
    assert "\n" not in message and f"line {line}" in message and "stages.prefs" in message


def test_batched_reward_scores_equal_scoring_one_text_at_a_time(gpt2_dir: Path) -> None:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2, num_labels=1,
                        pad_token_id=tokenizer.eos_token_id)  # fmt: skip
    model = GPT2ForSequenceClassification(config).eval()
    texts = ["a", "a longer text here", "x = 1\n", "tokens merge"]
    batched = reward_scores(model, tokenizer, texts, batch_size=3)
    alone = [reward_scores(model, tokenizer, [t])[0] for t in texts]
    assert batched == pytest.approx(alone, abs=1e-5)
    assert len(set(batched)) == len(texts)


def test_ensembles_combine_as_computed_by_hand() -> None:
    scores = [[1.0, 0.0, 2.0], [3.0, 0.0, -2.0]]  # two members, three completions
    assert combine(scores, "mean") == [2.0, 0.0, 0.0]
    assert combine(scores, "min") == [1.0, 0.0, -2.0]
    assert combine(scores, "mean_minus_std", lam=0.5) == [1.5, 0.0, -1.0]
    assert combine([[1.0, 2.0]], "mean_minus_std") == [1.0, 2.0]  # one member: no spread


def recipe(tmp_path: Path, stage: dict[str, Any]) -> Path:
    return write_recipe(tmp_path / "r.yaml", {
        "name": "prefs", "run_dir": str(tmp_path / "run"), "tracking": {"mode": "disabled"},
        "stages": {"prefs": {"kind": "preferences", **stage}},
    })  # fmt: skip


@pytest.mark.parametrize(
    "stage, names",
    [
        ({"judge": "task"}, "stages.prefs.model"),
        ({"judge": "reward_model", "model": {"path": "/nonexistent"}}, "stages.prefs"),
        ({"judge": "labels", "labels": "/nonexistent/pairs.jsonl"}, "/nonexistent/pairs.jsonl"),
        ({"judge": "task", "labels": "x.jsonl", "model": {"path": "/x"}}, "stages.prefs"),
        ({"judge": "reward_model", "reward_model": "prefs"}, "stages.prefs"),
        ({"judge": "task", "beta": 1.0, "model": {"path": "/x"}}, "stages.prefs"),
    ],
)
def test_dry_run_refuses_in_one_line(
    stage: dict[str, Any], names: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_in_process(["run", "--dry-run", str(recipe(tmp_path, stage))], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, f"exit {code}:\n{err}"
    assert lines[0].startswith("error: ") and names in lines[0], lines[0]


def test_labels_are_checked_line_by_line_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_rows(tmp_path / "p.jsonl", [{"chosen": "a", "rejected": "b"}, {"chosen": "a"}])
    code, err = run_in_process(
        ["run", "--dry-run", str(recipe(tmp_path, {"judge": "labels", "labels": path}))], capsys
    )
    assert code == 2 and "line 2" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("loss", get_args(DpoLoss))
@pytest.mark.parametrize("sft_weight", [0.0, 0.5])
def test_every_dpo_loss_is_one_trl_runs(loss: str, sft_weight: float, tmp_path: Path) -> None:
    """Each offered loss gives a DPOConfig TRL accepts, with the NLL term added by weight;
    plain sigmoid DPO keeps TRL's defaults (runs from before the option are unchanged)."""
    from trl import DPOConfig

    from pipeline.engine.config import validate_recipe

    recipe = validate_recipe({"name": "d", "stages": {"dpo": {
        "kind": "rlhf", "algorithm": "dpo", "model": {"path": str(tmp_path)},
        "dpo_loss": loss, "dpo_sft_weight": sft_weight}}})  # fmt: skip
    fields = dpo_losses(recipe.stages["dpo"])
    config = DPOConfig(output_dir=str(tmp_path), use_cpu=True, **fields)
    expected = [loss, "sft"] if sft_weight else [loss]
    assert config.loss_type == expected
    assert config.loss_weights == ([1.0, sft_weight] if sft_weight else None)
    assert (fields == {}) == (loss == "sigmoid" and not sft_weight)


def test_dpo_loss_is_refused_for_grpo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_recipe(tmp_path / "r.yaml", {
        "name": "d", "run_dir": str(tmp_path / "run"), "tracking": {"mode": "disabled"},
        "stages": {"g": {"kind": "rlhf", "model": {"path": str(tmp_path)}, "dpo_loss": "ipo"}},
    })  # fmt: skip
    code, err = run_in_process(["run", "--dry-run", str(path)], capsys)
    assert code == 2 and "dpo_loss" in err and len(err.strip().splitlines()) == 1, err


def test_the_judge_ensemble_scores_as_its_members_combined(gpt2_dir: Path, tmp_path: Path) -> None:
    """The preferences judge (and the rlhf reward) with two saved reward models equals each
    member's scores combined by hand; one member gives exactly that member's scores."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    from pipeline.stages.reward_models import ensemble_reward

    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    dirs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2,
                            num_labels=1, pad_token_id=tokenizer.eos_token_id)  # fmt: skip
        dirs.append(tmp_path / f"rm{seed}")
        GPT2ForSequenceClassification(config).save_pretrained(dirs[-1])
        tokenizer.save_pretrained(dirs[-1])
    prompts, completions = ["Sort 31:", "Sort 31:", "Sort 502:"], [" 13", " 31", " 025"]
    texts = [p + c for p, c in zip(prompts, completions, strict=True)]
    members = []
    for path in dirs:
        model = GPT2ForSequenceClassification.from_pretrained(path).eval()
        members.append(reward_scores(model, tokenizer, texts))
    assert members[0] != members[1]
    for how in ("mean", "min", "mean_minus_std"):
        got = ensemble_reward(dirs, how, 0.5, "cpu")(prompts, completions)
        assert got == pytest.approx(combine(members, how, 0.5), abs=1e-6)
    assert ensemble_reward(dirs[:1], "mean", 1.0, "cpu")(prompts, completions) == members[0]
