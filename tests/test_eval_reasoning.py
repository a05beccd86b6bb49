"""Eval's honest averages and test-time compute: macro averages over subtasks with their
interval and paired test, maj@k and pass@k on known samples, thinking lengths, and the plan's
one-line errors for the new settings."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
from transformers import PreTrainedTokenizerBase

from data_prep.tasks import AdditionTask, ArithmeticTask, SortTask, task_problems
from eval.macro import macro_average, macro_interval, macro_paired_test
from eval.stats import Z_95, mcnemar, pass_at_k, wilson_interval
from eval.test_time import k_list, length_metrics, majority_vote, sampled_metrics, thinking_chars
from tests.helpers import run_in_process
from tests.test_bad_inputs import Case, assert_one_line, recipe
from tests.test_eval import data_dir, tiny_exports, tokenizer  # noqa: F401 (fixtures)
from tests.test_plan_checks import at, task_file

SORT = SortTask(min_length=3, max_length=4)


def test_majority_vote_counts_parsed_answers_and_breaks_ties_by_first_occurrence() -> None:
    assert majority_vote(["12", "7", "7", None, "12", "7"]) == 1  # "7" three times
    assert majority_vote(["12", "7", "7", "12"]) == 0  # 2-2 tie: "12" came first
    assert majority_vote([None, "5", None, None]) == 1  # unparseable samples do not vote
    assert majority_vote([None, None]) is None


def test_maj_and_pass_at_k_on_known_samples_equal_a_hand_count() -> None:
    problems = task_problems(SORT, "test", 4, seed=0)
    right = [p["answer"] for p in problems]
    wrong = [str(int(a) + 1) for a in right]
    drawn = [
        # 1: right once, then two wrong alike: maj@1 right, maj@2 tie -> first (right), maj@4 wrong
        [f" {right[0]}", f" {wrong[0]}", f" {wrong[0]}", " x"],
        # 2: no parseable answer before the 4th sample: maj@1, maj@2 wrong, maj@4 right
        [" no", " none", "", f" {right[1]}"],
        # 3: always right
        [f" {right[2]}"] * 4,
        # 4: never right
        [f" {wrong[3]}", " ?", f" {wrong[3]}", f" {wrong[3]}"],
    ]
    metrics = sampled_metrics(SORT, problems, drawn, [1, 2, 4])
    maj = {1: [1, 0, 1, 0], 2: [1, 0, 1, 0], 4: [0, 1, 1, 0]}
    hits = [1, 1, 4, 0]
    for k in (1, 2, 4):
        assert metrics[f"task_maj_at_{k}"] == sum(maj[k]) / 4, k
        expected = sum(pass_at_k(4, h, k) for h in hits) / 4
        assert metrics[f"task_pass_at_{k}"] == pytest.approx(expected), k
        for name in ("maj", "pass"):
            value = metrics[f"task_{name}_at_{k}"]
            assert (
                metrics[f"task_{name}_at_{k}_low"] <= value <= metrics[f"task_{name}_at_{k}_high"]
            )
    assert metrics["task_pass_at_1"] == pytest.approx(6 / 16)  # right samples over all samples
    assert metrics["task_pass_at_4"] == 3 / 4
    assert metrics["task_sampled_accuracy"] == 6 / 16
    assert (metrics["task_maj_at_2_low"], metrics["task_maj_at_2_high"]) == wilson_interval(2, 4)


def test_k_list_defaults_to_powers_of_two_up_to_the_samples_and_keeps_the_samples() -> None:
    assert k_list(8) == [1, 2, 4, 8]
    assert k_list(12) == [1, 2, 4, 8, 12]
    assert k_list(64) == [1, 2, 4, 8, 16, 32, 64]
    assert k_list(8, [4, 2, 4]) == [2, 4, 8]


def test_macro_average_equals_the_hand_value_and_its_interval_is_honest() -> None:
    # A large easy subtask (80 of 90) and a small hard one (5 of 10): micro 85%, macro 69.4%.
    correct = [True] * 80 + [False] * 10 + [True] * 5 + [False] * 5
    subtasks = ["5 digits"] * 90 + ["4 digits"] * 10
    macro = macro_average(correct, subtasks)
    assert macro["macro"] == pytest.approx((80 / 90 + 5 / 10) / 2)
    assert macro["subtasks"] == 2
    assert macro["low"] < macro["macro"] < macro["high"]
    micro_low, micro_high = wilson_interval(85, 100)
    # the small subtask weighs half: the macro average is far less precise than the micro one
    assert macro["high"] - macro["low"] > 1.5 * (micro_high - micro_low)
    # One subtask: Agresti and Coull's plus-four interval, by hand.
    p = (5 + 2) / (10 + 4)
    half = Z_95 * math.sqrt(p * (1 - p) / 14)
    assert macro_interval({"all": (5, 10)}) == pytest.approx((p - half, p + half))
    # A subtask all right keeps a width (the plain Wald interval would have none).
    low, high = macro_interval({"a": (30, 30), "b": (30, 30)})
    assert low < 0.97 and high == 1.0


def test_macro_interval_covers_the_true_macro_average_about_95_percent_of_the_time() -> None:
    rng = random.Random(0)
    truth = {"3 digits": (0.97, 12), "4 digits": (0.6, 40), "5 digits": (0.15, 150)}
    target = sum(p for p, _ in truth.values()) / len(truth)
    trials, covered = 2000, 0
    for _ in range(trials):
        counts = {s: (sum(rng.random() < p for _ in range(n)), n) for s, (p, n) in truth.items()}
        low, high = macro_interval(counts)
        covered += low <= target <= high
    assert 0.93 <= covered / trials <= 0.985


def test_macro_paired_test_is_mcnemar_for_one_subtask_and_weighs_subtasks_equally() -> None:
    first = [True] * 20 + [False] * 30 + [True] * 50
    second = [False] * 5 + [True] * 15 + [True] * 12 + [False] * 18 + [True] * 50
    one = macro_paired_test(first, second, ["all"] * 100)
    exact = mcnemar(first, second)
    assert (one["gained"], one["lost"], one["difference"]) == (12, 5, exact["difference"])
    assert one["p_value"] == pytest.approx(exact["p_value"], abs=0.005)
    # Micro: 10 gained in a subtask of 100 and 10 lost in one of 10 -> 0 points. Macro: the
    # small subtask lost everything, -45 points, and that is significant.
    first = [False] * 100 + [True] * 10
    second = [True] * 10 + [False] * 90 + [False] * 10
    subtasks = ["big"] * 100 + ["small"] * 10
    assert mcnemar(first, second)["difference"] == 0
    test = macro_paired_test(first, second, subtasks)
    assert test["difference"] == pytest.approx((10 / 100 - 10 / 10) / 2)
    assert test["p_value"] < 0.01
    assert macro_paired_test(first, first, subtasks)["p_value"] == 1.0


def test_thinking_length_counts_the_characters_inside_the_think_block() -> None:
    assert thinking_chars(" <think>3+4=7</think> 7") == 5
    assert thinking_chars(" <think>1 2 3") == 5  # never closed: still thinking when cut off
    assert thinking_chars(" 7") == 0
    assert thinking_chars("<think></think><think>ab</think>") == 0  # the first block
    cot = AdditionTask(format="cot")
    lengths = length_metrics(cot, [" <think>ab</think> 1", " 12"])
    assert lengths == {"task_completion_chars": (20 + 3) / 2, "task_thinking_chars": 1.0}
    assert "task_thinking_chars" not in length_metrics(SORT, [" 12"])


TINY_SORT = {"name": "sort", "min_length": 1, "max_length": 2}
SAMPLED = {"stages.eval.task_problems": 10, "stages.eval.pass_k_problems": 5}
# One case per line, as in tests/test_plan_checks.py.
# fmt: off
CASES = {
    "eval-k-over-samples": recipe("stages.eval.k_values", {**SAMPLED, "stages.eval.k_values": [1, 4, 16], "stages.eval.pass_k": 8}),
    "eval-k-below-one": recipe("stages.eval.k_values", {**SAMPLED, "stages.eval.k_values": [0, 2]}),
    "eval-k-without-sampled-problems": recipe("stages.eval.k_values", {"stages.eval.k_values": [1, 2], "stages.eval.task_problems": 10}),
    "eval-ood-of-a-jsonl-task": recipe("stages.eval.ood_problems", {"stages.eval.task_problems": 5, "stages.eval.ood_problems": 5}, files=at("stages.eval.task", task_file())),
    "eval-ood-problems-over-ood-split": recipe("stages.eval.ood_problems", {"stages.eval.task": TINY_SORT, "stages.eval.task_problems": 5, "stages.eval.ood_problems": 5000}),
}
# fmt: on


@pytest.mark.parametrize("case", [pytest.param(make(id), id=id) for id, make in CASES.items()])
def test_dry_run_refuses_a_bad_test_time_setting_in_one_line(
    case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    code, err = run_in_process(case.setup(tmp_path), capsys)
    assert_one_line(code, err, case, tmp_path)


def test_eval_stage_reports_macro_averages_k_curves_lengths_and_ood(
    tokenizer: PreTrainedTokenizerBase,  # noqa: F811
    tmp_path: Path,
) -> None:
    from eval.lm import Config, run
    from pipeline.engine.config import Recipe, TrackingConfig
    from pipeline.engine.context import StageContext
    from pipeline.engine.rundir import SUMMARY_FILE
    from pipeline.stages import pretrain

    run_dir = tmp_path / "run"
    tiny_exports(run_dir, tokenizer)
    task = {"name": "arithmetic", "max_operand": 9, "operators": ["+", "-"]}
    stages = {name: pretrain.Config(kind="pretrain", seq_len=16) for name in ("small", "other")}
    evaluate = Config(
        after=["small", "other"], models=["small", "other"], prompts=["1"], max_new_tokens=2,
        task=task, task_problems=12, pass_k=4, pass_k_problems=3, k_values=[2], ood_problems=4,
    )  # fmt: skip
    recipe = Recipe(
        name="tiny", run_dir=str(run_dir), tracking=TrackingConfig(mode="disabled"),
        stages={**stages, "eval": evaluate},
    )  # fmt: skip

    run(StageContext(run_dir=run_dir, name="eval", recipe=recipe))

    export = run_dir / "eval" / "export"
    evaluated = json.loads((export / "eval.json").read_text())
    outcomes = [json.loads(line) for line in (export / "task_outcomes.jsonl").open()]
    for name, m in evaluated["models"].items():
        correct = [r[name]["correct"] for r in outcomes]
        macro = macro_average(correct, [r["subtask"] for r in outcomes])
        assert m["task_macro_accuracy"] == macro["macro"] and m["task_subtasks"] == 2
        assert {"task_pass_at_2", "task_maj_at_2", "task_pass_at_4", "task_maj_at_4"} <= set(m)
        assert "task_maj_at_1" not in m  # k_values given: 2, and pass_k itself
        lengths = length_metrics(ArithmeticTask(**task), [r[name]["completion"] for r in outcomes])
        assert m["task_completion_chars"] == lengths["task_completion_chars"]
        assert "task_thinking_chars" not in m  # a direct task
        assert m["task_ood_problems"] == 4 and 0 <= m["task_ood_accuracy"] <= 1
        assert {"task_ood_accuracy/+", "task_ood_accuracy/-"} <= set(m)
    small = [r["small"]["correct"] for r in outcomes]
    other = [r["other"]["correct"] for r in outcomes]
    subtasks = [r["subtask"] for r in outcomes]
    assert evaluated["paired"]["other_vs_small"] == mcnemar(small, other)
    assert evaluated["paired_macro"]["other_vs_small"] == macro_paired_test(small, other, subtasks)
    sections = json.loads((export / "report.json").read_text())["sections"]
    assert [len(s["rows"]) for s in sections] == [2, 4, 2]  # models; models x k; models
    assert "macro" in sections[0]["columns"] and "ood_accuracy" in sections[2]["columns"]
    for image in ("task_accuracy.png", "task_accuracy_k.png"):
        assert (export / image).stat().st_size > 5000
    note = json.loads((run_dir / "eval" / SUMMARY_FILE).read_text())["note"]
    assert "| macro" in note.splitlines()[-1]


def test_rl_section_of_a_cot_task_adds_the_thinking_length_curve(tmp_path: Path) -> None:
    """R1's two curves: held-out accuracy and mean thinking length against RL steps, read from
    the periodic eval's rows; a direct task's section keeps its single panel and columns."""
    from PIL import Image

    from eval.task_plots import RL_CURVES_PNG, rl_section

    rows = [{"step": 0, "train/reward": 0.1, "train/reward_std": 0.2}] + [
        {"step": s, "eval/task_accuracy": a, "eval/task_thinking_chars": t}
        for s, a, t in ((0, 0.2, 50.0), (10, 0.4, 61.25), (20, 0.5, 70.0))
    ]
    section = rl_section(tmp_path, rows, "grpo")
    assert section["columns"] == ["step", "held-out accuracy", "thinking chars"]
    assert section["rows"] == [[0, 0.2, 50.0], [10, 0.4, 61.2], [20, 0.5, 70.0]]
    assert "thinking length" in section["note"]
    wide = Image.open(tmp_path / RL_CURVES_PNG).size
    direct = [{k: v for k, v in r.items() if k != "eval/task_thinking_chars"} for r in rows]
    section = rl_section(tmp_path, direct, "grpo")
    assert section["columns"] == ["step", "held-out accuracy"] and "thinking" not in section["note"]
    assert Image.open(tmp_path / RL_CURVES_PNG).size[0] < wide[0]  # one panel, not two


def test_sample_temperature_is_hashed_only_when_set() -> None:
    """A field added after runs existed (`fingerprint: when_set`) leaves their eval fingerprints
    as they were at its default, and a set value reruns the eval."""
    from pipeline.engine.config import validate_recipe
    from pipeline.engine.graph import _unhashed, fingerprints

    def plan(**eval_options: Any) -> Any:
        stages = {"eval": {"kind": "eval", "models": [{"path": "/nowhere"}], **eval_options}}
        return validate_recipe({"name": "t", "stages": stages})

    assert "sample_temperature" in _unhashed(plan().stages["eval"])
    assert "sample_temperature" not in _unhashed(plan(sample_temperature=0.7).stages["eval"])
    default = fingerprints(plan())["eval"]
    assert fingerprints(plan(sample_temperature=1.0))["eval"] == default
    assert fingerprints(plan(sample_temperature=0.7))["eval"] != default


def test_few_shot_row_scores_the_first_model_with_solved_training_problems_before_each_prompt(
    tokenizer: PreTrainedTokenizerBase,  # noqa: F811
    tmp_path: Path,
) -> None:
    from eval.families import load_model
    from eval.generation import generate
    from eval.lm import Config, run
    from eval.tasks import EVAL_SEED, answer_tokens, few_shot_prefix
    from pipeline.engine.config import Recipe, TrackingConfig
    from pipeline.engine.context import StageContext
    from pipeline.stages import pretrain

    task = AdditionTask(min_digits=1, max_digits=2, format="cot")
    prefix = few_shot_prefix(task, 3)
    shots = prefix.splitlines()
    test = {p["prompt"] for p in task_problems(task, "test", 200, EVAL_SEED)}
    assert len(shots) == 3 and all(
        "<think>" in s and s.split(":")[0] + ":" not in test for s in shots
    )

    run_dir = tmp_path / "run"
    tiny_exports(run_dir, tokenizer)
    evaluate = Config(
        after=["small"], models=["small"], prompts=["1"], max_new_tokens=2,
        task=task.model_dump(), task_problems=6, few_shot=3,
    )  # fmt: skip
    stages = {"small": pretrain.Config(kind="pretrain", seq_len=16), "eval": evaluate}
    recipe = Recipe(
        name="tiny", run_dir=str(run_dir), tracking=TrackingConfig(mode="disabled"), stages=stages
    )
    run(StageContext(run_dir=run_dir, name="eval", recipe=recipe))

    export = run_dir / "eval" / "export"
    assert list(json.loads((export / "eval.json").read_text())["models"]) == [
        "small",
        "small 3-shot",
    ]
    outcomes = [json.loads(line) for line in (export / "task_outcomes.jsonl").open()]
    model, tok = load_model(run_dir / "small" / "export", "cpu")
    problems = task_problems(task, "test", 6, EVAL_SEED)
    expected = generate(
        model, tok, [prefix + p["prompt"] for p in problems], answer_tokens(problems)
    )
    assert [r["small 3-shot"]["completion"] for r in outcomes] == [c[0] for c in expected]


@pytest.mark.parametrize(
    ("few_shot", "positions", "error"),
    [
        (3, 64, r"stages\.eval\.few_shot: a 3-shot prompt takes \d+ tokens, and gpt has 64 "
                r"positions; lower few_shot"),
        (0, 24, r"stages\.eval\.task: a prompt of \d+ tokens and \d+ tokens of answer room need "
                r"\d+ positions, and gpt has 24; use a task with shorter problems"),
    ],
)  # fmt: skip
def test_task_prompts_past_a_models_learned_positions_are_a_one_line_error(
    tokenizer: PreTrainedTokenizerBase,  # noqa: F811
    tmp_path: Path,
    few_shot: int,
    positions: int,
    error: str,
) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from eval.lm import Config, run
    from pipeline.engine.config import Recipe, TrackingConfig
    from pipeline.engine.context import StageContext
    from pipeline.engine.errors import PipelineError
    from pipeline.engine.manifest import write_manifest
    from pipeline.stages import pretrain

    run_dir = tmp_path / "run"
    export = run_dir / "gpt" / "export"
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=positions, n_embd=16, n_layer=1, n_head=2
    )
    GPT2LMHeadModel(config).save_pretrained(export)
    tokenizer.save_pretrained(export)
    write_manifest(run_dir / "gpt", {"stage": "gpt", "status": "done"})
    task = AdditionTask(min_digits=1, max_digits=2, format="cot").model_dump()
    evaluate = Config(after=["gpt"], models=["gpt"], prompts=["1"], max_new_tokens=2, task=task,
                      task_problems=6, few_shot=few_shot)  # fmt: skip
    stages = {"gpt": pretrain.Config(kind="pretrain", seq_len=16), "eval": evaluate}
    recipe = Recipe(
        name="tiny", run_dir=str(run_dir), tracking=TrackingConfig(mode="disabled"), stages=stages
    )
    with pytest.raises(PipelineError, match=error):
        run(StageContext(run_dir=run_dir, name="eval", recipe=recipe))
