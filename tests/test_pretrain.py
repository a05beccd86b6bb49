"""Pretraining end to end: DDP replicas agree, kill -9 + resume is exact, exports load, W&B offline."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from pipeline.engine.manifest import read_manifest
from pipeline.engine.tracking import read_metrics
from tests.helpers import cli, kill_then_resume, tiny_recipe, write_recipe

pytestmark = pytest.mark.e2e  # every test here runs `pipeline` in a subprocess


def _pretrain_recipe(run_dir: Path, **pretrain: object) -> dict:
    data = tiny_recipe(run_dir)
    del data["stages"]["eval"]
    data["stages"]["pretrain"].update(pretrain)
    return data


def _load_weights(export: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(export / "model.safetensors")


@pytest.mark.slow
def test_ddp_two_processes_end_with_identical_replicas(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "tiny"
    data = _pretrain_recipe(run_dir, launch={"nproc": 2})
    result = cli("run", str(write_recipe(tmp_path / "r.yaml", data)))
    assert result.returncode == 0, result.stdout + result.stderr
    manifest = read_manifest(run_dir / "pretrain")
    digests = manifest["summary"]["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert (run_dir / "pretrain" / "logs" / "rank1.log").is_file()
    newest = sorted((run_dir / "pretrain" / "checkpoints").glob("step_*"))[-1]
    assert (newest / "random_states_1.pkl").is_file()  # both ranks saved their state


@pytest.mark.slow
def test_kill_9_then_rerun_gives_the_uninterrupted_export(tmp_path: Path) -> None:
    import torch

    settings = {
        "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 2},
        "seq_len": 64,
        "micro_batch_size": 8,
        "max_steps": 60,
        "checkpoint_every": 5,
        "keep_checkpoints": 20,  # step_10 stays until the end: the kill cannot miss it on a busy CPU
        "eval_every": 20,
    }
    recipe = _pretrain_recipe(tmp_path / "unused", **settings)
    reference, killed = kill_then_resume(tmp_path, recipe, "pretrain/checkpoints/step_00000010")
    manifest = read_manifest(killed / "pretrain")
    assert manifest["status"] == "done" and manifest["attempts"] == 2
    assert "resuming from step_" in (killed / "pretrain" / "stage.log").read_text()
    ours, theirs = (
        _load_weights(killed / "pretrain" / "export"),
        _load_weights(reference / "pretrain" / "export"),
    )
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    steps = [row["step"] for row in read_metrics(killed / "pretrain") if "train/loss" in row]
    assert steps == sorted(set(steps)), "resumed run logged some steps twice"


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp_path = tmp_path_factory.mktemp("offline")
    run_dir = tmp_path / "runs" / "tiny"
    data = _pretrain_recipe(run_dir)
    data["tracking"] = {"mode": "offline", "project": "pipeline-tests"}
    data["launch"] = {"nproc": 2}
    temp = tmp_path / "temp"  # the run's temporary folder, for the test below
    temp.mkdir()
    result = cli(
        "run", str(write_recipe(tmp_path / "r.yaml", data)), extra_env={"TMPDIR": str(temp)}
    )
    assert result.returncode == 0, result.stderr
    return run_dir


def test_a_run_leaves_nothing_in_the_temporary_folder(offline_run: Path) -> None:
    """Two ranks under torchrun, W&B offline: torchrun's log folders and W&B's media and artifact
    folders (made on import, removed by finalizers a rank's fast exit skips) are all gone."""
    temp = offline_run.parent.parent / "temp"
    left = sorted(p.name for p in temp.iterdir() if not p.name.startswith("torchinductor_"))
    assert left == [], left  # torchinductor_<user>: the compiler's cache, kept on purpose


def test_export_loads_in_transformers_and_generates(offline_run: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    export = offline_run / "pretrain" / "export"
    model = AutoModelForCausalLM.from_pretrained(export)
    assert model.config.model_type == "llama"
    tokenizer = AutoTokenizer.from_pretrained(export)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    out = generator("def main():\n", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert out.startswith("def main():\n") and len(out) > len("def main():\n")


def _wandb_records(path: Path) -> list:
    """Records of a W&B .wandb file (LevelDB-style log of protobuf Records)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, payload, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            records.append(record)
            payload = b""
        elif kind == 0:
            break
    return records


def test_offline_wandb_run_holds_the_logged_metrics(offline_run: Path) -> None:
    import json

    manifest = read_manifest(offline_run / "pretrain")
    run_files = list((offline_run / "pretrain" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1 and manifest["wandb_id"] in run_files[0].name
    history = [
        r.history for r in _wandb_records(run_files[0]) if r.WhichOneof("record_type") == "history"
    ]
    logged = {}
    for item in history:
        values = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in item.item}
        if "train/loss" in values:
            logged[values["_step"]] = values["train/loss"]
    jsonl = {
        r["step"]: r["train/loss"]
        for r in read_metrics(offline_run / "pretrain")
        if "train/loss" in r
    }
    assert logged and logged == pytest.approx(jsonl)


@pytest.mark.slow
def test_failing_ranks_show_their_error_not_launcher_noise(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "tiny"
    data = _pretrain_recipe(run_dir, launch={"nproc": 2}, seq_len=1_000_000)
    result = cli("run", str(write_recipe(tmp_path / "r.yaml", data)))
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "needs at least seq_len+1" in errors[0], result.stderr
    for noise in ("Traceback", "ChildFailedError", "torch.distributed.elastic"):
        assert noise not in result.stderr + result.stdout
    manifest = read_manifest(run_dir / "pretrain")
    assert manifest["status"] == "failed" and "seq_len" in manifest["error"]


def test_gpt2_option_trains_and_exports(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "runs" / "tiny"
    data = _pretrain_recipe(
        run_dir, model={"arch": "gpt2", "hidden_size": 32, "num_layers": 2, "num_heads": 2}
    )
    result = cli("run", str(write_recipe(tmp_path / "r.yaml", data)))
    assert result.returncode == 0, result.stderr
    model = AutoModelForCausalLM.from_pretrained(run_dir / "pretrain" / "export")
    assert model.config.model_type == "gpt2" and model.config.n_layer == 2
    losses = [r["train/loss"] for r in read_metrics(run_dir / "pretrain") if "train/loss" in r]
    assert losses[-1] < losses[0]
