"""Task accuracy: greedy answers to held-out arithmetic problems, scored by exact match.

Prompts are the problems' plain text (as pretraining, SFT and RL see them); the answer is the
integer the completion starts with. The test split is fixed by a hash of each problem, so no
stage ever trains on what is scored here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.rewards import parse_answer

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ANSWER_TOKENS = 8  # enough for "-9801" and an end-of-text token in any vocabulary we train


def greedy_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int = ANSWER_TOKENS,
    batch_size: int = 64,
) -> list[str]:
    """Greedy completion of each prompt, batched with left padding."""
    import torch

    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    completions: list[str] = []
    for start in range(0, len(prompts), batch_size):
        encoded = [
            tokenizer.encode(p, add_special_tokens=False)
            for p in prompts[start : start + batch_size]
        ]
        width = max(map(len, encoded))
        ids = torch.tensor([[pad_id] * (width - len(e)) + e for e in encoded], device=model.device)
        mask = torch.tensor(
            [[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=model.device
        )
        with torch.inference_mode():
            output = model.generate(
                ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=pad_id,
            )
        completions += tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
    return completions


def arithmetic_accuracy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, num_problems: int, seed: int = 0
) -> dict[str, Any]:
    """Exact-match accuracy and answer rate on `num_problems` held-out problems, plus examples."""
    from data_prep.arithmetic import arithmetic_problems

    problems = arithmetic_problems("test", num_problems, seed)
    completions = greedy_completions(model, tokenizer, [p["prompt"] for p in problems])
    answers = [parse_answer(c) for c in completions]
    correct = sum(a == p["answer"] for a, p in zip(answers, problems, strict=True))
    return {
        "arithmetic_accuracy": correct / len(problems),
        "arithmetic_answered": sum(a is not None for a in answers) / len(problems),
        "arithmetic_problems": len(problems),
        "examples": [
            {"prompt": p["prompt"], "completion": c, "answer": p["answer"]}
            for p, c in list(zip(problems, completions, strict=True))[:5]
        ],
    }


def accuracy_table(results: dict[str, dict[str, Any]]) -> str:
    """One line per model: held-out arithmetic accuracy, side by side for the run summary."""
    scored = [(name, m) for name, m in results.items() if "arithmetic_accuracy" in m]
    width = max(len(name) for name, _ in scored)
    lines = [
        f"{name:<{width}}  {m['arithmetic_accuracy']:6.1%} of {m['arithmetic_problems']} held-out problems"
        for name, m in scored
    ]
    return "arithmetic accuracy (greedy, exact match):\n" + "\n".join(lines)
