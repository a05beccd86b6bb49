"""The other engines bench/generation.py compares our generation with, on the same export, prompts
and cores: vLLM (eval.vllm_engine: its CPU build, in an environment of its own, behind a pipe)
and llama.cpp (llama-cpp-python built by bench/llamacpp_agreement.py; one stream, greedy)."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any


class LlamaCppEngine:
    """llama.cpp on the export converted to GGUF (f32), one stream, greedy, all cores."""

    def __init__(self, export_dir: Path, n_ctx: int) -> None:
        from llamacpp_agreement import RUN_DIR, bindings, convert

        self.llama_cpp = bindings()
        gguf = RUN_DIR / f"{export_dir.parent.parent.name}-{export_dir.parent.name}.gguf"
        start = time.perf_counter()
        convert(export_dir, gguf)
        self.llm = self.llama_cpp.Llama(
            model_path=str(gguf), n_ctx=n_ctx, n_threads=os.cpu_count(), verbose=False
        )
        self.start_s = time.perf_counter() - start

    def timed_generate(
        self, prompts: list[str], max_new_tokens: int
    ) -> tuple[float, list[list[str]]]:
        """(seconds, greedy completions as eval.generation.generate returns them), prompts one
        after another (llama-cpp-python's `Llama` holds one sequence)."""
        start = time.perf_counter()
        completions = []
        for prompt in prompts:
            self.llm.reset()
            ids = self.llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)
            new: list[int] = []
            for token in self.llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0):
                if token == self.llm.token_eos():
                    break
                new.append(token)
                if len(new) == max_new_tokens:
                    break
            text = self.llm.detokenize(new, prev_tokens=ids).decode("utf-8", "replace")
            completions.append([text])
        return time.perf_counter() - start, completions


def start_engines(args: Any, n_ctx: int, tokenizer: Any) -> dict[str, tuple[Any, tuple[str, ...]]]:
    """Engine name -> (engine, the rows it answers), for the engines the command line asks for."""
    engines: dict[str, tuple[Any, tuple[str, ...]]] = {}
    if args.llamacpp:
        engines["llama.cpp"] = (
            LlamaCppEngine(args.export_dir, n_ctx),
            ("greedy b=1", "eval greedy"),
        )
    if args.vllm_python:
        from eval.vllm_engine import VllmEngine  # timed inside its process: no pipe, no decoding

        engines["vllm"] = (
            VllmEngine(args.vllm_python, args.export_dir, tokenizer),
            ("eval greedy",),
        )
    return engines


def print_engines(
    engines: dict[str, tuple[Any, tuple[str, ...]]],
    others: dict[tuple[str, str], list[float]],
    seconds: dict[str, dict[str, list[float]]],
    tokens: dict[str, int],
    same: dict[str, str],
) -> None:
    """Each engine's tok/s on its rows, our new path's speed over it, with and without its
    start-up, and its greedy agreement with ours; then stop the engines."""
    from pretrain_overhead import paired_ratio

    if not engines:
        return
    print(f"\n{'row':<14} {'engine':<10} {'start s':>8} {'tok/s':>7}  "
          f"{'new/engine [95%]':<20} {'with its start [95%]':<22} greedy same")  # fmt: skip
    for (name, engine), engine_s in others.items():
        runner = engines[engine][0]
        ours = seconds[name]["new"]
        point, low, high = paired_ratio(engine_s, ours)
        started = [s + runner.start_s for s in engine_s]
        with_start, low_start, high_start = paired_ratio(started, ours)
        print(
            f"{name:<14} {engine:<10} {runner.start_s:8.1f} "
            f"{tokens[name] / statistics.median(engine_s):7.0f}  "
            f"{point:5.2f} [{low:.2f}, {high:.2f}]{'':<6} "
            f"{with_start:6.2f} [{low_start:.2f}, {high_start:.2f}]{'':<4} "
            f"{same[f'{name} {engine}']}"
        )
    for runner, _ in engines.values():
        if hasattr(runner, "close"):
            runner.close()
