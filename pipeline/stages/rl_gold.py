"""What the RL guard measures (pipeline.stages.rl_guard): gold, the task's own scorer on problems
the RL stage never trains on, and KL(policy || start) on sampled completions."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from data_prep.tasks import TaskBase

KL_SEED = 1234  # the same samples at every measurement of the same policy


def gold_problems(task: TaskBase, num_prompts: int, num: int, seed: int) -> list[dict[str, Any]]:
    """`num` train-split problems after the `num_prompts` an RL stage with `seed` trains on."""
    from data_prep.tasks import task_problems

    return task_problems(task, "train", num_prompts + num, seed)[num_prompts:]


def gold_accuracy(
    model: Any, tokenizer: Any, task: TaskBase, problems: list[dict], generation: Any = None
) -> float:
    """Greedy exact accuracy on `problems` (the task's scorer), answered by the engine
    `generation` names (eval.vllm_engine.GenerationConfig; default hf)."""
    from data_prep.tasks import score
    from eval.tasks import answer_tokens
    from eval.vllm_engine import live_engine

    was_training = model.training
    model.eval()
    prompts = [p["prompt"] for p in problems]
    with live_engine(generation, model, tokenizer) as generator:
        greedy = [c[0] for c in generator(prompts, answer_tokens(problems), 1, 1.0)]
    model.train(was_training)
    right = [
        score(task, c, p["answer"], p)[0] == 1.0 for c, p in zip(greedy, problems, strict=True)
    ]
    return sum(right) / len(problems)


def sequence_kl(
    model: Any,
    reference: Callable[[], Any],
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int,
) -> float:
    """E_{y ~ model}[log model(y|x) - log ref(y|x)] over sampled completions (nats per sequence).

    `reference()` is a context manager under which `model` computes as the start policy (an
    adapter disabled), or yields a separate frozen copy of it.
    """
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    width = max(map(len, encoded))
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=model.device)
    mask = (torch.arange(width) >= torch.tensor([[width - len(e)] for e in encoded])).long()
    mask = mask.to(model.device)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(KL_SEED)
        output = model.generate(
            ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=True,
            temperature=1.0, top_k=0, top_p=1.0, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad,
        )  # fmt: skip
        torch.random.set_rng_state(generator_state)
        completion = output[:, width:]
        # Tokens up to and including the first EOS count; what generate padded after it does not.
        eos = (completion == tokenizer.eos_token_id).long()
        after_eos = (eos.cumsum(dim=1) - eos) > 0
        scored = ~after_eos
        full_mask = torch.cat([mask, scored.long()], dim=1)

        def logprobs(net: Any) -> torch.Tensor:
            logits = net(output, attention_mask=full_mask).logits[:, width - 1 : -1].float()
            taken = logits.log_softmax(-1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)
            return (taken * scored).sum(dim=1)

        policy = logprobs(model)
        with reference() as ref:
            start = logprobs(ref)
    model.train(was_training)
    return float((policy - start).mean())
