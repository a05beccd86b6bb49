"""A guard against reward hacking in RL: gold measured as the policy trains, early stop, best export.

A learned reward is a proxy: Gao, Schulman and Hilton (2022) measured the gold reward of policies
optimised against one and found it rising, then falling, as the policy moves away from where it
started (d = sqrt(KL(policy || start))), while the proxy keeps rising. The guard measures the
gold metric (the task's verifiable reward, greedy, on problems the RL stage never trains on) and
KL(policy || start) every `every` steps, stops when gold has not beaten its best for `patience`
measurements, and restores the best policy before the export, so the stage never exports a
policy the proxy has talked into being worse than one it had.

Gold problems are drawn from the task's train split after the RL prompts (disjoint from them and
from the test split), so choosing a checkpoint by them does not bias the held-out accuracy that
the stage and the eval stage report. KL is estimated on sampled completions (temperature 1, full
distribution): E_{y ~ policy}[log policy(y|x) - log start(y|x)], in nats per completion.

State (the measurements, and the best policy's trainable weights) lives in the stage's `guard/`
folder; a resumed run drops the measurements after the step it resumes from and replays them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from pipeline.engine.config import Strict
from pipeline.engine.manifest import atomic_write_json

if TYPE_CHECKING:
    from data_prep.tasks import TaskBase

STATE_FILE = "state.json"
KL_SEED = 1234  # the same samples at every measurement of the same policy


class GuardConfig(Strict):
    """When to measure gold and KL, and when to stop."""

    every: int = Field(10, ge=1, description="optimizer steps between measurements (and step 0)")
    problems: int = Field(
        200, ge=1, description="gold problems scored greedily per measurement (never trained on)"
    )
    patience: int = Field(
        3, ge=1, description="stop after this many measurements without a new best gold"
    )
    min_delta: float = Field(0.0, ge=0, description="gold must beat its best by more than this")
    kl_prompts: int = Field(
        32, ge=0, description="prompts sampled to estimate KL(policy || start); 0: off"
    )


@dataclass(frozen=True)
class Measurement:
    step: int
    gold: float
    kl: float | None = None  # nats per completion, KL(policy || start)
    proxy: float | None = None  # the trainer's last logged mean reward


class Guard:
    """The measurements of one run and the decisions taken from them (rank-independent: every
    rank measures the same problems and decides the same)."""

    def __init__(self, cfg: GuardConfig, directory: Path) -> None:
        self.cfg, self.directory = cfg, directory
        self.history: list[Measurement] = []
        self.stopped_at: int | None = None
        path = directory / STATE_FILE
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            self.history = [Measurement(**row) for row in data["history"]]

    @property
    def best(self) -> Measurement | None:
        """The first measurement whose gold no later one beat by more than min_delta."""
        return self.best_until(None)

    def resume_at(self, step: int) -> None:
        """Forget the measurements after `step` (a resumed run makes them again)."""
        self.history = [m for m in self.history if m.step <= step]
        self.stopped_at = None

    def record(self, measurement: Measurement) -> bool:
        """Add a measurement; True when it is the new best."""
        self.history.append(measurement)
        return self.best is measurement

    def should_stop(self) -> bool:
        """Gold has not beaten its best for `patience` measurements."""
        best = self.best
        return best is not None and sum(m.step > best.step for m in self.history) >= (
            self.cfg.patience
        )

    def weights_path(self, step: int) -> Path:
        return self.directory / f"best-{step}.safetensors"

    def save(self, keep_steps: set[int]) -> None:
        """Write the measurements; remove best-weight files no longer needed (those of the best
        and of the best of each prefix a kept checkpoint may resume from stay)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            self.directory / STATE_FILE, {"history": [asdict(m) for m in self.history]}
        )
        needed = {m.step for m in map(self.best_until, [*keep_steps, None]) if m is not None}
        for path in self.directory.glob("best-*.safetensors"):
            if int(path.stem.removeprefix("best-")) not in needed:
                path.unlink()

    def best_until(self, step: int | None) -> Measurement | None:
        """The best measurement at or before `step` (of all of them: None)."""
        best: Measurement | None = None
        for m in self.history:
            if (step is None or m.step <= step) and (
                best is None or m.gold > best.gold + self.cfg.min_delta
            ):
                best = m
        return best

    def summary(self) -> dict[str, Any]:
        """What the stage summary says of the guard: the exported step and why."""
        best, last = self.best, self.history[-1] if self.history else None
        if best is None or last is None:
            return {}
        reason = (
            f"gold did not beat {best.gold:.3f} (step {best.step}) for {self.cfg.patience} "
            f"measurements: stopped at step {self.stopped_at}"
            if self.stopped_at is not None
            else f"ran to the last step; best gold {best.gold:.3f} at step {best.step}"
        )
        out = {
            "guard_best_step": best.step,
            "guard_best_gold": best.gold,
            "guard_last_step": last.step,
            "guard_last_gold": last.gold,
            "guard_reason": reason,
        }
        if best.kl is not None:
            out["guard_best_kl"] = best.kl
        return out


def gold_problems(task: TaskBase, num_prompts: int, num: int, seed: int) -> list[dict[str, Any]]:
    """`num` train-split problems after the `num_prompts` an RL stage with `seed` trains on."""
    from data_prep.tasks import task_problems

    return task_problems(task, "train", num_prompts + num, seed)[num_prompts:]


def gold_accuracy(model: Any, tokenizer: Any, task: TaskBase, problems: list[dict]) -> float:
    """Greedy exact accuracy on `problems` (the task's scorer)."""
    from data_prep.tasks import score
    from eval.tasks import answer_tokens, generate

    was_training = model.training
    model.eval()
    prompts = [p["prompt"] for p in problems]
    greedy = [c[0] for c in generate(model, tokenizer, prompts, answer_tokens(problems))]
    model.train(was_training)
    right = [
        score(task, c, p["answer"], p)[0] == 1.0 for c, p in zip(greedy, problems, strict=True)
    ]
    return sum(right) / len(problems)


def sequence_kl(
    model: Any,
    reference: Callable[[], Any],
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int,
) -> float:
    """E_{y ~ model}[log model(y|x) - log ref(y|x)] over sampled completions (nats per sequence).

    `reference()` is a context manager under which `model` computes as the start policy (an
    adapter disabled), or yields a separate frozen copy of it.
    """
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    width = max(map(len, encoded))
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=model.device)
    mask = (torch.arange(width) >= torch.tensor([[width - len(e)] for e in encoded])).long()
    mask = mask.to(model.device)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(KL_SEED)
        output = model.generate(
            ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=True,
            temperature=1.0, top_k=0, top_p=1.0, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad,
        )  # fmt: skip
        torch.random.set_rng_state(generator_state)
        completion = output[:, width:]
        # Tokens up to and including the first EOS count; what generate padded after it does not.
        eos = (completion == tokenizer.eos_token_id).long()
        after_eos = (eos.cumsum(dim=1) - eos) > 0
        scored = ~after_eos
        full_mask = torch.cat([mask, scored.long()], dim=1)

        def logprobs(net: Any) -> torch.Tensor:
            logits = net(output, attention_mask=full_mask).logits[:, width - 1 : -1].float()
            taken = logits.log_softmax(-1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)
            return (taken * scored).sum(dim=1)

        policy = logprobs(model)
        with reference() as ref:
            start = logprobs(ref)
    model.train(was_training)
    return float((policy - start).mean())


def trainable_state(model: Any) -> dict[str, Any]:
    """The parameters training changes (every weight, or an adapter's), detached on the CPU."""
    return {
        name: p.detach().to("cpu").clone()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def restore(model: Any, path: Path) -> None:
    """Load trainable weights saved by `trainable_state` back into `model`."""
    import torch
    from safetensors.torch import load_file

    saved = load_file(str(path))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def next_beta(beta: float, kl: float, target: float, steps: int, horizon: int) -> float:
    """Adaptive KL coefficient (Ziegler et al. 2019): proportional to the error from the target
    KL, clipped to +-20%, over a horizon of `horizon` steps; never below 1e-6, so the reference
    model stays in the loss."""
    error = max(-0.2, min(0.2, kl / target - 1.0))
    return max(1e-6, beta * (1.0 + error * steps / horizon))


class KLControl:
    """An adaptive KL coefficient held to `target` (per-token KL as the trainer logs it), with
    the coefficient of every logged step kept on disk so a resumed run continues exactly."""

    def __init__(self, beta: float, target: float, horizon: int, path: Path) -> None:
        self.initial, self.target, self.horizon, self.path = beta, target, horizon, path
        self.betas: dict[int, float] = {}
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            self.betas = {int(step): float(beta) for step, beta in data.items()}

    def beta_at(self, step: int) -> float:
        """The coefficient in force after `step` (the start value before any update)."""
        done = [s for s in self.betas if s <= step]
        return self.betas[max(done)] if done else self.initial

    def update(self, step: int, since: int, kl: float, beta: float) -> float:
        new = next_beta(beta, kl, self.target, since, self.horizon)
        self.betas = {s: b for s, b in self.betas.items() if s < step} | {step: new}
        return new

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, {str(s): b for s, b in sorted(self.betas.items())})


def guard_callback(
    guard: Guard | None,
    measure: Callable[[Any, int], Measurement] | None,
    kl_control: KLControl | None,
    log: Callable[[dict[str, float], int], None],
    keep_steps: Callable[[], set[int]],
    is_main: bool,
) -> Any:
    """A TrainerCallback that runs the guard (measure every `every` steps, keep the best
    policy's weights, stop on patience) and the adaptive KL coefficient. `measure(model, step)`
    returns the gold and KL of the policy; `log(metrics, step)` sends them to the tracker;
    `keep_steps()` are the steps of the checkpoints on disk. `trainer` is set once built."""
    from safetensors.torch import save_file
    from transformers import TrainerCallback

    class GuardCallback(TrainerCallback):
        trainer: Any = None

        def __init__(self) -> None:
            self.proxy: float | None = None
            self.last_log_step = 0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            step = state.global_step
            if kl_control is not None:
                self.trainer.beta = kl_control.beta_at(step)
                self.last_log_step = step
            if guard is None:
                return
            guard.resume_at(step)
            measured = {m.step for m in guard.history}
            if step % guard.cfg.every == 0 and step not in measured:
                self._measure(kwargs["model"], step)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
            logs = logs or {}
            if "reward" in logs:
                self.proxy = float(logs["reward"])
            if kl_control is not None and "kl" in logs:
                step = state.global_step
                beta = kl_control.update(step, step - self.last_log_step, float(logs["kl"]),
                                         self.trainer.beta)  # fmt: skip
                self.trainer.beta, self.last_log_step = beta, step
                if is_main:
                    kl_control.save()
                log({"train/beta": beta}, step)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            step = state.global_step
            if (
                guard is not None
                and step % guard.cfg.every == 0
                and self._measure(kwargs["model"], step)
            ):
                guard.stopped_at = step
                control.should_training_stop = True

        def _measure(self, model: Any, step: int) -> bool:
            assert guard is not None and measure is not None
            m = measure(model, step)
            m = Measurement(m.step, m.gold, m.kl, self.proxy)
            improved = guard.record(m)
            if is_main:
                if improved:
                    save_file(trainable_state(model), str(guard.weights_path(step)))
                guard.save(keep_steps())
            shown = {"guard/gold": m.gold}
            if m.kl is not None:
                shown |= {"guard/kl": m.kl, "guard/sqrt_kl": max(m.kl, 0.0) ** 0.5}
            if m.proxy is not None:
                shown["guard/proxy"] = m.proxy
            log(shown, step)
            return guard.should_stop()

    return GuardCallback()
