"""The other engines bench/generation.py compares our generation with, on the same export, prompts
and cores: vLLM (its CPU build, in an environment of its own: bench/vllm_worker.py behind a pipe)
and llama.cpp (llama-cpp-python built by bench/llamacpp_agreement.py; one stream, greedy)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

WORKER = Path(__file__).resolve().parent / "vllm_worker.py"


class VllmEngine:
    """A vLLM engine in `python`'s environment; `start_s` is its start-up time (engine, weights,
    KV cache), which the eval workload pays once per model."""

    def __init__(self, python: str, export_dir: Path) -> None:
        env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
        }
        self.proc = subprocess.Popen(
            [python, str(WORKER), str(export_dir)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, env=env,
        )  # fmt: skip
        self.start_s = float(self._answer("start_s")["start_s"])

    def _answer(self, key: str) -> dict[str, Any]:
        """The worker's next JSON line carrying `key` (vLLM's own log lines are skipped)."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                answer = json.loads(line)
                if key in answer:
                    return answer
        sys.exit(f"the vLLM worker ended (exit {self.proc.wait()}) before it answered {key}")

    def generate(self, prompts: list[str], max_new_tokens: int) -> tuple[float, list[str]]:
        """(seconds, greedy completions) of one batch, timed inside the worker."""
        assert self.proc.stdin is not None
        request = {"prompts": prompts, "max_new_tokens": max_new_tokens}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        answer = self._answer("seconds")
        return float(answer["seconds"]), list(answer["completions"])

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


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


def start_engines(args: Any, n_ctx: int) -> dict[str, tuple[Any, tuple[str, ...]]]:
    """Engine name -> (engine, the rows it answers), for the engines the command line asks for."""
    engines: dict[str, tuple[Any, tuple[str, ...]]] = {}
    if args.llamacpp:
        engines["llama.cpp"] = (
            LlamaCppEngine(args.export_dir, n_ctx),
            ("greedy b=1", "eval greedy"),
        )
    if args.vllm_python:
        engines["vllm"] = (VllmEngine(args.vllm_python, args.export_dir), ("eval greedy",))
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
