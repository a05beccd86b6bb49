"""Export round trip and provenance (pipeline/train/export.py, provenance.py, checkpoint.py), in
process on real tiny runs: transformers loads the export back with the trained model's logits, a
tampered export fails on every rank with one line and is removed, and checkpoints and exports
say which config, code and packages made them (never a secret from the environment)."""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path
from typing import Any

import pytest

from pipeline.engine.config import validate_recipe
from pipeline.engine.context import StageContext
from pipeline.engine.errors import PipelineError
from pipeline.engine.manifest import read_manifest
from pipeline.engine.runner import run_recipe
from tests.helpers import ROOT, tiny_recipe
from tests.spawn import run_distributed

SECRETS = {"WANDB_API_KEY": "wandb-fake-key-0123456789", "HF_TOKEN": "hf_fakeTokenForTheTest"}
PRETRAIN = {"max_steps": 4, "log_every": 2, "eval_every": 4, "checkpoint_every": 2}


def _recipe(run_dir: Path, nproc: int = 1, **launch: Any) -> dict[str, Any]:
    data = tiny_recipe(run_dir, nproc=nproc)
    del data["stages"]["eval"]
    data["stages"]["pretrain"].update(PRETRAIN)
    data["launch"].update(launch)
    return data


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run dir whose tokenizer and tokenize stages are done (copied by each test)."""
    run_dir = tmp_path_factory.mktemp("tokenized") / "run"
    data = _recipe(run_dir)
    del data["stages"]["pretrain"]
    run_recipe(validate_recipe(data))
    return run_dir


def _run_dir(tokenized: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(tokenized, run_dir)
    return run_dir


def _trained_and_exported(run_dir: Path, nproc: int = 1, **launch: Any) -> tuple[Any, Any, Any]:
    """(trained, built, ctx) of the pretrain stage, trained and exported in this process."""
    from pipeline.stages.pretrain import workload
    from pipeline.train.export import export_model
    from pipeline.train.loop import train

    recipe = validate_recipe(_recipe(run_dir, nproc, **launch))
    ctx = StageContext(run_dir=run_dir, name="pretrain", recipe=recipe, fingerprint="roundtrip")
    work, built = workload(ctx)
    trained = train(ctx, ctx.config, work)  # type: ignore[arg-type]
    export_model(
        trained.accelerator, trained.model, ctx.input("tokenizer").path, ctx.export_dir,
        built.added_special_tokens, config=ctx.config.model_dump(mode="json"),
    )  # fmt: skip
    return trained, built, ctx


def _tamper(export_dir: Path, how: str) -> None:
    """Change the export on disk the way a buggy save would: one weight, or one config field."""
    if how == "weight":
        from safetensors.torch import load_file, save_file

        path = export_dir / "model.safetensors"
        tensors = load_file(path)
        tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1.05
        save_file(tensors, path, metadata={"format": "pt"})
    else:
        path = export_dir / "config.json"
        config = json.loads(path.read_text())
        config["rope_parameters"]["rope_theta"] = 1.0  # positions rotate another way
        path.write_text(json.dumps(config))


def test_export_roundtrip_reports_a_diff_below_tolerance_in_the_stage_summary(
    tokenized: Path, tmp_path: Path
) -> None:
    run_dir = _run_dir(tokenized, tmp_path)
    run_recipe(validate_recipe(_recipe(run_dir)))
    manifest = read_manifest(run_dir / "pretrain")
    assert manifest["status"] == "done"
    diff = manifest["summary"]["export_max_abs_logit_diff"]
    assert 0.0 <= diff <= 1e-5  # same weights, same kernels: float rounding at most
    assert "export/provenance.json" in manifest["outputs"]
    # The export's tokenizer.json alone (what serving engines load) keeps literal special-token
    # strings as text, as transformers does with the same directory.
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    export = run_dir / "pretrain" / "export"
    text = "changelog: <pad> and </s> are text"
    ids = AutoTokenizer.from_pretrained(export).encode(text, add_special_tokens=False)
    assert Tokenizer.from_file(str(export / "tokenizer.json")).encode(text).ids == ids
    assert not {0, 1, 2, 3} & set(ids)


@pytest.mark.parametrize("how", ["weight", "config"])
def test_export_roundtrip_fails_on_a_tampered_export_and_removes_it(
    tokenized: Path, tmp_path: Path, how: str
) -> None:
    from pipeline.train.export import verify_export

    trained, built, ctx = _trained_and_exported(_run_dir(tokenized, tmp_path))
    args = (trained.accelerator, trained.model, ctx.export_dir, built.auto_class, "stages.pretrain")
    assert verify_export(*args) <= 1e-5  # untouched, it passes
    _tamper(ctx.export_dir, how)
    with pytest.raises(PipelineError) as info:
        verify_export(*args)
    message = str(info.value)
    assert "\n" not in message
    assert str(ctx.export_dir) in message and "max abs logit diff" in message
    assert "> tolerance 0.0001 (fp32" in message  # 1e-4 x max(1, largest |logit|)
    assert not ctx.export_dir.exists()
    assert not list(ctx.stage_dir.glob(".export*"))  # nothing half-written beside it


def _two_rank_roundtrip(run_dir: Path, launch: dict[str, Any]) -> tuple[float, str]:
    """Each rank: train and export sharded, verify, then verify again after rank 0 tampers."""
    from pipeline.train.export import verify_export

    trained, built, ctx = _trained_and_exported(run_dir, nproc=2, **launch)
    args = (trained.accelerator, trained.model, ctx.export_dir, built.auto_class, "stages.pretrain")
    diff = verify_export(*args)
    if ctx.is_main:
        _tamper(ctx.export_dir, "weight")
    try:
        verify_export(*args)
    except PipelineError as exc:
        return diff, str(exc)
    return diff, "passed"


@pytest.mark.parametrize(
    "launch", [{"engine": "fsdp"}, {"engine": "deepspeed", "zero_stage": 3}], ids=["fsdp", "zero3"]
)
def test_export_roundtrip_sharded_two_ranks_pass_and_fail_together(
    tokenized: Path, tmp_path: Path, launch: dict[str, Any]
) -> None:
    run_dir = _run_dir(tokenized, tmp_path)
    (diff_0, failure_0), (diff_1, failure_1) = run_distributed(
        _two_rank_roundtrip, run_dir, launch, timeout_s=300
    )
    assert diff_0 == diff_1 <= 1e-5  # the sharded model's forward matches its gathered export
    assert failure_0 == failure_1 and "max abs logit diff" in failure_0
    assert not (run_dir / "pretrain" / "export").exists()


def test_export_roundtrip_provenance_holds_config_code_and_versions_but_no_secrets(
    tokenized: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from pipeline.train.checkpoint import save_checkpoint, verify_checkpoint

    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    run_dir = _run_dir(tokenized, tmp_path)
    trained, _, ctx = _trained_and_exported(run_dir)
    config = ctx.config.model_dump(mode="json")
    checkpoint = save_checkpoint(
        trained.accelerator, tmp_path / "checkpoints", 4, {"fingerprint": "p"}, 1, config=config
    )
    meta = verify_checkpoint(checkpoint)
    exported = json.loads((ctx.export_dir / "provenance.json").read_text())
    for record in (meta["provenance"], exported):
        assert record["config"] == config and record["config"]["model"]["hidden_size"] == 32
        assert record["packages"]["torch"] == torch.__version__
        assert record["packages"]["python"] == platform.python_version()
        code = record["code"]
        assert code["package"] == "pretrain-pipeline" and code["version"]
        if (ROOT / ".git").exists():  # a copy outside git records the package version alone
            assert len(code["git_commit"]) == 40 and isinstance(code["git_dirty"], bool)
    # The loop's own checkpoints carry the resolved config, code and package versions too.
    loop_meta = verify_checkpoint(run_dir / "pretrain" / "checkpoints" / "step_00000004")
    assert loop_meta["provenance"]["packages"]["transformers"]
    assert loop_meta["provenance"]["config"]["model"]["hidden_size"] == 32
    written = [*run_dir.rglob("meta.json"), *run_dir.rglob("provenance.json"), checkpoint]
    text = "".join(p.read_text() for p in written if p.is_file())
    text += (checkpoint / "meta.json").read_text()
    assert not any(secret in text for secret in SECRETS.values())


def test_export_roundtrip_diffusion_export_carries_provenance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from pipeline.diffusion.objectives import DiffusionObjective, ObjectiveConfig
    from pipeline.models.diffusion import DiffusionModelConfig, build_dit
    from pipeline.stages.diffusion import export_pipeline

    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    cfg = DiffusionModelConfig(hidden_size=16, num_layers=1, num_heads=2)
    denoiser = build_dit(cfg, 1, 8, 2, "stages.diffusion")
    objective = DiffusionObjective(ObjectiveConfig(), 2, 0.1, clip_sample=True)
    config = {"kind": "diffusion", "model": cfg.model_dump(mode="json")}
    export = tmp_path / "export"
    export_pipeline(export, denoiser, denoiser.state_dict(), objective.scheduler(), None,
                    classes=["a", "b"], objective="flow", config=config)  # fmt: skip
    text = (export / "provenance.json").read_text()
    record = json.loads(text)
    assert record["config"] == config and record["packages"]["diffusers"]
    assert record["packages"]["torch"] == torch.__version__ and record["code"]["version"]
    assert not any(secret in text for secret in SECRETS.values())
