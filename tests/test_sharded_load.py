"""Loading at scale (pipeline/train/sharded_load.py): a model directory streamed into FSDP2
shards or ZeRO-3 partitions on 2 real ranks (gloo) holds exactly the directory's weights, keeps
them through the first optimizer step, and computes the logits of transformers' own
`from_pretrained` in one process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.engine.errors import PipelineError
from tests import hf_models
from tests.spawn import run_distributed

# 101 rows: FSDP2's 2 shards of the embedding are 51 and 50 rows
SHAPE = {**hf_models.SHAPE, "vocab_size": 101}
TOKENS = [[1, 5, 9, 33, 2, 77, 100, 4], [3, 3, 64, 12, 8, 50, 0, 99]]
ENGINES = {
    "fsdp": {"nproc": 2, "engine": "fsdp"},
    "zero3": {"nproc": 2, "engine": "deepspeed", "zero_stage": 3},
}
BLOCKS = {"llama": "LlamaDecoderLayer", "qwen2": "Qwen2DecoderLayer"}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """llama: untied fp32 weights in several files with an index; qwen2: tied embeddings,
    stored in bf16, one file."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("sharded_load")
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**SHAPE, tie_word_embeddings=False))
    llama.save_pretrained(root / "llama", max_shard_size="100KB")
    qwen2 = Qwen2ForCausalLM(Qwen2Config(**SHAPE, tie_word_embeddings=True))
    qwen2.to(torch.bfloat16).save_pretrained(root / "qwen2")
    assert (root / "llama" / "model.safetensors.index.json").is_file()
    assert len(list((root / "llama").glob("*.safetensors"))) > 1
    return {"llama": root / "llama", "qwen2": root / "qwen2"}


def file_tensors(model_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    tensors: dict[str, Any] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def reference(model_dir: Path) -> tuple[Any, Any]:
    """transformers' own fp32 load in this process: its logits on TOKENS, and the model."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=torch.tensor(TOKENS)).logits, model


def _load_prepare_step(engine: str, model_dirs: dict[str, str]) -> dict[str, Any]:
    """On each rank: load every model as the training loop would (load_sharded, then the
    optimizer and accelerator.prepare), take logits, take one AdamW step with lr 0 (DeepSpeed
    writes its fp32 master copy back into the weights: one made before loading would show),
    then gather the full state dict (rank 0)."""
    import torch
    from accelerate.state import AcceleratorState, GradientState

    from pipeline.engine.config import LaunchConfig
    from pipeline.train.distributed import TrainShape, build_accelerator
    from pipeline.train.sharded_load import load_sharded

    results = {}
    for name, model_dir in model_dirs.items():
        AcceleratorState._reset_state()  # one model per Accelerator (DeepSpeed allows no more)
        GradientState._reset_state()
        launch = LaunchConfig(**ENGINES[engine])
        accelerator = build_accelerator(launch, TrainShape(1, 1, 2), [BLOCKS[name]])
        model = load_sharded(Path(model_dir), accelerator)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.0)
        model, optimizer = accelerator.prepare(model, optimizer)
        logits = model(input_ids=torch.tensor(TOKENS)).logits
        accelerator.backward(logits.float().square().mean())
        optimizer.step()
        optimizer.zero_grad()
        state = accelerator.get_state_dict(model)
        main = accelerator.is_main_process
        results[name] = {
            "logits": logits.detach().cpu(),
            "state": {k: v.detach().cpu() for k, v in state.items()} if main else None,
        }
    return results


@pytest.mark.parametrize("engine", ["fsdp", pytest.param("zero3", marks=pytest.mark.slow)])
def test_sharded_load_holds_the_files_weights_and_gives_from_pretrained_logits(
    model_dirs: dict[str, Path], engine: str
) -> None:
    import torch

    ranks = run_distributed(
        _load_prepare_step, engine, {name: str(path) for name, path in model_dirs.items()}
    )
    for name, model_dir in model_dirs.items():
        want_logits, want = reference(model_dir)
        want_state = want.state_dict()
        for rank, result in enumerate(ranks):
            diff = (result[name]["logits"] - want_logits).abs().max().item()
            assert diff <= 1e-6, f"{engine} {name} rank {rank}: logits differ by {diff}"
        state = ranks[0][name]["state"]
        assert set(state) == set(want_state), f"{engine} {name}: other keys than from_pretrained"
        stored = file_tensors(model_dir)
        for key, tensor in stored.items():
            assert state[key].dtype == torch.float32, f"{key}: loaded as {state[key].dtype}"
            assert torch.equal(state[key], tensor.float()), f"{engine} {name}: {key} differs"
        if name == "qwen2":  # tied: the file holds the embedding only, lm_head is the same
            assert "lm_head.weight" not in stored
            assert torch.equal(state["lm_head.weight"], stored["model.embed_tokens.weight"].float())


def _train_loaded(run_dir: Path, model_dir: str, engine: str) -> float:
    """One step of the training loop on a model it loads at scale (Workload.load_weights) with a
    negligible learning rate: the validation loss after it."""
    import functools

    import numpy as np

    from pipeline.engine.config import validate_recipe
    from pipeline.engine.context import StageContext
    from pipeline.train.loop import Workload, train
    from pipeline.train.sharded_load import causal_lm_from_config, load_sharded, on_meta

    stage = {"kind": "pretrain", "max_steps": 1, "micro_batch_size": 2, "eval_every": 1,
             "checkpoint_every": 1, "schedule": {"warmup_steps": 0}, "optim": {"lr": 1e-12}}  # fmt: skip
    recipe = validate_recipe({"name": "load", "run_dir": str(run_dir), "tracking": {"mode": "disabled"},
                              "launch": ENGINES[engine], "stages": {"pretrain": stage}})  # fmt: skip
    ctx = StageContext(run_dir=run_dir, name="pretrain", recipe=recipe, fingerprint="load")
    batch = np.array(TOKENS)

    def loss(model: Any, tokens: Any, generator: object) -> tuple[Any, dict]:
        return model(input_ids=tokens, labels=tokens).loss, {}

    work = Workload(
        on_meta(lambda: causal_lm_from_config(Path(model_dir))), loss,
        lambda step, micro, rank, world: batch, lambda rank, world: [batch], "sequences",
        [BLOCKS["llama"]], load_weights=functools.partial(load_sharded, Path(model_dir)),
    )  # fmt: skip
    return train(ctx, ctx.config, work).summary["val_loss"]  # type: ignore[arg-type]


@pytest.mark.parametrize("engine", ["fsdp", pytest.param("zero3", marks=pytest.mark.slow)])
def test_the_loop_trains_the_model_its_workload_loads(
    model_dirs: dict[str, Path], tmp_path: Path, engine: str
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = model_dirs["llama"]
    losses = run_distributed(_train_loaded, tmp_path, str(model_dir), engine)
    reference_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        tokens = torch.tensor(TOKENS)
        want = reference_model(input_ids=tokens, labels=tokens).loss.item()
    assert losses[0] == losses[1] == pytest.approx(want, rel=1e-5)


def test_one_process_loads_what_from_pretrained_loads(model_dirs: dict[str, Path]) -> None:
    """Without a sharding engine every rank holds the model; still read one tensor at a time."""
    import torch

    from pipeline.engine.config import LaunchConfig
    from pipeline.train.distributed import TrainShape, build_accelerator
    from pipeline.train.sharded_load import load_sharded

    accelerator = build_accelerator(LaunchConfig(), TrainShape(1, 1, 1), [])
    for name, model_dir in model_dirs.items():
        model = load_sharded(model_dir, accelerator)
        want_logits, want = reference(model_dir)
        state, want_state = model.state_dict(), want.state_dict()
        assert set(state) == set(want_state)
        assert all(torch.equal(state[k], want_state[k]) for k in state), name
        buffers, want_buffers = dict(model.named_buffers()), dict(want.named_buffers())
        assert set(buffers) == set(want_buffers)  # rotary inv_freq: not in the files
        assert all(torch.equal(buffers[k], want_buffers[k]) for k in buffers), name
        if name == "qwen2":
            assert model.lm_head.weight is model.model.embed_tokens.weight
        with torch.no_grad():
            logits = model(input_ids=torch.tensor(TOKENS)).logits
        assert torch.equal(logits, want_logits), name


def test_a_base_model_checkpoint_fills_the_lm_through_its_prefix(tmp_path: Path) -> None:
    """GPT-2's hub files hold GPT2Model's tensors (h.0..., wte): the LM's are transformer.h.0...,
    and its lm_head is tied to transformer.wte."""
    import torch
    from transformers import GPT2Config, GPT2Model

    from pipeline.engine.config import LaunchConfig
    from pipeline.train.distributed import TrainShape, build_accelerator
    from pipeline.train.sharded_load import load_sharded

    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=101, n_positions=32)
    GPT2Model(config).save_pretrained(tmp_path / "gpt2")
    accelerator = build_accelerator(LaunchConfig(), TrainShape(1, 1, 1), [])
    model = load_sharded(tmp_path / "gpt2", accelerator).eval()  # GPT-2 has dropout
    want_logits, _ = reference(tmp_path / "gpt2")
    with torch.no_grad():
        assert torch.equal(model(input_ids=torch.tensor(TOKENS)).logits, want_logits)


def test_a_weight_the_files_lack_is_named_in_one_line(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    from pipeline.engine.config import LaunchConfig
    from pipeline.train.distributed import TrainShape, build_accelerator
    from pipeline.train.sharded_load import load_sharded

    broken = tmp_path / "qwen2"
    broken.mkdir()
    (broken / "config.json").write_text((model_dirs["qwen2"] / "config.json").read_text())
    tensors = file_tensors(model_dirs["qwen2"])
    del tensors["model.norm.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    accelerator = build_accelerator(LaunchConfig(), TrainShape(1, 1, 1), [])
    with pytest.raises(PipelineError, match=r"no weights for model\.norm\.weight;"):
        load_sharded(broken, accelerator)


def test_a_config_that_disagrees_with_the_weights_is_named(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    from pipeline.engine.config import LaunchConfig
    from pipeline.train.distributed import TrainShape, build_accelerator
    from pipeline.train.sharded_load import load_sharded

    wrong = tmp_path / "llama"
    shutil.copytree(model_dirs["llama"], wrong)
    config = json.loads((wrong / "config.json").read_text())
    config["intermediate_size"] = 96
    (wrong / "config.json").write_text(json.dumps(config))
    accelerator = build_accelerator(LaunchConfig(), TrainShape(1, 1, 1), [])
    with pytest.raises(PipelineError, match=r"gate_proj\.weight has shape \(128, 64\).*\(96, 64\)"):
        load_sharded(wrong, accelerator)
