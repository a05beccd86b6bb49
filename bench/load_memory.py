"""Peak memory of loading a model directory on 2 ranks: naive (every rank reads the whole model)
against `pipeline.train.sharded_load.load_sharded` under FSDP2 and DeepSpeed ZeRO-3.

A ~100M-parameter llama is saved with save_pretrained (several safetensors files and their
index), then each way of loading runs under torchrun with 2 ranks (gloo on CPU) through the
pipeline's own `build_accelerator`. Each rank warms up on a tiny model of the same family the
same way (imports, code pages, DeepSpeed's ops), resets its peak RSS (/proc/self/clear_refs 5),
records its RSS as the baseline, loads, and reports VmHWM - baseline: the most memory the load
held at once above what the process had, file pages mapped by safetensors included (they count
in RSS while mapped). Naive: `from_pretrained` in fp32 on every rank, then `accelerator.prepare`
shards it with FSDP2. Target: <= 0.6x the model's fp32 bytes per rank under FSDP2 and ZeRO-3
(its own half plus about one tensor).

The TRL stages (sft, rlhf) make their TrainingArguments first and then load the policy with
`pipeline.stages.base_model.load_causal_lm`: `trl-zero3`, `trl-fsdp` and `trl-fsdp-lora` (a
rank-16 adapter on q_proj and v_proj) pass the arguments (a ZeRO-3 or FSDP2 launch of 2 ranks:
sharded, streamed load, pipeline.train.trl_load), `trl-naive` does not (`from_pretrained` whole
on every rank, as these stages did before). The reference model of GRPO/RLOO/DPO (beta > 0, no
adapter) is loaded by the same function as the policy (trl_load.load_for_trainer), so these
modes measure it too. `trl-reward-*`: the reward stage's sequence classifier
(`pipeline.stages.reward.training_reward_model`), naive (whole on every rank, as that stage did
before), under ZeRO-3 and under FSDP2.

    .venv/bin/python bench/load_memory.py [--hidden 768 --layers 12 --vocab 8192] [--modes ...]
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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from transformers import LlamaConfig, TrainingArguments

ROOT = Path(__file__).resolve().parents[1]
MODES = {
    "naive": {"nproc": 2, "engine": "fsdp"},
    "fsdp": {"nproc": 2, "engine": "fsdp"},
    "zero3": {"nproc": 2, "engine": "deepspeed", "zero_stage": 3},
    # The TRL stages (sft, rlhf): TrainingArguments first, then base_model.load_causal_lm.
    "trl-naive": {"nproc": 2, "engine": "deepspeed", "zero_stage": 3},
    "trl-zero3": {"nproc": 2, "engine": "deepspeed", "zero_stage": 3},
    "trl-fsdp": {"nproc": 2, "engine": "fsdp"},
    "trl-fsdp-lora": {"nproc": 2, "engine": "fsdp"},  # peft wraps the meta base, then FSDP2
    "trl-reward-naive": {"nproc": 2, "engine": "deepspeed", "zero_stage": 3},
    "trl-reward-zero3": {"nproc": 2, "engine": "deepspeed", "zero_stage": 3},
    "trl-reward-fsdp": {"nproc": 2, "engine": "fsdp"},
}


def llama_config(hidden: int, layers: int, vocab: int) -> LlamaConfig:
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64, intermediate_size=hidden * 8 // 3 // 64 * 64,
        vocab_size=vocab, max_position_embeddings=512, tie_word_embeddings=False,
    )  # fmt: skip


def status_mib(field: str) -> float:
    """A /proc/self/status memory field (VmRSS, VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def load(mode: str, model_dir: Path, accelerator: Accelerator | TrainingArguments) -> None:
    """Load model_dir the way `mode` names (the peak of this call is what is measured)."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.engine.inputs import Resolved
    from pipeline.engine.locations import Location
    from pipeline.stages.base_model import AdapterConfig, load_causal_lm
    from pipeline.train.sharded_load import load_sharded

    if mode.startswith("trl-reward-"):  # what the reward stage does
        from pipeline.stages.reward import training_reward_model

        model = training_reward_model(model_dir, None if "naive" in mode else accelerator, None)
        touch(model)
    elif mode.startswith("trl-"):  # what the sft and rlhf stages do, with or without the args
        source = Resolved("model", "bench", location=Location(path=str(model_dir)))
        adapter = (
            AdapterConfig(r=16, target_modules=["q_proj", "v_proj"]) if "lora" in mode else None
        )
        arguments = None if mode == "trl-naive" else accelerator
        touch(load_causal_lm(source, "bench", adapter, arguments))
    elif mode == "naive":
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        accelerator.prepare(model)
    else:
        load_sharded(model_dir, accelerator)


def touch(model: torch.nn.Module) -> None:
    """Read every weight, as training will: mapped file pages count once touched."""
    for param in model.parameters():
        local = getattr(param, "ds_tensor", param)
        float((local.to_local() if hasattr(local, "to_local") else local).sum())


def worker(mode: str, model_dir: Path, tiny_dir: Path, out: Path) -> None:
    import torch.distributed as dist

    from pipeline.engine.config import LaunchConfig
    from pipeline.train.distributed import TrainShape, build_accelerator

    shape = TrainShape(1, 1, int(os.environ["WORLD_SIZE"]))
    launch = LaunchConfig(**MODES[mode])
    if mode.startswith("trl-"):
        from transformers import TrainingArguments

        from pipeline.train.distributed import trainer_arguments

        arguments = trainer_arguments(launch, shape, ["LlamaDecoderLayer"])
        accelerator = TrainingArguments(str(out / "trainer"), use_cpu=True, **arguments)
        assert accelerator.world_size == 2  # (and so the process group is set up)
    else:
        accelerator = build_accelerator(launch, shape, ["LlamaDecoderLayer"])
    load(mode, tiny_dir, accelerator)  # warm-up: imports and one-time setup are not the load
    gc.collect()
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    baseline = status_mib("VmRSS")
    load(mode, model_dir, accelerator)
    peak = status_mib("VmHWM") - baseline
    result = {"rank": accelerator.process_index, "peak_mib": peak}
    (out / f"{mode}_{accelerator.process_index}.json").write_text(json.dumps(result))
    dist.barrier()


def save_models(args: argparse.Namespace, tmp: Path) -> tuple[Path, Path, int]:
    """The bench model (in ~100 MB files with an index) and the tiny warm-up model."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(args.hidden, args.layers, args.vocab))
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(tmp / "model", max_shard_size="100MB")
    del model
    LlamaForCausalLM(llama_config(64, 2, 128)).save_pretrained(tmp / "tiny")
    return tmp / "model", tmp / "tiny", params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--worker", choices=list(MODES))
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--tiny-dir", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.model_dir, args.tiny_dir, args.out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, tiny_dir, params = save_models(args, Path(tmp))
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
        peaks = {}
        for mode in args.modes:
            cmd = [
                sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                __file__, "--worker", mode, "--model-dir", str(model_dir),
                "--tiny-dir", str(tiny_dir), "--out", tmp,
            ]  # fmt: skip
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                sys.exit(f"{mode} failed:\n{proc.stderr[-3000:]}")
            peaks[mode] = [
                json.loads((Path(tmp) / f"{mode}_{r}.json").read_text())["peak_mib"]
                for r in range(2)
            ]
    model_mib = params * 4 / 2**20
    print(
        f"llama hidden={args.hidden} layers={args.layers} vocab={args.vocab}: "
        f"{params / 1e6:.1f}M params, {model_mib:.0f} MiB in fp32, {len(files)} safetensors "
        f"files; 2 ranks (gloo, CPU); peak RSS above the pre-load baseline"
    )
    for mode, ranks in peaks.items():
        shown = "  ".join(
            f"rank {r}: {mib:7.1f} MiB = {mib / model_mib:.3f}x" for r, mib in enumerate(ranks)
        )
        family = next(f for f in ("trl-reward-", "trl-", "") if mode.startswith(f))
        naive = peaks.get(f"{family}naive")
        versus = f"   worst rank / naive {max(ranks) / max(naive):.3f}" if naive else ""
        print(f"{mode:>16}: {shown}{versus}")
    print("target: every sharded mode <= 0.6x the model's fp32 bytes on every rank")


if __name__ == "__main__":
    main()
