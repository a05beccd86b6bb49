"""Does a static KV cache, with or without torch.compile, pay for our greedy generation on this
machine? (issue 26: "use a static KV cache with torch.compile where it pays; measured, not
assumed".)

Contenders, on an exported causal LM and the demo's held-out sort prompts, each batch left-padded
as eval.generation.generate_batch pads it:

    dynamic         what eval.generation does: transformers' DynamicCache, no compile
    static          cache_implementation="static" (preallocated to prompt + max_new_tokens)
    static+compile  the same, with transformers' auto-compile of the decoding forward forced on
                    for this device (CompileConfig(mode="default"); off by default off CUDA)

Rows: batch size 1 (Python overhead per token dominates; where compile helps most), 64, and the
eval stage's memory-sized batch over every problem. Contenders take turns within each round;
round 0 compiles and warms up and is reported apart (what an eval stage pays once per model and
shape); a row's figure is the median over rounds of dynamic's seconds over the contender's
(above 1: the contender is faster) with a 95% bootstrap interval (bench/pretrain_overhead.py's
paired_ratio). Every contender's greedy texts are compared with dynamic's.

    .venv/bin/python bench/generation_cache.py runs/demo/sft/export [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from pretrain_overhead import paired_ratio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.tasks import task_problems  # noqa: E402
from eval.families import load_model  # noqa: E402
from eval.generation import batch_rows  # noqa: E402
from eval.tasks import EVAL_SEED, answer_tokens  # noqa: E402
from pipeline.engine.config import load_recipe  # noqa: E402

CONTENDERS = ("dynamic", "static", "static+compile")


def options(contender: str) -> dict[str, object]:
    """model.generate's keyword arguments for a contender."""
    from transformers import CompileConfig

    if contender == "dynamic":
        return {"disable_compile": True}
    if contender == "static":
        return {"cache_implementation": "static", "disable_compile": True}
    compile_config = CompileConfig(mode="default", fullgraph=False, dynamic=False)
    compile_config._compile_all_devices = True  # transformers compiles on CUDA-like devices only
    return {"cache_implementation": "static", "compile_config": compile_config}


def greedy(
    model: torch.nn.Module,
    tokenizer: object,
    batches: list[list[list[int]]],
    max_new: int,
    contender: str,
) -> list[str]:
    """Greedy completions of every batch (token ids, unpadded) with one contender's cache."""
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    texts: list[str] = []
    for encoded in batches:
        width = max(map(len, encoded))
        ids = torch.tensor([[pad_id] * (width - len(e)) + e for e in encoded])
        mask = (torch.arange(width) >= torch.tensor([[width - len(e)] for e in encoded])).long()
        with torch.inference_mode():
            output = model.generate(
                ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id, **options(contender),
            )  # fmt: skip
        texts += tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", type=Path, help="an exported causal LM (e.g. the demo's SFT)")
    parser.add_argument("--recipe", default="recipes/demo.yaml", help="whose eval task is posed")
    parser.add_argument("--problems", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    task = next(s.task for s in recipe.stages.values() if getattr(s, "task", None) is not None)
    problems = task_problems(task, "test", args.problems, EVAL_SEED)
    max_new = answer_tokens(problems)
    model, tokenizer = load_model(args.export_dir, "cpu")
    encoded = sorted(
        (tokenizer.encode(p["prompt"], add_special_tokens=False) for p in problems), key=len
    )
    eval_rows = batch_rows(model, len(encoded[-1]), max_new)
    table = {
        "b=1 (32 prompts)": [[e] for e in encoded[:32]],
        "b=64 (256)": [encoded[i : i + 64] for i in range(0, 256, 64)],
        f"eval b={eval_rows}": [encoded[i : i + eval_rows] for i in range(0, len(encoded), eval_rows)],
    }  # fmt: skip
    seconds = {(row, c): [] for row in table for c in CONTENDERS}
    first = {}
    texts = {}
    for round_index in range(args.rounds + 1):  # round 0: compile and warm-up
        for row, batches in table.items():
            for contender in CONTENDERS:
                start = time.perf_counter()
                texts[row, contender] = greedy(model, tokenizer, batches, max_new, contender)
                elapsed = time.perf_counter() - start
                if round_index:
                    seconds[row, contender].append(elapsed)
                else:
                    first[row, contender] = elapsed
    print(
        f"{args.export_dir}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
        f"{len(encoded)} prompts, max_new_tokens={max_new}, {torch.get_num_threads()} threads, "
        f"{args.rounds} rounds (after one of compile and warm-up); torch {torch.__version__}"
    )
    print(
        f"{'row':<18} {'contender':<15} {'median s':>9} {'round 0 s':>9}  dynamic/it [95%]   same"
    )
    for row in table:
        for contender in CONTENDERS:
            point, low, high = paired_ratio(seconds[row, "dynamic"], seconds[row, contender])
            agree = sum(
                a == b for a, b in zip(texts[row, "dynamic"], texts[row, contender], strict=True)
            )
            print(
                f"{row:<18} {contender:<15} {statistics.median(seconds[row, contender]):9.2f} "
                f"{first[row, contender]:9.2f}  {point:5.2f} [{low:.2f}, {high:.2f}]  "
                f"{agree}/{len(texts[row, 'dynamic'])}"
            )


if __name__ == "__main__":
    main()
