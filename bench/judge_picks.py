"""How often a reward-model judge picks a right answer among a policy's own samples.

Best-of-n distillation (online DPO with a reward-model judge, rejection sampling) can only lift a
policy when the judge's pick is right more often than the policy's greedy answer. This samples
`--samples` completions of `--prompts` train problems the recipe's preference rounds do not use,
scores them with each reward model, and prints, over the prompts whose samples disagree, the
greedy accuracy beside the pick accuracy of each judge rule: one member, the ensemble (mean, min,
mean - std), and each of those plus beta x log(share of the samples) (the preferences stage's
`beta`). The gold checker only scores the picks here; no judge sees it.

    .venv/bin/python bench/judge_picks.py --run-dir /tmp/rm0 --policy sft --reward rm rm2 rm3
"""

from __future__ import annotations

import argparse
import collections
import math
import statistics as st
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--policy", default="sft", help="the policy stage whose samples are judged")
    parser.add_argument("--reward", nargs="+", default=["rm"], help="reward stages (members)")
    parser.add_argument("--task", default="sort:3:6", help="name:min_length:max_length")
    parser.add_argument("--prompts", type=int, default=2000)
    parser.add_argument("--skip", type=int, default=6000, help="train problems to skip first")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--betas", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    args = parser.parse_args()

    import torch
    from pydantic import TypeAdapter

    from data_prep.tasks import TaskConfig, task_problems
    from eval.families import load_model
    from eval.tasks import answer_tokens, generate
    from pipeline.stages.reward_models import combine, load_judge, reward_scores

    name, low, high = args.task.split(":")
    task = TypeAdapter(TaskConfig).validate_python(
        {"name": name, "min_length": int(low), "max_length": int(high)}
    )
    problems = task_problems(task, "train", args.skip + args.prompts, 0)[args.skip :]
    prompts = [p["prompt"] for p in problems]
    model, tokenizer = load_model(args.run_dir / args.policy / "export", "cpu")
    torch.manual_seed(7)
    drawn = generate(model, tokenizer, prompts, answer_tokens(problems),
                     samples=args.samples, temperature=args.temperature)  # fmt: skip
    greedy = [c[0] for c in generate(model, tokenizer, prompts, answer_tokens(problems))]
    del model
    flat = [p + c for cs, p in zip(drawn, prompts, strict=True) for c in cs]
    members = []
    for stage in args.reward:
        rm, rm_tokenizer = load_judge(args.run_dir / stage / "export", "cpu")
        members.append(reward_scores(rm, rm_tokenizer, flat))
    k = args.samples

    def right(text: str, i: int) -> bool:
        return text.strip() == str(problems[i]["answer"]).strip()

    contested = [i for i in range(len(problems)) if len(set(drawn[i])) > 1]
    rules = {f"{stage} alone": [m] for stage, m in zip(args.reward, members, strict=True)}
    for how in ("mean", "min", "mean_minus_std") if len(members) > 1 else ():
        rules[f"ensemble {how}"] = [combine(members, how)]  # type: ignore[arg-type]

    def pick(scores: list[float], i: int, beta: float | None) -> str:
        by_text: dict[str, list[float]] = collections.defaultdict(list)
        for j, text in enumerate(drawn[i]):
            by_text[text].append(scores[i * k + j])
        prior = (lambda t: beta * math.log(len(by_text[t]) / k)) if beta else (lambda t: 0.0)
        return max(by_text, key=lambda t: st.fmean(by_text[t]) + prior(t))

    print(f"{len(problems)} prompts, {len(contested)} with samples that disagree")
    greedy_acc = st.fmean(right(greedy[i], i) for i in contested)
    oracle = st.fmean(any(right(c, i) for c in drawn[i]) for i in contested)
    print(f"  greedy {100 * greedy_acc:.1f}%   any sample right {100 * oracle:.1f}%")
    for label, (scores,) in rules.items():
        row = [f"{100 * st.fmean(right(pick(scores, i, None), i) for i in contested):.1f}%"]
        for beta in args.betas:
            acc = st.fmean(right(pick(scores, i, beta), i) for i in contested)
            row.append(f"beta {beta:g}: {100 * acc:.1f}%")
        print(f"  {label:24s} " + "   ".join(row))


if __name__ == "__main__":
    main()
