"""Batched generation (eval.generation): sorted, memory-sized batches return each prompt's own
completions in the caller's order, greedy ones equal to generating each prompt alone; sampling
is reproducible from the torch seed whatever the batching; batch sizes respect a memory budget."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eval.generation import MEMORY_FRACTION, SeededSampler, batch_rows, generate, row_bytes
from eval.tasks import generate as tasks_generate
from pipeline.engine.errors import PipelineError

# Token lengths differ from prompt to prompt (so batches are padded) and the order is not sorted.
PROMPTS = [
    "The river runs through the village and the forest",
    "7 + 5 =",
    "def add(a, b):\n    return",
    "A small dog",
    "Every student should study history, music and science before",
    "12 * 3 =",
    "The cat",
    "My friend and my sister travel toward the mountain station in winter",
]


@pytest.fixture(scope="module")
def llama(llama_dir: Path) -> tuple[torch.nn.Module, object]:
    """The tiny Llama (no pad token: padding uses end-of-text) in eval mode, and its tokenizer."""
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(llama_dir)


def test_batched_greedy_equals_one_prompt_at_a_time_in_the_callers_order(llama: tuple) -> None:
    model, tokenizer = llama
    lengths = [len(tokenizer.encode(p, add_special_tokens=False)) for p in PROMPTS]
    assert len(set(lengths)) > 4 and lengths != sorted(lengths)  # padding and reordering happen
    alone = [generate(model, tokenizer, [p], 6, batch_size=1)[0] for p in PROMPTS]
    assert len({c[0] for c in alone}) == len(PROMPTS)  # each prompt's answer is its own
    assert generate(model, tokenizer, PROMPTS, 6, batch_size=3) == alone
    assert generate(model, tokenizer, PROMPTS, 6) == alone  # batch size from free memory
    assert tasks_generate is generate  # the callers' import path


def test_generation_stops_when_every_sequence_has_ended(llama: tuple) -> None:
    """With end-of-text forced at every step, one forward pass (the prefill) is all it runs."""
    model, tokenizer = llama
    eos = tokenizer.eos_token_id
    calls = []

    def force_eos(_module: object, _inputs: object, logits: torch.Tensor) -> torch.Tensor:
        calls.append(logits.shape[0])
        logits = logits.clone()
        logits[..., eos] = 1e4
        return logits

    handle = model.lm_head.register_forward_hook(force_eos)
    try:
        completions = generate(model, tokenizer, PROMPTS, 10)
    finally:
        handle.remove()
    assert completions == [[""]] * len(PROMPTS)
    assert calls == [len(PROMPTS)]


def test_sampling_is_reproducible_from_the_seed_whatever_the_batch_size(llama: tuple) -> None:
    model, tokenizer = llama

    def draw(seed: int, batch_size: int | None) -> list[list[str]]:
        torch.manual_seed(seed)
        return generate(model, tokenizer, PROMPTS, 6, batch_size, samples=4, temperature=1.0)

    first = draw(0, None)
    assert [len(c) for c in first] == [4] * len(PROMPTS)
    assert draw(0, None) == first
    assert draw(0, 1) == first and draw(0, 3) == first
    assert draw(1, None) != first
    assert len({c for cs in first for c in cs}) > len(PROMPTS)  # samples of a prompt differ


def test_samples_share_their_prompts_prefill(llama: tuple, monkeypatch) -> None:
    """The prompt's tokens run once per prompt, not once per sample, and the samples are the
    ones a prefill of every row gives (what `generate` does without the shared cache)."""
    import eval.generation as generation

    model, tokenizer = llama
    rows: list[tuple[int, int]] = []
    hook = model.model.register_forward_hook(
        lambda _m, _a, kwargs, _o: rows.append(tuple(kwargs["input_ids"].shape)),
        with_kwargs=True,
    )
    try:
        torch.manual_seed(3)
        shared = generate(model, tokenizer, PROMPTS, 6, batch_size=8, samples=4)
    finally:
        hook.remove()
    width = max(len(tokenizer.encode(p, add_special_tokens=False)) for p in PROMPTS)
    assert rows[0] == (len(PROMPTS), width - 1)  # the prompts once, all but their last token
    assert rows[1] == (4 * len(PROMPTS), 1) and all(r[1] == 1 for r in rows[1:])
    monkeypatch.setattr(generation, "shared_prefill", lambda *_args: None)
    torch.manual_seed(3)
    assert generate(model, tokenizer, PROMPTS, 6, batch_size=8, samples=4) == shared


def test_seeded_sampler_draws_from_the_softmax_at_the_temperature() -> None:
    """Argmax of the processed logits picks each token as often as softmax(logits / T) says."""
    logits = torch.log(torch.tensor([[1.0, 2.0, 5.0]]))
    temperature = 2.0
    expected = torch.softmax(logits[0] / temperature, dim=-1)
    draws = 6000
    sampler = SeededSampler(list(range(draws)), temperature, steps=1)
    picked = sampler(torch.zeros(draws, 1), logits.expand(draws, 3)).argmax(dim=-1)
    frequency = torch.bincount(picked, minlength=3).double() / draws
    for p, f in zip(expected.tolist(), frequency.tolist(), strict=True):
        assert abs(f - p) < 4 * math.sqrt(p * (1 - p) / draws)  # within 4 standard errors


def test_memory_sized_batches_fit_the_budget_and_count_the_kv_cache(llama: tuple) -> None:
    model, tokenizer = llama
    prompt_tokens, new_tokens = 12, 8
    per_row = row_bytes(model.config, prompt_tokens, new_tokens, 4)
    for budget in (10 * per_row, 333 * per_row + 7, 10**9):
        rows = batch_rows(model, prompt_tokens, new_tokens, memory_bytes=budget, max_rows=10**6)
        assert rows * per_row <= MEMORY_FRACTION * budget < (rows + 1) * per_row
    assert batch_rows(model, prompt_tokens, new_tokens, memory_bytes=per_row // 10) == 1
    assert batch_rows(model, prompt_tokens, new_tokens, memory_bytes=10**12, max_rows=64) == 64
    # The estimate covers the cache the model really keeps for one sequence.
    ids = torch.ones(1, prompt_tokens + new_tokens, dtype=torch.long)
    with torch.inference_mode():
        cache = model(ids, use_cache=True).past_key_values
    kept = sum(
        t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
    )
    assert kept > 0 and per_row >= kept


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"batch_size": 0}, "batch_size=0"),
        ({"samples": 0}, "samples=0"),
        ({"samples": 2, "temperature": 0.0}, "temperature=0.0"),
    ],
)
def test_bad_settings_are_one_line_errors(llama: tuple, settings: dict, message: str) -> None:
    model, tokenizer = llama
    with pytest.raises(PipelineError, match=message) as raised:
        generate(model, tokenizer, PROMPTS, 4, **settings)
    assert "\n" not in str(raised.value)
