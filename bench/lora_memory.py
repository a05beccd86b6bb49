"""LoRA against full fine-tuning on the same llama and batch: trainable parameters, AdamW state
bytes and seconds per step.

The adapter is the one the post-training stages train by default (`AdapterConfig()`: peft
LoRA, r=16, alpha=32, all-linear, so every projection of every block is adapted and lm_head
is not). Both contenders start from the same weights and train on the same token batches with
the same AdamW. After a step, every tensor of the optimizer's state is counted (exp_avg,
exp_avg_sq, step). Step time is forward + backward + update; the contenders take turns, each
round runs `--block` steps of one then of the other, so a change in the machine's load hits
both alike, and the figure is the median of the per-round ratios of median step times with a
95% bootstrap interval over rounds (as bench/pretrain_overhead.py).

    .venv/bin/python bench/lora_memory.py [--hidden 512 --layers 6 --vocab 8192] [--rounds 12]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from pretrain_overhead import paired_ratio
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.stages.base_model import AdapterConfig


def llama(hidden: int, layers: int, vocab: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64, intermediate_size=hidden * 8 // 3 // 64 * 64,
        vocab_size=vocab, max_position_embeddings=1024, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps per parameter (AdamW: moments and step)."""
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )


def stepper(
    model: torch.nn.Module, batches: list[torch.Tensor], lr: float
) -> tuple[Callable[[], None], torch.optim.Optimizer]:
    """One AdamW step on the next batch per call, over the model's trainable parameters."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, foreach=True)
    order = iter(batches)

    def step() -> None:
        tokens = next(order)
        loss = model(input_ids=tokens, labels=tokens).loss  # transformers shifts the labels
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, optimizer


def timed(step: Callable[[], None], n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--block", type=int, default=3, help="steps of each contender per round")
    args = parser.parse_args()
    from peft import get_peft_model

    full = llama(args.hidden, args.layers, args.vocab)
    lora = get_peft_model(copy.deepcopy(full), AdapterConfig().peft_config("CAUSAL_LM"))
    steps = 1 + args.rounds * args.block
    generator = torch.Generator().manual_seed(1)
    shape = (args.batch, args.seq_len)
    batches = [torch.randint(0, args.vocab, shape, generator=generator) for _ in range(steps)]
    contenders = {"full": stepper(full, batches, 1e-4), "lora": stepper(lora, batches, 1e-4)}
    for step, _ in contenders.values():
        step()  # the first step allocates the optimizer state and warms up the kernels
    medians: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, (step, _) in contenders.items():
            medians[name].append(statistics.median(timed(step, args.block)))

    def trainable(model: torch.nn.Module) -> int:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    total = sum(p.numel() for p in full.parameters())
    state = {name: optimizer_state_bytes(opt) for name, (_, opt) in contenders.items()}
    print(
        f"llama hidden={args.hidden} layers={args.layers} vocab={args.vocab}: {total / 1e6:.1f}M "
        f"params; batch {args.batch} x {args.seq_len} tokens; AdamW; LoRA r=16 all-linear "
        f"(peft); {torch.get_num_threads()} threads; rounds {args.rounds} x {args.block} steps"
    )
    for name in contenders:
        print(
            f"{name:>4}: trainable {trainable(full if name == 'full' else lora) / 1e6:8.3f}M  "
            f"optimizer state {state[name] / 2**20:8.2f} MiB  "
            f"step {statistics.median(medians[name]) * 1000:7.1f} ms (median of rounds)"
        )
    point, low, high = paired_ratio(medians["lora"], medians["full"])
    print(f"trainable params LoRA / full:     {trainable(lora) / trainable(full):.4f}")
    print(f"optimizer state bytes LoRA / full: {state['lora'] / state['full']:.4f}")
    print(f"step time LoRA / full:             {point:.3f}  [95% {low:.3f}, {high:.3f}]")


if __name__ == "__main__":
    main()
