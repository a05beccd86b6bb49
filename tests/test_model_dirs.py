"""A user's model directory as the input of every LM stage (issue 21), on tiny Qwen2, Llama and
GPT-2 directories built like downloads (tests/hf_models.py).

Each family runs one recipe: SFT (LoRA on Qwen2, full on the others) -> GRPO -> eval of the base
beside both tuned models, and tokenize with the model's own tokenizer -> continued pretraining.
The exports load in transformers and keep the user's tokenizer files byte for byte; a LoRA export's
adapter gives its merged model's logits; a killed LoRA run resumes exactly; a changed weight file
reruns what depends on it; and a dry run refuses each wrong model input in one line.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.engine.config import load_recipe
from pipeline.engine.graph import plan
from pipeline.engine.inputs import Resolved
from pipeline.engine.locations import Location
from pipeline.stages.base_model import load_causal_lm, load_tokenizer
from pipeline.stages.chat import CHAT_TEMPLATE, assistant_masked_rows
from pipeline.stages.rows import dataset
from tests.helpers import cli, kill_then_resume, run_in_process, write_recipe

# 85 s for the whole module on 2 idle cores: each family's recipe 12-22 s, the resume test 32 s.
FAMILIES = [
    "qwen2",  # LoRA SFT on chat JSONL (its own ChatML template), LoRA reward model, LoRA GRPO
    "llama",  # full SFT -> GRPO; the eval also scores tokens of its own tokenizer
    "gpt2",  # full SFT -> GRPO; no pad token, no chat template
]
# What a download's tokenizer is made of (those a directory has must reach every export unchanged).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "tokenizer.model",
)
TINY = {"max_steps": 2, "num_examples": 16, "micro_batch_size": 4, "log_every": 1,
        "checkpoint_every": 1000, "eval_problems": 0}  # fmt: skip
LENGTH_REWARD = "tests.helpers:completion_length_reward"


def lora() -> dict[str, Any]:
    """A rank-4 LoRA adapter on the attention's query and value projections."""
    return {"kind": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def chat_rows(path: Path, num: int) -> Path:
    """Chat JSONL (`messages`): a question and the assistant's answer."""
    rows = [
        {"messages": [
            {"role": "user", "content": f"What is {i} + {i % 7}?"},
            {"role": "assistant", "content": str(i + i % 7)},
        ]}
        for i in range(num)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def family_recipe(root: Path, model_dir: Path, family: str) -> dict[str, Any]:
    """sft -> rlhf (GRPO) -> eval of [the directory, sft, rlhf]; tokenize -> pretrain from it;
    for qwen2 also a reward model (a reward for the GRPO)."""
    model = {"path": str(model_dir)}
    sft: dict[str, Any] = {"kind": "sft", "model": model, "max_length": 32, **TINY}
    # A reward that varies between the samples of a random model: GRPO's updates are not zero.
    rlhf: dict[str, Any] = {"kind": "rlhf", "after": ["sft"], "num_generations": 2,
                            "max_completion_length": 4, "rewards": [LENGTH_REWARD], **TINY}  # fmt: skip
    stages: dict[str, Any] = {"sft": sft, "rlhf": rlhf}
    if family == "qwen2":  # LoRA everywhere, and a LoRA reward model from the directory too
        sft |= {"adapter": lora(), "data": str(chat_rows(root / "chat.jsonl", 32))}
        stages["reward"] = {"kind": "reward", "model": model, "adapter": lora(), "max_length": 32,
                            **TINY, "eval_pairs": 4}  # fmt: skip
        del stages["reward"]["eval_problems"]  # a reward model is scored on pairs
        rlhf |= {"adapter": lora(), "after": ["sft", "reward"], "reward_model": "reward"}
    evaluate: dict[str, Any] = {"kind": "eval", "after": ["rlhf"], "models": [model, "sft", "rlhf"],
                                "prompts": ["What is"], "max_new_tokens": 4, "task_problems": 4}  # fmt: skip
    if family == "llama":  # scored on tokens of its own tokenizer too
        evaluate |= {"after": ["rlhf", "tokenize"], "seq_len": 32, "max_tokens": 256}
    return {
        "name": f"{family}-dir",
        "run_dir": str(root / "run"),
        "tracking": {"mode": "disabled"},
        "launch": {"nproc": 1},
        "stages": {
            **stages,
            "tokenize": {"kind": "tokenize", "tokenizer": model, "num_workers": 1,
                         "source": {"uri": "builtin:python-stdlib", "max_bytes": 60_000}},
            "pretrain": {"kind": "pretrain", "after": ["tokenize"], "model": model, "seq_len": 32,
                         "micro_batch_size": 4, "max_steps": 2, "schedule": {"warmup_steps": 1},
                         "log_every": 1, "eval_every": 2, "eval_batches": 1,
                         "checkpoint_every": 2},
            "eval": evaluate,
        },
    }  # fmt: skip


@dataclass(frozen=True)
class FamilyRun:
    family: str
    model_dir: Path  # this module's copy of the session's directory (test 4 touches it)
    recipe: Path
    run_dir: Path


@pytest.fixture(scope="module")
def family_runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], FamilyRun]:
    """`family_recipe` of a family, run by the CLI on first use and shared by the module."""
    runs: dict[str, FamilyRun | str] = {}  # a family's run, or why it failed (not run again)

    def get(family: str) -> FamilyRun:
        if family not in runs:
            root = tmp_path_factory.mktemp(f"{family}-run")
            source = request.getfixturevalue(f"{family}_dir")
            model_dir = Path(shutil.copytree(source, root / family))
            recipe = write_recipe(root / "recipe.yaml", family_recipe(root, model_dir, family))
            result = cli("run", str(recipe))
            runs[family] = (
                FamilyRun(family, model_dir, recipe, root / "run")
                if result.returncode == 0
                else f"the {family} run failed:\n{result.stderr[-3000:]}"
            )
        run = runs[family]
        if isinstance(run, str):
            pytest.fail(run)
        return run

    return get


def stage_status(run_dir: Path, stage: str) -> str:
    return json.loads((run_dir / stage / "stage.json").read_text())["status"]


@pytest.mark.e2e
@pytest.mark.parametrize("family", FAMILIES)
def test_every_stage_runs_from_the_directory(
    family_runs: Callable[[str], FamilyRun], family: str
) -> None:
    family_run = family_runs(family)
    stages = ["sft", "rlhf", "tokenize", "pretrain", "eval"] + ["reward"] * (family == "qwen2")
    assert [stage_status(family_run.run_dir, s) for s in stages] == ["done"] * len(stages)
    # A directory's fingerprint is stable: nothing reruns on an unchanged directory.
    assert not [step.name for step in plan(load_recipe(family_run.recipe)) if step.run]
    meta = json.loads((family_run.run_dir / "tokenize" / "export" / "meta.json").read_text())
    assert meta["tokenizer_path"] == str(family_run.model_dir)


def assert_tokenizer_files_kept(source: Path, export: Path) -> None:
    """The export (and its adapter/) holds the source directory's tokenizer files as they were."""
    kept = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(kept)
    for folder in [export, export / "adapter"] if (export / "adapter").is_dir() else [export]:
        for name in kept:
            assert (folder / name).read_bytes() == (source / name).read_bytes(), (folder, name)


@pytest.mark.e2e
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stage", ["sft", "rlhf", "pretrain"])
def test_exports_load_and_keep_the_tokenizer_files(
    family_runs: Callable[[str], FamilyRun], family: str, stage: str
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    family_run = family_runs(family)
    source, export = family_run.model_dir, family_run.run_dir / stage / "export"
    model = AutoModelForCausalLM.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert model.config.model_type == family_run.family
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(source).get_vocab()
    assert (export / "adapter").is_dir() == (family_run.family == "qwen2" and stage != "pretrain")
    assert_tokenizer_files_kept(source, export)
    if family_run.family != "qwen2" and stage != "pretrain":
        # A directory without a chat template exports the one it was tuned with (ours).
        assert tokenizer.chat_template == CHAT_TEMPLATE
    if family_run.family == "qwen2":  # tied embeddings stay tied, in the config and the model
        config = json.loads((export / "config.json").read_text())
        assert config["tie_word_embeddings"] is True
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.mark.e2e
@pytest.mark.parametrize("family", FAMILIES)
def test_eval_scores_the_directory_beside_its_tuned_models(
    family_runs: Callable[[str], FamilyRun], family: str
) -> None:
    family_run = family_runs(family)
    evaluated = json.loads((family_run.run_dir / "eval" / "export" / "eval.json").read_text())
    assert list(evaluated["models"]) == [str(family_run.model_dir), "sft", "rlhf"]
    for metrics in evaluated["models"].values():
        assert metrics["task_problems"] == 4 and 0 <= metrics["task_accuracy"] <= 1
        # Token data only where a tokenize stage is upstream of the eval (llama's recipe).
        assert ("val_loss" in metrics) == (family_run.family == "llama")
    manifest = json.loads((family_run.run_dir / "eval" / "stage.json").read_text())
    assert manifest["headline"] == ("val_loss" if family_run.family == "llama" else "task_accuracy")
    assert manifest["note"].splitlines()[-3].startswith(str(family_run.model_dir))


@pytest.fixture
def qwen2_run(family_runs: Callable[[str], FamilyRun]) -> FamilyRun:
    """The Qwen2 family's run: LoRA SFT and GRPO."""
    return family_runs("qwen2")


@pytest.mark.e2e
@pytest.mark.parametrize("stage", ["sft", "reward", "rlhf"])
def test_lora_adapter_gives_the_merged_models_logits(qwen2_run: FamilyRun, stage: str) -> None:
    """PeftModel(base, export/adapter) and the merged model at the export root agree to 1e-5
    in fp32: merging only reassociates W x + s B (A x) as (W + s B A) x, a few fp32 roundings
    (~1e-7 on logits of size ~1), while the adapter itself moves the logits by far more."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    export = qwen2_run.run_dir / stage / "export"
    base_dir = qwen2_run.run_dir / "sft" / "export" if stage == "rlhf" else qwen2_run.model_dir
    auto = AutoModelForSequenceClassification if stage == "reward" else AutoModelForCausalLM
    merged = auto.from_pretrained(export, dtype=torch.float32).eval()
    head = (
        {"num_labels": 1, "pad_token_id": merged.config.pad_token_id} if stage == "reward" else {}
    )
    base = auto.from_pretrained(base_dir, dtype=torch.float32, **head).eval()
    ids = torch.randint(0, 790, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = base(ids).logits
        adapted = PeftModel.from_pretrained(base, export / "adapter").eval()(ids).logits
        torch.testing.assert_close(adapted, merged(ids).logits, atol=1e-5, rtol=0)
    if stage == "reward":  # the causal-LM stages' exports are checked for this above
        assert_tokenizer_files_kept(qwen2_run.model_dir, export)
    assert (adapted - before).abs().max() > 1e-4  # the adapter was trained: it changes logits


@pytest.mark.e2e
def test_changed_weight_file_reruns_what_depends_on_it(qwen2_run: FamilyRun) -> None:
    """A weight file's new modification time reruns the stages that read the model (and their
    downstream), not tokenize, which reads only the directory's tokenizer files."""
    weights = qwen2_run.model_dir / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    try:
        steps = plan(load_recipe(qwen2_run.recipe))
    finally:  # the module's other tests see the directory as it was
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert {step.name: step.run for step in steps} == {
        "sft": True, "reward": True, "rlhf": True, "tokenize": False, "pretrain": True, "eval": True
    }  # fmt: skip
    assert {step.name: step.reason for step in steps if step.run}["sft"] == (
        "config or upstream changed"
    )


def test_assistant_mask_is_the_assistant_turns_with_their_end_of_turn(qwen2_dir: Path) -> None:
    """With the directory's own ChatML template (no generation markers, which TRL needs), the
    loss mask covers each assistant answer and its <|im_end|>: no role header, no other turn,
    not the newline the template writes between turns."""
    tokenizer = load_tokenizer(Resolved("model", "test", location=Location(path=str(qwen2_dir))))
    assert "{% generation %}" not in tokenizer.chat_template
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And 4 + 4?"},
        {"role": "assistant", "content": "It is 8."},
    ]
    row = assistant_masked_rows(tokenizer, [{"messages": messages}], 128, "stages.sft")[0]
    ids, mask = row["input_ids"], row["assistant_masks"]
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False)
    runs = groupby(zip(ids, mask, strict=True), key=lambda pair: pair[1])
    spans = [[token for token, _ in run] for masked, run in runs if masked]
    assert [tokenizer.decode(span) for span in spans] == ["5<|im_end|>", "It is 8.<|im_end|>"]
    assert all(span[-1] == tokenizer.eos_token_id for span in spans)  # EOS is <|im_end|>


def test_pad_as_eos_keeps_eos_in_the_loss(gpt2_dir: Path, tmp_path: Path) -> None:
    """GPT-2 has no pad token: it pads with <|endoftext|>, its EOS. The padding is out of the loss,
    each completion's own EOS is in it (labels hold the EOS id, not -100)."""
    from trl import SFTConfig, SFTTrainer

    source = Resolved("model", "test", location=Location(path=str(gpt2_dir)))
    tokenizer = load_tokenizer(source)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    rows = [{"prompt": "What is 2 + 3?", "completion": " 5"},
            {"prompt": "What is 12 + 30?", "completion": " 42, I think"}]  # fmt: skip
    trainer = SFTTrainer(
        model=load_causal_lm(source, "stages.sft"),
        args=SFTConfig(output_dir=str(tmp_path), report_to="none", per_device_train_batch_size=2,
                       use_cpu=True, max_length=32),
        train_dataset=dataset(rows),
        processing_class=tokenizer,
    )  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    eos = tokenizer.eos_token_id
    for ids, labels, attention in zip(batch["input_ids"].tolist(), batch["labels"].tolist(),
                                      batch["attention_mask"].tolist(), strict=True):  # fmt: skip
        length = sum(attention)
        assert ids[length - 1] == eos and labels[length - 1] == eos  # the completion's EOS
        assert labels[length:] == [-100] * (len(ids) - length)  # padding (EOS ids) is not
    assert sum(batch["attention_mask"][0]) < batch["attention_mask"].shape[1]  # one row is padded


@pytest.mark.e2e
def test_lora_resume_after_kill_is_exact(qwen2_dir: Path, tmp_path: Path) -> None:
    """Killed (SIGKILL) after its first checkpoint and rerun, a LoRA SFT ends with the adapter
    and merged weights of an uninterrupted run, bit for bit."""
    import torch
    from safetensors.torch import load_file

    recipe = {
        "name": "lora-resume",
        "run_dir": str(tmp_path / "run"),
        "tracking": {"mode": "disabled"},
        "launch": {"nproc": 1},
        "stages": {"sft": {"kind": "sft", "model": {"path": str(qwen2_dir)}, "adapter": lora(),
                           **TINY, "max_steps": 4, "checkpoint_every": 2, "keep_checkpoints": 2,
                           "max_length": 32}},
    }  # fmt: skip
    reference, resumed = kill_then_resume(
        tmp_path, recipe, "sft/checkpoints/checkpoint-2/trainer_state.json"
    )
    assert "resuming from checkpoint-2" in (resumed / "sft" / "stage.log").read_text()
    for name in ("adapter/adapter_model.safetensors", "model.safetensors"):
        expected = load_file(reference / "sft" / "export" / name)
        got = load_file(resumed / "sft" / "export" / name)
        assert list(got) == list(expected)
        assert all(torch.equal(got[k], expected[k]) for k in expected), name


# Dry-run refusals: each case changes a valid recipe (dryrun_recipe) and names what the one
# error line must contain; nothing runs and the line comes before any stage starts.
def dryrun_recipe(tmp: Path, model_dir: Path) -> dict[str, Any]:
    """LoRA SFT from a directory -> GRPO -> eval of both and the directory; continued
    pretraining on tokens of its tokenizer; and images -> flow diffusion -> image_eval."""
    recipe = family_recipe(tmp, model_dir, "qwen2")
    recipe["run_dir"] = str(tmp / "run")
    recipe["stages"] |= {
        "images": {"kind": "images", "source": "builtin:digits", "image_size": 8},
        "diffusion": {"kind": "diffusion", "after": ["images"], "objective": {"kind": "flow"}},
        "image_eval": {"kind": "image_eval", "after": ["diffusion", "images"],
                       "samplers": [{"sampler": "euler", "steps": 4}]},
    }  # fmt: skip
    return recipe


def remote_code_dir(tmp: Path, model_dir: Path) -> str:
    """A copy of the directory whose config asks for trust_remote_code (an auto_map)."""
    copy = Path(shutil.copytree(model_dir, tmp / "remote"))
    config = json.loads((copy / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (copy / "config.json").write_text(json.dumps(config))
    return str(copy)


def no_config_dir(tmp: Path, model_dir: Path) -> str:
    """A folder with weights and a tokenizer but no config.json."""
    folder = tmp / "weights-only"
    folder.mkdir()
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(model_dir / name, folder / name)
    return str(folder)


Change = Callable[[dict[str, Any], Path, Path], Any]  # (the recipe's stages, tmp, model dir)
# The table stays one case per line: `ruff format` would spread it over four times the lines.
# fmt: off
DRY_RUN_CASES: dict[str, tuple[Change, str]] = {
    "model-dir-missing": (lambda s, tmp, m: s["sft"].update(model={"path": str(tmp / "nowhere")}), "stages.sft.model.path"),
    "model-dir-without-config": (lambda s, tmp, m: s["sft"].update(model={"path": no_config_dir(tmp, m)}), "no config.json"),
    "model-needs-remote-code": (lambda s, tmp, m: s["sft"].update(model={"path": remote_code_dir(tmp, m)}), "trust_remote_code"),
    "model-stage-of-wrong-type": (lambda s, tmp, m: s["sft"].update(model="tokenize", after=["tokenize"]), "stages.sft.model: 'tokenize' is a tokenize stage"),
    "eval-model-not-upstream": (lambda s, tmp, m: s["eval"].update(models=[{"path": str(m)}, "pretrain"]), "'pretrain' is not upstream of eval"),
    "eval-model-dir-missing": (lambda s, tmp, m: s["eval"].update(models=[{"path": str(tmp / "no")}, "sft"]), "stages.eval.models.0.path"),
    "reward-model-dir-missing": (lambda s, tmp, m: s["rlhf"].update(reward_model={"path": str(tmp / "rm")}), "stages.rlhf.reward_model.0.path"),
    "reward-name-misspelt": (lambda s, tmp, m: s["rlhf"].update(rewards=["exakt"]), "stages.rlhf.rewards.0: got 'exakt': Value error, unknown reward function 'exakt'; did you mean 'exact'?"),
    "sft-data-missing": (lambda s, tmp, m: s["sft"].update(data=str(tmp / "missing.jsonl")), "missing.jsonl: no such file"),
    "adapter-target-misspelt": (lambda s, tmp, m: s["sft"]["adapter"].update(target_modules=["q_prj"]), "stages.sft.adapter.target_modules: 'q_prj' names no module of the model; did you mean 'q_proj'?"),
    "sampler-does-not-fit-objective": (lambda s, tmp, m: s["image_eval"].update(samplers=[{"sampler": "ddpm", "steps": 4}]), "ddpm does not fit stage 'diffusion', a flow model"),
}
# fmt: on


def assert_refused(code: int, err: str, names: str, tmp: Path) -> None:
    """Exit 2 with one `error:` line containing `names`, and no stage started."""
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, f"exit {code}:\n{err}"
    assert lines[0].startswith("error: ") and names in lines[0], lines[0]
    assert not list(tmp.rglob("stage.json"))


def test_dry_run_accepts_the_valid_recipe(
    qwen2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_recipe(tmp_path / "recipe.yaml", dryrun_recipe(tmp_path, qwen2_dir))
    assert run_in_process(["run", "--dry-run", str(path)], capsys) == (0, "")


@pytest.mark.parametrize("case", list(DRY_RUN_CASES))
def test_dry_run_refuses_in_one_line(
    case: str, qwen2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    change, names = DRY_RUN_CASES[case]
    recipe = dryrun_recipe(tmp_path, qwen2_dir)
    change(recipe["stages"], tmp_path, qwen2_dir)
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    assert_refused(*run_in_process(["run", "--dry-run", str(path)], capsys), names, tmp_path)


def test_dry_run_refuses_a_key_given_twice(
    qwen2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = yaml.safe_dump(dryrun_recipe(tmp_path, qwen2_dir), sort_keys=False)
    text = text.replace("    max_steps: 2\n", "    max_steps: 2\n    max_steps: 3\n", 1)
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    code, err = run_in_process(["run", "--dry-run", str(path)], capsys)
    assert_refused(code, err, "key 'max_steps' appears twice in one mapping", tmp_path)


def test_dry_run_refuses_qlora_without_a_gpu(
    qwen2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes"):
        pytest.skip("this machine runs QLoRA (a CUDA GPU and bitsandbytes)")
    recipe = dryrun_recipe(tmp_path, qwen2_dir)
    recipe["stages"]["sft"]["adapter"]["quantize"] = "nf4"
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    code, err = run_in_process(["run", "--dry-run", str(path)], capsys)
    assert_refused(code, err, "stages.sft.adapter.quantize: nf4 (QLoRA) needs", tmp_path)


def test_dry_run_refuses_shards_of_another_tokenizer(
    qwen2_dir: Path, llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Continued pretraining of the Qwen2 directory on tokens of Llama's tokenizer."""
    recipe = dryrun_recipe(tmp_path, qwen2_dir)
    recipe["stages"]["tokenize"]["tokenizer"] = {"path": str(llama_dir)}
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    code, err = run_in_process(["run", "--dry-run", str(path)], capsys)
    assert_refused(code, err, "stages.pretrain.model.path: the tokens of tokenize", tmp_path)
