"""Per-rank model-state memory (parameters + gradients + optimizer state) under DDP, ZeRO-2, ZeRO-3.

Each engine runs the same llama with 2 processes (gloo on CPU) through the pipeline's own
`build_accelerator`. After one optimizer step (so Adam state exists) and the backward of the
next micro batch (so gradients exist), every rank counts the bytes of all live tensors, each
storage once. Activations are freed by then, so what remains is the model state the ZeRO paper
partitions, plus each engine's communication buffers. Target: ZeRO-3 <= 0.6 of DDP with 2 ranks.

Expected (bytes per parameter, N ranks): DDP keeps fp32 weights, grads and Adam moments (16);
ZeRO-3 partitions all of it. In bf16 that is (2 + 2 + 4 + 8) / N = 8 at N=2, ratio 0.5; in fp32
DeepSpeed still keeps a separate fp32 master partition, (4 + 4 + 4 + 8) / 2 = 10, ratio 0.625.

    .venv/bin/python bench/zero_memory.py [--hidden 512 --layers 8] [--precision fp32|bf16]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINES = {
    "ddp": {"engine": "ddp"},
    "zero2": {"engine": "deepspeed", "zero_stage": 2},
    "zero3": {"engine": "deepspeed", "zero_stage": 3},
}


def live_tensor_bytes() -> int:
    """Bytes of every live tensor storage in this process, each storage counted once."""
    import torch

    gc.collect()
    seen: dict[int, int] = {}
    tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    # Gradients live in C++ until accessed, so they are not in gc's list: add them explicitly.
    tensors += [t.grad for t in tensors if t.grad is not None]
    for tensor in tensors:
        try:
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, ReferenceError):
            continue
    seen.pop(0, None)  # empty storages (ZeRO-3's released parameters)
    return sum(seen.values())


def worker(engine: str, hidden: int, layers: int, precision: str, out: Path) -> None:
    import torch

    from pipeline.engine.config import LaunchConfig
    from pipeline.models import build_model
    from pipeline.models.causal_lm import ModelConfig
    from pipeline.train.distributed import TrainShape, build_accelerator
    from pipeline.train.objectives import CausalLM

    torch.manual_seed(0)
    seq_len, vocab, micro = 64, 4096, 2
    built = build_model(
        ModelConfig(hidden_size=hidden, num_layers=layers, num_heads=hidden // 64), vocab, seq_len
    )
    shape = TrainShape(micro, 2, int(os.environ["WORLD_SIZE"]), precision)
    accelerator = build_accelerator(
        LaunchConfig(nproc=2, **ENGINES[engine]), shape, list(built.model._no_split_modules)
    )
    optimizer = torch.optim.AdamW(built.model.parameters(), lr=1e-4)
    model, optimizer = accelerator.prepare(built.model, optimizer)
    del built
    objective = CausalLM()
    tokens = torch.randint(
        0, vocab, (micro, seq_len + 1), generator=torch.Generator().manual_seed(1)
    )

    def micro_step() -> None:
        with accelerator.accumulate(model):
            with accelerator.autocast():
                loss, _ = objective.loss(model, tokens, None)
            accelerator.backward(loss)

    micro_step()
    micro_step()  # the second micro batch syncs and steps: Adam state now exists
    optimizer.step()
    optimizer.zero_grad()
    micro_step()  # gradients of the next step, not yet synced
    measured = live_tensor_bytes()
    accelerator.wait_for_everyone()
    result = {"rank": accelerator.process_index, "bytes": measured}
    (out / f"{engine}_{accelerator.process_index}.json").write_text(json.dumps(result))
    accelerator.wait_for_everyone()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--precision", choices=["fp32", "bf16"], action="append")
    parser.add_argument("--worker", choices=list(ENGINES))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.hidden, args.layers, args.precision[0], args.out)
        return
    for precision in args.precision or ["fp32", "bf16"]:
        measure(args, precision)


def measure(args: argparse.Namespace, precision: str) -> None:
    """Run every engine under torchrun with 2 ranks and print per-rank bytes and ratios."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for engine in ENGINES:
            cmd = [
                sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                __file__, "--worker", engine, "--out", str(out),
                "--hidden", str(args.hidden), "--layers", str(args.layers), "--precision", precision,
            ]  # fmt: skip
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                sys.exit(f"{engine} failed:\n{proc.stderr[-3000:]}")
        per_rank = {
            engine: max(
                json.loads((out / f"{engine}_{r}.json").read_text())["bytes"] for r in range(2)
            )
            for engine in ENGINES
        }
    print(
        f"llama hidden={args.hidden} layers={args.layers}, 2 ranks, {precision} + AdamW; largest rank shown"
    )
    for engine, measured in per_rank.items():
        ratio = measured / per_rank["ddp"]
        print(f"{engine:>6}: {measured / 2**20:8.1f} MiB per rank   ratio to DDP {ratio:.3f}")
    print(
        f"ZeRO-3 / DDP = {per_rank['zero3'] / per_rank['ddp']:.3f} ({precision}; target <= 0.6)\n"
    )


if __name__ == "__main__":
    main()
