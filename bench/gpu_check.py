"""GPU check: training throughput of the pipeline's models on one CUDA device, in minutes.

Prints tokens/s and MFU for a ~125M and a ~1B llama in bf16 (eager and torch.compile, SDPA
flash attention), plain packing against document masking (position_ids restart after each eos,
the pretrain objective's path), DeepSpeed ZeRO-2 and FSDP2 on one GPU (through the pipeline's own
`build_accelerator`), and DiT images/s. Models come from transformers/diffusers configs, data
is random tokens and latents: nothing is downloaded.

    bench/gpu_check.sh                               # CUDA: < 8 minutes; no CUDA: one line, exit 0
    .venv/bin/python bench/gpu_check.py --cpu-smoke  # every section, 2 steps, tiny models, CPU

Each group of sections runs in its own process, so an engine's global Accelerate/DeepSpeed state
never leaks into the next, and one failing (out of memory, a missing kernel) does not stop the rest.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere
BUDGET_S = 450.0  # the whole check, under the 8 minutes promised
EOS_ID = 2  # data_prep.tokenizer's eos
DOC_TOKENS = 512  # mean document length of the packed rows


@dataclass(frozen=True)
class Size:
    """A model and batch shape: llama sizes for LM sections, DiT for the image one."""

    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    seq_len: int
    micro_batch: int


LLAMA = {
    "125m": Size(768, 12, 12, 2048, 32000, 2048, 16),
    "1b": Size(2048, 18, 16, 5632, 32000, 2048, 4),
    "tiny": Size(64, 2, 4, 128, 512, 64, 2),
}
DIT = {"b2": Size(768, 12, 12, 0, 0, 32, 64), "tiny": Size(64, 2, 4, 0, 0, 8, 2)}  # seq = side


@dataclass(frozen=True)
class Section:
    """One measured configuration."""

    name: str
    size: str = "125m"
    compile: bool = False
    flash: bool = True  # force SDPA's flash backend (no mask may be passed then)
    document_mask: bool = False
    engine: str = "plain"  # plain (torch only) | zero2 | fsdp | dit
    cuda_only: str = ""  # why smoke mode skips it on a CPU


# Groups share a process; engines each get their own.
GROUPS: dict[str, list[Section]] = {
    "llama": [
        Section("llama-125m bf16 eager, SDPA flash"),
        Section("llama-125m bf16 compiled, SDPA flash", compile=True, cuda_only="inductor on CPU is slow"),
        Section("llama-1b bf16 eager, SDPA flash", size="1b"),
        Section("llama-1b bf16 compiled, SDPA flash", size="1b", compile=True, cuda_only="inductor on CPU is slow"),
        Section("llama-125m packed, plain attention", flash=False),
        Section("llama-125m packed, document mask", flash=False, document_mask=True),
    ],
    "zero2": [Section("llama-125m DeepSpeed ZeRO-2, 1 GPU", engine="zero2", flash=False)],
    "fsdp": [Section("llama-125m FSDP2, 1 GPU", engine="fsdp", flash=False,
                     cuda_only="Accelerate applies FSDP to one process on GPUs only")],
    "dit": [Section("DiT-B/2 on 32x32x4 latents", size="b2", engine="dit", flash=False)],
}  # fmt: skip


def main() -> int:
    """Run every group in its own process within the time budget; print one line per section."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="2 steps of tiny models on CPU")
    parser.add_argument("--group", choices=GROUPS, help="internal: run one group here")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per section")
    args = parser.parse_args()
    if args.group:
        run_group(args.group, args.cpu_smoke, 2 if args.cpu_smoke else args.steps)
        return 0
    import torch

    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("gpu_check: no CUDA device; nothing to measure (use --cpu-smoke to test the code)")
        return 0
    device = (
        torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (smoke: tiny models)"
    )
    print(f"gpu_check on {device}, torch {torch.__version__}, budget {BUDGET_S:.0f}s", flush=True)
    deadline, failed = time.monotonic() + BUDGET_S, 0
    for group in GROUPS:
        left = deadline - time.monotonic()
        if left < 20:
            print(f"  {group}: skipped, the {BUDGET_S:.0f}s budget is spent", flush=True)
            continue
        command = [sys.executable, __file__, "--group", group, "--steps", str(args.steps)]
        command += ["--cpu-smoke"] if args.cpu_smoke else []
        try:
            done = subprocess.run(command, env=single_rank_env(), timeout=left, check=False)
            failed += done.returncode != 0
        except subprocess.TimeoutExpired:
            print(f"  {group}: stopped at the budget's end", flush=True)
            failed += 1
    return 1 if failed else 0


def single_rank_env() -> dict[str, str]:
    """torchrun's variables for one process, so Accelerate and DeepSpeed set up a world of 1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip


def run_group(group: str, smoke: bool, steps: int) -> None:
    """Measure each section of `group` in this process; a failing section prints its error."""
    import torch

    for section in GROUPS[group]:
        if smoke and section.cuda_only and not torch.cuda.is_available():
            print(f"  {section.name}: skipped in CPU smoke ({section.cuda_only})", flush=True)
            continue
        started = time.monotonic()
        try:
            line = measure(section, smoke, steps)
        except Exception as exc:  # noqa: BLE001 - report it and go on with the next section
            line = f"FAILED {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
        print(f"  {section.name}: {line} [{time.monotonic() - started:.0f}s]", flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        torch._dynamo.reset()


def measure(section: Section, smoke: bool, steps: int) -> str:
    """Train `steps` timed steps (after warm-up) of one section; its throughput line."""
    if section.engine == "dit":
        return measure_dit(DIT["tiny" if smoke else section.size], smoke, steps)
    import torch

    from pipeline.train import flops
    from pipeline.train.objectives import CausalLM

    size = LLAMA["tiny" if smoke else section.size]
    model = build_llama(size)
    step_fn = make_step(section, model, smoke)
    objective = CausalLM(EOS_ID if section.document_mask else None)
    batch_rng = torch.Generator().manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokens = random_tokens(size, batch_rng).to(device)
    seconds = timed(lambda: step_fn(objective, tokens), steps, warmup=1 if smoke else 3)
    tokens_per_second = size.micro_batch * size.seq_len / seconds
    per_token = flops.flops_per_token(flops.matmul_params(model), size.layers, size.hidden,
                                      size.seq_len)  # fmt: skip
    peak = flops.peak_flops(flops.device_name(), "bf16")
    mfu = flops.mfu(tokens_per_second, per_token, peak)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    shown = f"MFU {mfu:.1%}" if mfu is not None else "MFU n/a (no known peak)"
    return (f"{tokens_per_second:,.0f} tokens/s, {shown}, {params:,.1f}M params, "
            f"{size.micro_batch}x{size.seq_len} tokens/step")  # fmt: skip


def build_llama(size: Size) -> Any:
    """A llama from a transformers config (fp32 master weights; autocast computes in bf16)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.ffn,
        num_hidden_layers=size.layers, num_attention_heads=size.heads,
        max_position_embeddings=size.seq_len, tie_word_embeddings=size.hidden < 1024,
        attn_implementation="sdpa",
    )  # fmt: skip
    return LlamaForCausalLM(config)


def random_tokens(size: Size, generator: Any) -> Any:
    """Rows [B, T + 1] of random ordinary ids with an eos about every DOC_TOKENS tokens."""
    import torch

    shape = (size.micro_batch, size.seq_len + 1)
    tokens = torch.randint(4, size.vocab, shape, generator=generator)
    ends = torch.rand(shape, generator=generator) < 1 / min(DOC_TOKENS, size.seq_len // 4)
    return tokens.masked_fill(ends, EOS_ID)


def make_step(section: Section, model: Any, smoke: bool) -> Any:
    """step(objective, tokens): one optimizer step of the section's engine."""
    import torch

    from pipeline.train.optim import OptimConfig, build_optimizer

    cuda = torch.cuda.is_available()
    if section.engine in ("zero2", "fsdp"):
        return accelerate_step(section, model, cuda)
    device = "cuda" if cuda else "cpu"
    model.to(device).train()
    optimizer = build_optimizer(model, OptimConfig())
    forward = torch.compile(model) if section.compile else model
    attention = flash_only() if section.flash and cuda else nullcontext()
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=cuda)

    def step(objective: Any, tokens: Any) -> None:
        with attention, autocast:
            loss, _ = objective.loss(forward, tokens, None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def flash_only() -> Any:
    """SDPA restricted to the flash kernel: a section that silently fell back would mislead."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])


def accelerate_step(section: Section, model: Any, cuda: bool) -> Any:
    """One step through the pipeline's own engine setup (ZeRO-2 or FSDP2) in a world of 1."""
    from pipeline.engine.config import LaunchConfig
    from pipeline.train.distributed import TrainShape, build_accelerator, fill_deepspeed_buckets
    from pipeline.train.optim import OptimConfig, build_optimizer

    launch = LaunchConfig(engine="deepspeed" if section.engine == "zero2" else "fsdp", zero_stage=2)
    shape = TrainShape(LLAMA["tiny" if not cuda else section.size].micro_batch, 1, 1,
                       "bf16" if cuda else "fp32", 1.0)  # fmt: skip
    accelerator = build_accelerator(launch, shape, list(model._no_split_modules))
    optimizer = build_optimizer(model, OptimConfig())
    fill_deepspeed_buckets(accelerator, model)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    prepared.train()

    def step(objective: Any, tokens: Any) -> None:
        with accelerator.autocast():
            loss, _ = objective.loss(prepared, tokens.to(accelerator.device), None)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(prepared.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure_dit(size: Size, smoke: bool, steps: int) -> str:
    """Images/s of a class-conditional DiT trained with the pipeline's flow-matching objective."""
    import torch

    from pipeline.diffusion.objectives import DiffusionObjective, ObjectiveConfig
    from pipeline.models.diffusion import DiffusionModelConfig, build_dit
    from pipeline.train.optim import OptimConfig, build_optimizer

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    num_classes, channels = 1000, 4
    cfg = DiffusionModelConfig(arch="dit", hidden_size=size.hidden, num_layers=size.layers,
                               num_heads=size.heads, patch_size=2)  # fmt: skip
    torch.manual_seed(0)
    model = build_dit(cfg, channels, size.seq_len, num_classes, "gpu_check").to(device).train()
    optimizer = build_optimizer(model, OptimConfig())
    objective = DiffusionObjective(ObjectiveConfig(), num_classes, 0.1, clip_sample=False)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(size.micro_batch, channels, size.seq_len, size.seq_len).to(device)
    labels = torch.randint(0, num_classes, (size.micro_batch,), generator=generator).to(device)

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            loss, _ = objective.loss(model, latents, labels, generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = timed(step, steps, warmup=1 if smoke else 3)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return f"{size.micro_batch / seconds:,.1f} images/s, {params:,.1f}M params, batch {size.micro_batch}"


def timed(step: Any, steps: int, warmup: int) -> float:
    """Seconds per step over `steps` steps after `warmup` untimed ones (compilation, autotune)."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - started) / steps


if __name__ == "__main__":
    sys.exit(main())
