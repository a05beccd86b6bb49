"""mixtral, bert and t5 through the real CLI: each trains, exports, loads and is evaluated in kind.

One recipe shares the tokenizer and token shards between the three families: a pretrain stage and
an eval stage per family (llama and gpt2 are covered by tests/test_pretrain.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.engine.rundir import SUMMARY_FILE
from pipeline.engine.tracking import read_metrics
from tests.helpers import cli, tiny_recipe, write_recipe

pytestmark = pytest.mark.e2e  # every test here runs `pipeline` in a subprocess

FAMILIES = {
    "mixtral": {"num_experts": 4, "experts_per_token": 2},
    "bert": {"mlm_probability": 0.25},
    "t5": {"noise_density": 0.25, "mean_span_length": 2.0},
}
AUTO_CLASSES = {
    "mixtral": "AutoModelForCausalLM",
    "bert": "AutoModelForMaskedLM",
    "t5": "AutoModelForSeq2SeqLM",
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp_path = tmp_path_factory.mktemp("families")
    run_dir = tmp_path / "runs" / "families"
    data = tiny_recipe(run_dir)
    pretrain, evaluate = data["stages"].pop("pretrain"), data["stages"].pop("eval")
    for arch, fields in FAMILIES.items():
        model = {**pretrain["model"], "arch": arch, **fields}
        data["stages"][arch] = {
            **pretrain,
            "model": model,
            "micro_batch_size": 8,
            "max_steps": 16,
            "log_every": 4,
            "eval_every": 8,
            "checkpoint_every": 8,
        }
        data["stages"][f"eval_{arch}"] = {**evaluate, "after": [arch], "models": [arch]}
    result = cli("run", str(write_recipe(tmp_path / "families.yaml", data)))
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir


def _summary(stage_dir: Path) -> dict:
    return json.loads((stage_dir / SUMMARY_FILE).read_text())


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_family_trains_and_exports_with_its_auto_class(run_dir: Path, arch: str) -> None:
    import transformers

    losses = [r["train/loss"] for r in read_metrics(run_dir / arch) if "train/loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0]
    export = run_dir / arch / "export"
    model = getattr(transformers, AUTO_CLASSES[arch]).from_pretrained(export)
    assert model.config.model_type == arch
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    base_vocab = json.loads((run_dir / "tokenize" / "export" / "meta.json").read_text())
    base_vocab = base_vocab["vocab_size"]
    assert len(tokenizer) == model.config.vocab_size
    if arch == "bert":
        assert tokenizer.mask_token == "<mask>" and tokenizer.mask_token_id == base_vocab
    if arch == "t5":
        sentinels = [f"<extra_id_{i}>" for i in range(model.config.vocab_size - base_vocab)]
        assert tokenizer.convert_tokens_to_ids(sentinels) == list(
            range(base_vocab, model.config.vocab_size)
        )


def test_mixtral_logs_routing_and_is_evaluated_as_a_causal_lm(run_dir: Path) -> None:
    rows = [r for r in read_metrics(run_dir / "mixtral") if "train/loss" in r]
    fractions = [rows[-1][f"train/moe/expert_{i}_fraction"] for i in range(4)]
    assert sum(fractions) == pytest.approx(1.0)
    assert rows[-1]["train/moe/aux_loss"] > 0 and rows[-1]["train/lm_loss"] < rows[-1]["train/loss"]
    summary = _summary(run_dir / "eval_mixtral")
    assert summary["headline"] == "val_loss"
    metrics = summary["metrics"]
    assert metrics["val_loss"] < metrics["unigram_loss"] * 1.5
    assert 0.25 <= metrics["moe/max_expert_fraction"] <= 1
    samples = (run_dir / "eval_mixtral" / "export" / "samples.jsonl").read_text().splitlines()
    assert [json.loads(s)["prompt"] for s in samples] == ["def "]
    assert json.loads(samples[0])["completion"] != ""  # a causal LM continues the prompt


def test_bert_is_evaluated_by_masked_token_loss_without_samples(run_dir: Path) -> None:
    summary = _summary(run_dir / "eval_bert")
    assert summary["headline"] == "mlm_loss"
    metrics = summary["metrics"]
    assert 0 < metrics["mlm_loss"] < 7 and 0 <= metrics["masked_token_accuracy"] <= 1
    assert "val_loss" not in metrics and "masked-token loss" in summary["note"]
    assert (run_dir / "eval_bert" / "export" / "samples.jsonl").read_text() == ""


def test_t5_is_evaluated_by_span_corruption_loss(run_dir: Path) -> None:
    summary = _summary(run_dir / "eval_t5")
    assert summary["headline"] == "span_loss"
    assert 0 < summary["metrics"]["span_loss"] < 7
    assert "span-corruption loss" in summary["note"]
