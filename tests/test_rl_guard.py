"""The reward-hacking guard's decisions, its state across a resume, the KL estimate and the
adaptive KL coefficient (pipeline/stages/rl_guard.py); the guard in a real GRPO run is in
tests/test_posttrain_grpo.py."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from pipeline.stages.kl_control import KLControl, next_beta
from pipeline.stages.rl_gold import sequence_kl
from pipeline.stages.rl_guard import (
    Guard,
    GuardConfig,
    Measurement,
    restore,
    trainable_state,
)


def fed(guard: Guard, golds: list[float], every: int = 10) -> int | None:
    """Record golds at steps 0, every, 2*every... ; the step the guard stops at, or None."""
    for i, gold in enumerate(golds):
        guard.record(Measurement(i * every, gold))
        if guard.should_stop():
            return i * every
    return None


def test_stops_after_patience_measurements_without_a_new_best(tmp_path: Path) -> None:
    guard = Guard(GuardConfig(patience=2), tmp_path)
    assert fed(guard, [0.5, 0.6, 0.55, 0.58, 0.7]) == 30
    assert guard.best == Measurement(10, 0.6)


def test_a_new_best_resets_the_patience(tmp_path: Path) -> None:
    guard = Guard(GuardConfig(patience=2), tmp_path)
    assert fed(guard, [0.5, 0.4, 0.6, 0.5, 0.7, 0.65, 0.7]) == 60
    assert guard.best is not None and guard.best.step == 40


def test_min_delta_and_ties_keep_the_earlier_best(tmp_path: Path) -> None:
    guard = Guard(GuardConfig(patience=3, min_delta=0.05), tmp_path)
    assert fed(guard, [0.5, 0.5, 0.54, 0.53]) == 30
    assert guard.best == Measurement(0, 0.5)


def test_state_and_best_weights_survive_a_resume(tmp_path: Path) -> None:
    cfg = GuardConfig(patience=5)
    guard = Guard(cfg, tmp_path)
    for step, gold in [(0, 0.5), (10, 0.7), (20, 0.6), (30, 0.8)]:
        if guard.record(Measurement(step, gold)):
            guard.weights_path(step).write_bytes(b"w")
        guard.save(keep_steps={20})  # a checkpoint at step 20 may be resumed from
    # Needed: the best overall (30) and the best up to the kept checkpoint (10).
    assert sorted(p.name for p in tmp_path.glob("best-*")) == [
        "best-10.safetensors",
        "best-30.safetensors",
    ]
    again = Guard(cfg, tmp_path)
    again.resume_at(20)
    assert [m.step for m in again.history] == [0, 10, 20]
    assert again.best == Measurement(10, 0.7)
    assert again.weights_path(again.best.step).exists()


def test_summary_says_which_step_was_kept_and_why(tmp_path: Path) -> None:
    guard = Guard(GuardConfig(patience=1), tmp_path)
    guard.stopped_at = fed(guard, [0.3, 0.5, 0.2])
    summary = guard.summary()
    assert summary["guard_best_step"] == 10 and summary["guard_last_step"] == 20
    assert "stopped at step 20" in summary["guard_reason"]


def test_adaptive_beta_moves_toward_the_target_and_is_clipped() -> None:
    assert next_beta(0.1, kl=0.2, target=0.1, steps=10, horizon=100) == pytest.approx(0.102)
    assert next_beta(0.1, kl=0.05, target=0.1, steps=10, horizon=100) == pytest.approx(0.098)
    assert next_beta(0.1, kl=0.1, target=0.1, steps=10, horizon=100) == pytest.approx(0.1)
    assert next_beta(1e-6, kl=0.0, target=0.1, steps=100, horizon=100) == 1e-6


def test_kl_control_resumes_with_the_coefficient_of_its_step(tmp_path: Path) -> None:
    control = KLControl(0.1, target=0.05, horizon=10, path=tmp_path / "kl.json")
    beta = 0.1
    for step in (5, 10, 15):
        beta = control.update(step, 5, kl=0.2, beta=beta)
        control.save()
    assert control.betas[5] < control.betas[10] < control.betas[15]  # kl above target: up
    again = KLControl(0.1, target=0.05, horizon=10, path=tmp_path / "kl.json")
    assert again.resume_at(12) == control.betas[10] and sorted(again.betas) == [5, 10]
    # The resumed run logs step 15 again, from the coefficient of step 10.
    again.update(15, 5, kl=0.2, beta=control.betas[10])
    assert again.betas == control.betas
    # A run from step 0 (another configuration) starts from its own beta, not the file's.
    fresh = KLControl(0.3, target=0.05, horizon=10, path=tmp_path / "kl.json")
    assert fresh.resume_at(0) == 0.3 and fresh.betas == {}


def tiny_lm(seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(initializer_range=0.5,vocab_size=64, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, eos_token_id=2, pad_token_id=3)  # fmt: skip
    return LlamaForCausalLM(config)


class CharTokenizer:
    """Ids 10.. for characters; eos 2, pad 3 (all the KL estimate uses of a tokenizer)."""

    eos_token_id, pad_token_id = 2, 3

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [10 + ord(c) % 50 for c in text]


def test_kl_of_a_policy_to_itself_is_zero_and_to_another_is_positive() -> None:
    policy, other = tiny_lm(0), tiny_lm(1)
    prompts = ["abc", "hello", "x"]
    same = sequence_kl(policy, lambda: contextlib.nullcontext(policy), CharTokenizer(), prompts, 6)
    assert same == 0.0
    kl = sequence_kl(
        policy, lambda: contextlib.nullcontext(other), CharTokenizer(), prompts * 20, 6
    )
    assert kl > 0.1
    # The estimate draws its own samples: the caller's random stream is left as it was.
    torch.manual_seed(7)
    expected = torch.rand(1)
    torch.manual_seed(7)
    sequence_kl(policy, lambda: contextlib.nullcontext(other), CharTokenizer(), prompts, 6)
    assert torch.equal(torch.rand(1), expected)


def test_restore_puts_back_the_saved_trainable_weights(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = tiny_lm(0)
    model.model.embed_tokens.weight.requires_grad_(False)  # frozen weights are not saved
    save_file(trainable_state(model), str(tmp_path / "best.safetensors"))
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    restore(model, tmp_path / "best.safetensors")
    for name, value in model.state_dict().items():
        if name == "model.embed_tokens.weight" or name == "lm_head.weight":
            continue  # frozen (and, if tied, its twin): left as they are
        assert torch.equal(value, saved[name]), name
