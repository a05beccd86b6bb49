"""Stage kind `preferences`: preference pairs from a policy's own samples, labelled by a judge.

Offline pairs (the right answer against a near miss) say little about what the policy being
trained gets wrong; online and iterative DPO and iterated reward modelling learn from pairs
sampled from the current policy and then labelled. This stage samples `samples` completions of
each prompt from its model (temperature `temperature`, seeded), scores them with its judge and
pairs the best against the worst; prompts whose completions all score the same give no pair.

Judges: `task` (the task's verifiable scorer: exact first, partial credit breaking ties; a
simulated labeller, as Gao et al. used a gold model), `reward_model` (a reward stage's or a
directory's scalar score), or `labels` (the user's JSONL of `prompt`/`chosen`/`rejected`, plain
text or as messages, taken as they are). Every pair records which model and which judge made it;
`reward` and `rlhf` (DPO) train on them with `pairs: STAGE`. Round r of a sequence (`round`) takes
the r-th block of `num_prompts` train problems, so each round sees fresh prompts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from data_prep.task_base import task_file_signature
from data_prep.tasks import ArithmeticTask, TaskConfig
from eval.vllm_engine import GenerationConfig, engine_for, plan_problem
from pipeline.engine.config import StageConfig
from pipeline.engine.context import StageContext
from pipeline.engine.errors import PipelineError
from pipeline.engine.inputs import Input, PlanView, StageSpec
from pipeline.engine.locations import Location
from pipeline.engine.manifest import atomic_write_json, atomic_write_text, read_record
from pipeline.engine.schema_errors import PathText
from pipeline.stages.reward_models import Ensemble

PAIRS_FILE = "pairs.jsonl"
META_FILE = "preferences.json"
Judge = Literal["task", "reward_model", "labels"]


class Config(StageConfig):
    """Sample completions from a model and pair them by a judge (or take the user's labels)."""

    kind: Literal["preferences"] = "preferences"
    model: str | Location | None = Field(
        None,
        description="the policy to sample: a stage name or {path: DIR}; default: the nearest "
        "upstream language-model stage",
    )
    judge: Judge = Field("task", description="task | reward_model | labels (the user's pairs)")
    reward_model: list[str | Location] = Field(
        [],
        description="judge: reward_model: a reward stage or {path: DIR}; several are an ensemble "
        "combined by `ensemble`",
    )
    ensemble: Ensemble = Field(
        "mean", description="mean | min | mean_minus_std (mean - ensemble_lambda x std)"
    )
    ensemble_lambda: float = Field(1.0, ge=0, description="weight of the members' std")
    beta: float | None = Field(
        None,
        gt=0,
        description="judge: reward_model: score a completion by its reward + beta x log of its "
        "text's share of the samples, the most likely answer of the KL-regularised optimum "
        "pi0 exp(r / beta); unset: the reward alone",
    )
    labels: PathText | None = Field(
        None, description="judge: labels: a JSONL of prompt/chosen/rejected (text or messages)"
    )
    task: TaskConfig = Field(default_factory=ArithmeticTask, description="prompts and scorer")
    num_prompts: int = Field(1000, ge=1, description="train-split problems sampled")
    round: int = Field(
        1, ge=1, description="which block of num_prompts train problems (fresh prompts per round)"
    )
    samples: int = Field(4, ge=2, description="completions sampled per prompt")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    pairing: Literal["best_vs_worst", "best_vs_each"] = Field(
        "best_vs_worst",
        description="best_vs_worst: one pair per prompt; best_vs_each: the best against every "
        "distinct completion that scores lower (the policy's near misses too: harder pairs, more "
        "of them, for training a reward model)",
    )
    right_vs_wrong: bool = Field(
        False,
        description="judge: task: pair only prompts with a right completion (chosen) and a wrong "
        "one, not a less wrong one against a worse one",
    )
    max_completion_length: int | None = Field(
        None, ge=1, description="tokens per completion; default: the task's longest answer + 1"
    )
    generation: GenerationConfig = Field(
        GenerationConfig(), json_schema_extra={"fingerprint": "when_set"},
        description="the engine that samples the policy (hf, or vllm: eval.vllm_engine; its "
        "samples are seeded by vLLM, not the hf engine's)",
    )  # fmt: skip

    def data_signature(self) -> dict[str, Any]:
        """A labels file by size and mtime, a JSONL task's file: a change reruns the stage."""
        signed = task_file_signature(self.task)
        if self.labels is not None:
            path = Path(self.labels)
            stat = path.stat() if path.is_file() else None
            signed["labels"] = [str(path), stat.st_size, stat.st_mtime_ns] if stat else None
        return signed

    def check_inputs(self) -> None:
        self.task.check_inputs()
        if self.labels is not None:
            label_rows(self.labels, "labels")

    @field_validator("reward_model", mode="before")
    @classmethod
    def _as_list(cls, value: Any) -> Any:
        return [] if value is None else value if isinstance(value, list) else [value]

    @model_validator(mode="after")
    def _judge_has_what_it_needs(self) -> Config:
        if self.judge == "reward_model" and not self.reward_model:
            raise ValueError("judge: reward_model needs reward_model: STAGE or {path: DIR}")
        if self.judge == "labels" and self.labels is None:
            raise ValueError("judge: labels needs labels: FILE (a JSONL of prompt/chosen/rejected)")
        if self.judge != "reward_model" and self.reward_model:
            raise ValueError(
                f"reward_model is only read by judge: reward_model (judge is {self.judge})"
            )
        if self.right_vs_wrong and self.judge != "task":
            raise ValueError(f"right_vs_wrong needs judge: task (judge is {self.judge})")
        if self.beta is not None and self.judge != "reward_model":
            raise ValueError(f"beta is only read by judge: reward_model (judge is {self.judge})")
        if self.judge != "labels" and self.labels is not None:
            raise ValueError(f"labels is only read by judge: labels (judge is {self.judge})")
        return self


class PreferencesMeta(BaseModel):
    """What a preferences export holds and where its pairs came from."""

    model_config = ConfigDict(extra="ignore")

    judge: Judge
    model: str | None  # the policy sampled (a stage or a directory); None for user labels
    reward_model: str | None = None
    task: str | None = None
    round: int = 1
    prompts: int
    pairs: int
    ties: int  # prompts that gave no pair: every completion scored the same (or none was right)
    samples: int | None = None
    temperature: float | None = None

    def write(self, export_dir: Path) -> None:
        atomic_write_json(export_dir / META_FILE, self.model_dump(mode="json"))

    @classmethod
    def read(cls, export_dir: Path) -> PreferencesMeta:
        return read_record(cls, export_dir / META_FILE, "preferences")


def read_pairs(export_dir: Path) -> list[dict[str, Any]]:
    """The pairs of a preferences export (prompt, chosen, rejected, scores, provenance)."""
    PreferencesMeta.read(export_dir)  # a one-line error when the export is not one
    text = (export_dir / PAIRS_FILE).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def message_text(value: Any) -> str:
    """A response as text: a string, or a list of chat messages (their contents joined)."""
    if isinstance(value, str):
        return value
    return "".join(str(m.get("content", "")) for m in value)


def label_rows(path: str, where: str) -> list[dict[str, Any]]:
    """The user's labelled pairs; a bad row is a one-line error naming its line."""
    from data_prep.sources import jsonl_records

    file = Path(path)
    if not file.is_file():
        raise PipelineError(
            f"{where}: {path}: no such file; give a JSONL of prompt/chosen/rejected rows"
        )
    rows = []
    for number, row in jsonl_records(file):
        for key in ("chosen", "rejected"):
            value = row.get(key) if isinstance(row, dict) else None
            if not (isinstance(value, str) or (
                isinstance(value, list) and all(isinstance(m, dict) for m in value)
            )):  # fmt: skip
                got = "nothing" if value is None else type(value).__name__
                raise PipelineError(
                    f"{where}: {path} line {number}: `{key}` must be text or a list of "
                    f"messages, got {got}; fix the file"
                )
        rows.append({k: message_text(row.get(k, "")) for k in ("prompt", "chosen", "rejected")})
    if not rows:
        raise PipelineError(f"{where}: {path} has no rows; add labelled pairs")
    return rows


def best_and_worst(
    completions: list[str], scores: list[tuple[float, ...]]
) -> tuple[int, int] | None:
    """Indices of the best and the worst completion by score (the first of equals), or None
    when every completion scores the same (a tie gives no preference)."""
    best = max(range(len(scores)), key=lambda i: scores[i])
    worst = min(range(len(scores)), key=lambda i: scores[i])
    if scores[best] == scores[worst]:
        return None
    return best, worst


def best_and_each(completions: list[str], scores: list[tuple[float, ...]]) -> list[tuple[int, int]]:
    """The best completion (first of equals) against the first copy of every distinct text that
    scores lower, worst first; empty when every completion scores the same."""
    picked = best_and_worst(completions, scores)
    if picked is None:
        return []
    best = picked[0]
    firsts = {text: i for i, text in reversed(list(enumerate(completions)))}
    lower = [i for i in sorted(firsts.values()) if scores[i] < scores[best]]
    return [(best, i) for i in sorted(lower, key=lambda i: scores[i])]


def with_prior(
    rewards: list[float], completions: list[str], beta: float | None
) -> list[tuple[float, ...]]:
    """Each completion's judge score: its reward, or with `beta` the reward (the mean over the
    copies of its text) plus beta x log of its text's share of the samples, then the reward.

    pi0(y) exp(r(y) / beta) is the optimum of reward - beta KL(pi || pi0), so the best pair
    member is that optimum's most likely sample, with pi0 estimated by the samples themselves:
    where the reward model cannot tell two answers apart, the one the policy says more often wins.
    """
    if beta is None:
        return [(r,) for r in rewards]
    by_text: dict[str, list[float]] = {}
    for text, r in zip(completions, rewards, strict=True):
        by_text.setdefault(text, []).append(r)
    mean = {t: sum(rs) / len(rs) for t, rs in by_text.items()}
    share = {t: len(rs) / len(completions) for t, rs in by_text.items()}
    return [(mean[t] + beta * math.log(share[t]), mean[t]) for t in completions]


def run(ctx: StageContext) -> None:
    """Sample, judge and pair (or check and copy the user's labels); write pairs + record."""
    cfg: Config = ctx.config  # type: ignore[assignment]
    where = f"stages.{ctx.name}"
    out = ctx.export_dir
    out.mkdir(parents=True, exist_ok=True)
    if cfg.judge == "labels":
        assert cfg.labels is not None
        pairs = [{**r, "judge": "labels", "model": None} for r in label_rows(cfg.labels, where)]
        meta = PreferencesMeta(
            judge="labels", model=None, prompts=len(pairs), pairs=len(pairs), ties=0
        )
    else:
        pairs, meta = sampled_pairs(ctx, cfg)
    atomic_write_text(out / PAIRS_FILE, "".join(json.dumps(p) + "\n" for p in pairs))
    meta.write(out)
    ctx.log.info(
        "%d pairs from %d prompts (%d ties) judged by %s", meta.pairs, meta.prompts, meta.ties,
        cfg.judge,
    )  # fmt: skip
    if not pairs:
        raise PipelineError(
            f"{where}: every prompt's {cfg.samples} completions scored the same, no pair; raise "
            f"samples or temperature"
        )
    ctx.write_summary(
        {"pairs": meta.pairs, "prompts": meta.prompts, "ties": meta.ties}, headline="pairs"
    )


def sampled_pairs(ctx: StageContext, cfg: Config) -> tuple[list[dict[str, Any]], PreferencesMeta]:
    """Pairs from `samples` completions per prompt of the model, judged by the task or a
    reward model."""
    import torch

    from data_prep.tasks import score, task_problems
    from eval.families import load_model
    from eval.tasks import answer_tokens

    device = "cuda" if torch.cuda.is_available() else "cpu"
    source = ctx.input("model")
    model, tokenizer = load_model(source.path, device)
    skip = (cfg.round - 1) * cfg.num_prompts
    problems = task_problems(cfg.task, "train", skip + cfg.num_prompts, ctx.seed)[skip:]
    tokens = cfg.max_completion_length or answer_tokens(problems)
    torch.manual_seed(ctx.seed + cfg.round)
    seed = ctx.seed + cfg.round
    prompts = [p["prompt"] for p in problems]
    with engine_for(cfg.generation, source.path, model, tokenizer, seed) as generator:
        drawn = generator(prompts, tokens, cfg.samples, cfg.temperature)
    del model
    judge_label = None
    if cfg.judge == "task":
        scores = [
            [score(cfg.task, c, p["answer"], p) for c in completions]
            for completions, p in zip(drawn, problems, strict=True)
        ]
    else:
        from pipeline.stages.reward_models import ensemble_reward

        judges = ctx.inputs("reward_model")
        judge_label = "+".join(j.label for j in judges)
        reward = ensemble_reward(
            [j.path for j in judges], cfg.ensemble, cfg.ensemble_lambda, device
        )
        values = reward(
            [p["prompt"] for cs, p in zip(drawn, problems, strict=True) for _ in cs],
            [c for cs in drawn for c in cs],
        )
        k = cfg.samples
        scores = [
            with_prior([values[i * k + j] for j in range(k)], completions, cfg.beta)
            for i, completions in enumerate(drawn)
        ]
    pairs: list[dict[str, Any]] = []
    ties = 0
    for completions, p, s in zip(drawn, problems, scores, strict=True):
        if cfg.pairing == "best_vs_each":
            picked = best_and_each(completions, s)
        else:
            one = best_and_worst(completions, s)
            picked = [one] if one else []
        if not picked or (cfg.right_vs_wrong and s[picked[0][0]][0] != 1.0):
            ties += 1
            continue
        pairs += [{
            "prompt": p["prompt"], "chosen": completions[best], "rejected": completions[worst],
            "chosen_score": list(s[best]), "rejected_score": list(s[worst]),
            "answer": p["answer"], "model": source.label, "judge": judge_label or cfg.judge,
        } for best, worst in picked]  # fmt: skip
    meta = PreferencesMeta(
        judge=cfg.judge, model=source.label, reward_model=judge_label, task=cfg.task.FAMILY,
        round=cfg.round, prompts=len(problems), pairs=len(pairs), ties=ties,
        samples=cfg.samples, temperature=cfg.temperature,
    )  # fmt: skip
    return pairs, meta


def plan_problems(view: PlanView) -> list[str]:
    """Sampling needs a policy (a model stage upstream or `model:`) and, with engine: vllm, a
    Python that has vLLM."""
    cfg: Config = view.config
    if cfg.judge == "labels":
        return []
    if view.first("model") is None:
        return [
            f"stages.{view.name}.model: judge: {cfg.judge} samples a policy, and none is given "
            f"or upstream; set model: STAGE or {{path: DIR}}, or add a model stage to `after`"
        ]
    engine = plan_problem(cfg.generation, f"stages.{view.name}.generation")
    return [engine] if engine else []


SPEC = StageSpec(
    Config,
    run,
    output="preferences",
    inputs=(
        Input("model", ("lm",), field="model", location="model", required=False),
        Input("reward_model", ("reward_model",), field="reward_model.*", location="model",
              required=False, nearest=False, many=True),
    ),
    plan_check=plan_problems,
)  # fmt: skip
