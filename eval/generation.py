"""Batched Hugging Face generation for eval's task scoring, the in-loop task evaluator, RL's
held-out gold accuracy and preference sampling.

Three things make it fast on a CPU without changing what a model answers:
- prompts are sorted by token length before batching (and completions put back in the caller's
  order), so a batch carries little left padding;
- a batch holds as many sequences as fit in a fraction of the free memory (RAM, or the GPU's),
  counted from the model's KV cache and activations per token, instead of a fixed 64 prompts;
- `generate` stops once every sequence of a batch has ended (Hugging Face's own stopping rule).

Greedy completions are what one prompt alone would get up to floating-point reduction order: a
row's logits can differ in the last bits with the batch around it (matmul blocking, masked
padding), which flips an argmax only at a near tie; bench/generation.py checks the demo's 1000
problems. Sampling inverts each row's softmax at uniform numbers from one generator per (prompt,
sample), seeded from the torch RNG, so the same seed gives the same completions whatever the
batch size, the free memory or the order; it draws from the same distribution as multinomial
sampling at `temperature` (no top-k or top-p), but not the same samples as the multinomial draw
over a whole batch did before issue 26.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pipeline.engine.errors import PipelineError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# (prompts, max_new_tokens, samples, temperature) -> completions: `generate` or another engine's.
Generator = Callable[[list[str], int, int, float], list[list[str]]]
MEMORY_FRACTION = 0.5  # of the free memory a batch may take: the rest is the process's headroom
# Rows per batch at most: on 2 CPU cores tokens/s stops growing past a few hundred rows
# (bench/generation.py), and a bigger batch only waits longer for its slowest sequence.
MAX_ROWS = 1024
# Prompts per batch when several processes generate alike: free memory differs from rank to rank,
# and a sharded model (FSDP, ZeRO-3) needs every rank to run the same number of forward passes.
DISTRIBUTED_BATCH = 64


def row_bytes(config: Any, prompt_tokens: int, new_tokens: int, dtype_bytes: int) -> int:
    """Peak bytes one generated sequence adds: its KV cache over prompt and answer, the prefill's
    activations of one layer, and float32 logits with their sampling copies."""
    text = config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    intermediate = getattr(text, "intermediate_size", None) or 4 * text.hidden_size
    kv_per_token = 2 * text.num_hidden_layers * kv_heads * head_dim * dtype_bytes
    activations = prompt_tokens * (6 * text.hidden_size + 3 * intermediate) * dtype_bytes
    attention = heads * prompt_tokens**2 * dtype_bytes  # eager attention's score matrix
    logits = 4 * text.vocab_size * 4
    return (prompt_tokens + new_tokens) * kv_per_token + activations + attention + logits


def free_memory_bytes(device: torch.device) -> int:
    """Free memory where the model's tensors live: the GPU's, else the machine's available RAM."""
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def batch_rows(
    model: PreTrainedModel,
    prompt_tokens: int,
    new_tokens: int,
    memory_bytes: int | None = None,
    max_rows: int = MAX_ROWS,
) -> int:
    """Sequences per batch that fit in MEMORY_FRACTION of `memory_bytes` (default: free memory
    now), between 1 and `max_rows`."""
    if memory_bytes is None:
        memory_bytes = free_memory_bytes(model.device)
    per_row = row_bytes(model.config, prompt_tokens, new_tokens, model.dtype.itemsize)
    return max(1, min(max_rows, int(MEMORY_FRACTION * memory_bytes) // per_row))


def default_batch(model: PreTrainedModel, prompt_tokens: int, new_tokens: int, samples: int) -> int:
    """Prompts per batch when the caller names none: by free memory in a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return DISTRIBUTED_BATCH
    return max(1, batch_rows(model, prompt_tokens, new_tokens) // samples)


class SeededSampler:
    """A logits processor that turns greedy decoding into sampling at `temperature`: each row
    draws its token by inverting the cumulative softmax at a uniform number from its own
    generator (one per step), and every other token's score becomes -inf, so argmax takes it."""

    def __init__(self, seeds: list[int], temperature: float, steps: int) -> None:
        import torch

        self.uniform = torch.stack(
            [torch.rand(steps, generator=torch.Generator().manual_seed(seed)) for seed in seeds]
        )  # (rows, steps)
        self.temperature = temperature
        self.step = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        import torch

        cdf = torch.softmax(scores.float() / self.temperature, dim=-1).cumsum(dim=-1)
        u = self.uniform[:, self.step : self.step + 1].to(cdf.device) * cdf[:, -1:]
        # right=True: a token of probability 0 shares its left neighbour's bound, never chosen
        token = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)
        self.step += 1
        chosen = torch.full_like(cdf, float("-inf"))
        return chosen.scatter_(-1, token, 0.0)


def check_settings(batch_size: int | None, samples: int, temperature: float) -> None:
    """One-line errors for settings a recipe can get wrong."""
    if batch_size is not None and batch_size < 1:
        raise PipelineError(f"generation batch_size={batch_size}: must be >= 1 (or unset: memory)")
    if samples < 1:
        raise PipelineError(f"generation samples={samples}: must be >= 1")
    if samples > 1 and not temperature > 0:
        raise PipelineError(f"generation temperature={temperature}: sampling needs > 0")


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int | None = None,
    samples: int = 1,
    temperature: float = 1.0,
) -> list[list[str]]:
    """`samples` completions of each prompt, in the prompts' order (greedy when samples == 1;
    else seeded from the torch RNG). `batch_size` prompts per batch, default: by free memory."""
    import torch

    check_settings(batch_size, samples, temperature)
    encoded = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))  # stable: ties keep order
    base_seed = int(torch.randint(2**62, (1,)).item()) if samples > 1 else 0
    completions: list[list[str]] = [[] for _ in prompts]
    longest = len(encoded[order[-1]]) if order else 0
    count = batch_size or default_batch(model, longest, max_new_tokens, samples)
    for start in range(0, len(order), count):
        picked = order[start : start + count]
        seeds = [base_seed + i * samples + j for i in picked for j in range(samples)]
        texts = generate_batch(
            model, tokenizer, [encoded[i] for i in picked], max_new_tokens, samples,
            SeededSampler(seeds, temperature, max_new_tokens) if samples > 1 else None,
        )  # fmt: skip
        for k, i in enumerate(picked):
            completions[i] = texts[k * samples : (k + 1) * samples]
    return completions


def hf_generator(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int | None = None
) -> Generator:
    """`generate` on this model as a Generator (the default engine); `batch_size` prompts per
    batch, default: by free memory."""

    def generator(
        prompts: list[str], max_new_tokens: int, samples: int = 1, temperature: float = 1.0
    ) -> list[list[str]]:
        return generate(model, tokenizer, prompts, max_new_tokens, batch_size, samples, temperature)

    return generator


def generate_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    encoded: list[list[int]],
    max_new_tokens: int,
    samples: int,
    sampler: SeededSampler | None,
) -> list[str]:
    """Completions of one left-padded batch, `samples` rows per prompt (adjacent). Samples of a
    prompt share its prefill: the cache of its tokens is computed once and repeated."""
    import torch
    from transformers import LogitsProcessorList

    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    width = max(map(len, encoded))
    ids = torch.tensor([[pad_id] * (width - len(e)) + e for e in encoded], device=model.device)
    starts = torch.tensor([width - len(e) for e in encoded])
    mask = (torch.arange(width) >= starts[:, None]).long().to(model.device)
    with torch.inference_mode():
        cache = shared_prefill(model, ids, mask, samples)
        output = model.generate(
            ids.repeat_interleave(samples, dim=0),
            attention_mask=mask.repeat_interleave(samples, dim=0),
            cache=cache,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad_id,
            do_sample=False,
            logits_processor=LogitsProcessorList([sampler] if sampler else []),
        )
    return tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)


def shared_prefill(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, samples: int):
    """The KV cache of every prompt token but the last, computed once per prompt and repeated
    `samples` times, for `generate` to continue from (it runs the last token itself). None, so
    `generate` prefills every row, for one sample (nothing to share), one-token prompts, or a
    model whose cache cannot be repeated. Positions count from each row's first real token, as
    `generate`'s own do, so the cache is the one `generate` would have built."""
    import inspect

    if samples == 1 or ids.shape[1] < 2:
        return None
    kwargs = {}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1  # the logits are not needed, only the cache
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = model(
        ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1], use_cache=True,
        **kwargs,
    ).past_key_values  # fmt: skip
    if not hasattr(cache, "batch_repeat_interleave"):
        return None
    cache.batch_repeat_interleave(samples)
    return cache
