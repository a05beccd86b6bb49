"""Golden trace of the training loops: per-step losses, grad norms, LRs, val losses and a digest
of every exported tensor, for short runs of each loop-driven stage kind.

Recorded once before the training loop was moved (`python -m tests.golden_trace --record`) and
compared bit for bit by tests/test_golden.py: code moves must not change a single float.
Floats go through JSON, whose repr round-trips doubles exactly.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from tests.helpers import cli, write_recipe

GOLDEN = Path(__file__).parent / "golden" / "trace.json"
# Float results depend on the CPU's kernels (oneDNN/BLAS pick per instruction set and vendor):
# a trace recorded by the unchanged code on another kind of CPU sits beside it, named by
# `machine()`, and is the bit-for-bit reference there.
TRACED_KEYS = ("train/loss", "train/grad_norm", "train/lr", "val/loss", "val/ema_loss")
# The kernel the trace was recorded with (the loop's default became fused AdamW afterwards).
# The image stages spell out every optim value they were recorded with: a partial optim block
# used to fall back to pretrain's defaults, not the image stages' own.
KERNEL = {"optim": {"kernel": "loop"}}


def machine() -> str:
    """What decides this machine's float results: torch's CPU capability, vendor, family, model."""
    import torch

    info: dict[str, str] = {}
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    parts = [torch.backends.cpu.get_cpu_capability(), info.get("vendor_id", "unknown"),
             info.get("cpu family", "0"), info.get("model", "0")]  # fmt: skip
    return "-".join(p.replace(" ", "_") for p in parts)


def golden_for_machine() -> Path:
    """The reference trace of this kind of CPU (recorded by the code before a change)."""
    return GOLDEN.parent / f"trace-{machine()}.json"


def _text_stages(pretrain: dict[str, Any]) -> dict[str, Any]:
    source = {"uri": "builtin:python-stdlib", "max_bytes": 300_000}
    return {
        "tokenizer": {"kind": "tokenizer", "source": source, "vocab_size": 400,
                      "sample_bytes": 300_000},
        "tokenize": {"kind": "tokenize", "after": ["tokenizer"], "source": source,
                     "num_workers": 1},
        "pretrain": {"kind": "pretrain", "after": ["tokenize"], "seq_len": 32,
                     "micro_batch_size": 4, "checkpoint_every": 100, **pretrain},
    }  # fmt: skip


def recipes(run_root: Path, with_kernel: bool) -> dict[str, dict[str, Any]]:
    """name -> recipe of each traced run (with_kernel: pin the optimizer kernel of the trace)."""
    pin = KERNEL if with_kernel else {}
    llama = {"model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2}, "max_steps": 30,
             "grad_accum_steps": 2, "schedule": {"warmup_steps": 5}, "log_every": 1,
             "eval_every": 10, "eval_batches": 2, **pin}  # fmt: skip
    mixtral = {"model": {"arch": "mixtral", "hidden_size": 32, "num_layers": 2, "num_heads": 2,
                         "num_experts": 4, "experts_per_token": 2},
               "max_steps": 10, "schedule": {"warmup_steps": 2}, "log_every": 1,
               "eval_every": 5, "eval_batches": 1, **pin}  # fmt: skip
    images = {"kind": "images", "source": {"uri": "builtin:digits", "max_images": 400}}
    diffusion = {"kind": "diffusion", "after": ["images"],
                 "model": {"arch": "dit", "hidden_size": 32, "num_layers": 2, "num_heads": 2},
                 "micro_batch_size": 16, "grad_accum_steps": 2, "max_steps": 20,
                 "optim": {"lr": 2e-3, "weight_decay": 0.1, "beta2": 0.95, **pin.get("optim", {})},
                 "schedule": {"warmup_steps": 5},
                 "ema_decay": 0.9, "log_every": 1, "eval_every": 10, "checkpoint_every": 100,
                 "cpu_threads": 1}  # fmt: skip
    vae = {"kind": "vae", "after": ["images"], "max_steps": 10, "micro_batch_size": 16,
           "schedule": {"warmup_steps": 2}, "log_every": 1, "eval_every": 5,
           "checkpoint_every": 100, "cpu_threads": 1,
           "optim": {"lr": 1e-3, "weight_decay": 0.0, "beta2": 0.999, **pin.get("optim", {})},
           "model": {"block_out_channels": [8, 16], "latent_channels": 2,
                     "norm_num_groups": 4}}  # fmt: skip
    base = {"tracking": {"mode": "disabled"}, "launch": {"nproc": 1}}
    return {
        "pretrain-llama": {**base, "stages": _text_stages(llama)},
        "pretrain-mixtral-ddp2": {**base, "launch": {"nproc": 2}, "stages": _text_stages(mixtral)},
        "diffusion-dit": {**base, "stages": {"images": images, "diffusion": diffusion}},
        "vae": {**base, "stages": {"images": images, "vae": vae}},
    }


def _digest(export: Path) -> str:
    """sha256 over every tensor (name, dtype, shape, bytes) of every safetensors file in export."""
    from safetensors.numpy import load_file

    digest = hashlib.sha256()
    for path in sorted(export.rglob("*.safetensors")):
        for name, array in sorted(load_file(path).items()):
            digest.update(f"{path.relative_to(export)}:{name}:{array.dtype}:{array.shape}".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


def trace(run_root: Path, with_kernel: bool = True) -> dict[str, Any]:
    """Run every traced recipe under run_root and collect its trace."""
    from pipeline.engine.tracking import read_metrics

    out: dict[str, Any] = {}
    for name, recipe in recipes(run_root, with_kernel).items():
        run_dir = run_root / name
        path = write_recipe(run_root / f"{name}.yaml", {"name": name, "run_dir": str(run_dir),
                                                        **recipe})  # fmt: skip
        result = cli("run", str(path))
        assert result.returncode == 0, result.stdout + result.stderr
        stage = next(s for s in recipe["stages"] if s in ("pretrain", "diffusion", "vae"))
        rows = [
            {"step": r["step"], **{k: r[k] for k in TRACED_KEYS if k in r}}
            for r in read_metrics(run_dir / stage)
        ]
        summary = json.loads((run_dir / stage / "summary.json").read_text())
        out[name] = {
            "rows": [r for r in rows if len(r) > 1],
            "val_loss": summary["metrics"]["val_loss"],
            "export_sha256": _digest(run_dir / stage / "export"),
        }
    return out


if __name__ == "__main__":
    import tempfile

    # Recorded before `optim.kernel` existed, hence without the pin.
    assert sys.argv[1:] in (["--record"], ["--print"]), "usage: --record | --print"
    with tempfile.TemporaryDirectory() as tmp:
        result = trace(Path(tmp), with_kernel=False)
    text = json.dumps(result, indent=1, sort_keys=True)
    if sys.argv[1] == "--record":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text + "\n")
    print(text[:2000])
