"""The other engines bench/generation.py compares our generation with, on the same export, prompts
and cores: vLLM (eval.vllm_engine: its CPU build, in an environment of its own, behind a pipe)
and llama.cpp (llama-cpp-python built by bench/llamacpp_agreement.py; one stream, greedy)."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any


class VllmTimed:
    """eval.vllm_engine's engine for `export_dir`, in `python`'s environment; generate() gives
    the seconds timed inside the engine's process (no pipe or decoding)."""

    def __init__(self, python: str, export_dir: Path, tokenizer: Any) -> None:
        from eval.vllm_engine import VllmEngine

        self.engine = VllmEngine(python, export_dir, tokenizer)
        self.tokenizer = tokenizer
        self.start_s = self.engine.start_s

    def generate(self, prompts: list[str], max_new_tokens: int) -> tuple[float, list[str]]:
        """(seconds, greedy completions) of one batch."""
        encoded = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        eos = self.tokenizer.eos_token_id
        seconds, drawn = self.engine.token_ids(encoded, max_new_tokens, 1, 0.0, eos)
        decode = self.tokenizer.decode
        return seconds, [decode(ids[0], skip_special_tokens=True) for ids in drawn]

    def close(self) -> None:
        self.engine.close()


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

    def generate(self, prompts: list[str], max_new_tokens: int) -> tuple[float, list[str]]:
        """(seconds, greedy completions), prompts one after another (llama-cpp-python's `Llama`
        holds one sequence)."""
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
            completions.append(self.llm.detokenize(new, prev_tokens=ids).decode("utf-8", "replace"))
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
        engines["vllm"] = (
            VllmTimed(args.vllm_python, args.export_dir, tokenizer),
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
