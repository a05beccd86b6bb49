"""Model families are specs: every accepted arch has one, and each builds what it claims.

Real tiny configs, no downloads. qwen2 has no recipe; it is here to show that a family is one
entry in FAMILIES and nothing else.
"""

from __future__ import annotations

import typing
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers

from eval.compare import loss_meaning
from eval.families import HEADLINES, family_of, objective_for, summary_note
from pipeline.engine.config import validate_recipe
from pipeline.engine.errors import RecipeError
from pipeline.models import build_model
from pipeline.models.diffusion import DENOISERS, DiffusionModelConfig, build_denoiser
from pipeline.models.families import FAMILIES, ModelConfig
from pipeline.models.text_denoisers import build_text_denoiser, text_table
from tests.helpers import tiny_recipe

VOCAB, SEQ_LEN = 120, 32
TINY_DENOISERS = {
    "dit": {"hidden_size": 32, "num_layers": 2, "num_heads": 2},
    "unet": {"block_out_channels": [8, 16], "norm_num_groups": 4},
    "pixart": {"hidden_size": 32, "num_layers": 2, "num_heads": 2},
    "mmdit": {"hidden_size": 32, "num_layers": 2, "num_heads": 2},
}


def tiny(arch: str, **fields: object) -> ModelConfig:
    return ModelConfig(arch=arch, hidden_size=32, num_layers=2, num_heads=2, **fields)


def accepted_archs(config: type[ModelConfig | DiffusionModelConfig]) -> tuple[str, ...]:
    return typing.get_args(config.model_fields["arch"].annotation)


def test_every_accepted_arch_has_exactly_one_spec() -> None:
    assert accepted_archs(ModelConfig) == tuple(FAMILIES)
    assert accepted_archs(DiffusionModelConfig) == tuple(DENOISERS)
    for spec in FAMILIES.values():
        assert set(spec.fields) | set(spec.export_fields) <= set(ModelConfig.model_fields)
    for spec in DENOISERS.values():
        assert set(spec.fields) <= set(DiffusionModelConfig.model_fields)


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_spec_builds_the_class_its_auto_class_maps_its_config_to(arch: str) -> None:
    spec = FAMILIES[arch]
    torch.manual_seed(0)
    built = build_model(tiny(arch), VOCAB, SEQ_LEN)
    auto_class = getattr(transformers, spec.auto_class)
    assert type(built.model) is auto_class._model_mapping[type(built.model.config)]
    assert built.auto_class == spec.auto_class
    # eval finds the spec of an export by its model_type, so the key must be that model_type
    assert built.model.config.model_type == arch and family_of(arch) == spec.scoring.kind
    num_added = len(built.model.get_input_embeddings().weight) - VOCAB
    added = built.added_special_tokens
    assert num_added == sum(len(v) if isinstance(v, list) else 1 for v in added.values())
    meaning = loss_meaning(SimpleNamespace(model=tiny(arch)))
    assert meaning.startswith(("causal LM", "masked LM", "span corruption")) and "{" not in meaning


def test_one_scoring_per_kind_and_its_headline() -> None:
    scorings = {spec.scoring.kind: spec.scoring for spec in FAMILIES.values()}
    assert all(spec.scoring is scorings[spec.scoring.kind] for spec in FAMILIES.values())
    assert HEADLINES == {"causal": "val_loss", "masked": "mlm_loss", "seq2seq": "span_loss"}


def test_a_note_clause_naming_an_absent_metric_is_left_out() -> None:
    metrics = {"val_loss": 2.0, "unigram_loss": 4.0, "loss_vs_unigram": 0.5, "bits_per_byte": 1.25}
    plain = summary_note("m", "causal", metrics)
    assert plain == (
        "m val_loss 2.000 nats/token vs unigram baseline 4.000 (ratio 0.50), 1.250 bits/byte"
    )
    routed = summary_note("m", "causal", {**metrics, "moe/max_expert_fraction": 0.375})
    assert routed == plain + ", busiest expert 37.5% of routing"


def test_unknown_family_is_one_line_listing_every_family(tmp_path: Path) -> None:
    data = tiny_recipe(tmp_path / "runs" / "tiny")
    data["stages"]["pretrain"]["model"]["arch"] = "qwen9"
    with pytest.raises(RecipeError) as caught:
        validate_recipe(data)
    choices = ", ".join(f"'{arch}'" for arch in list(FAMILIES)[:-1])
    assert str(caught.value) == (
        f"recipe: stages.pretrain.model.arch: got 'qwen9': Input should be {choices} "
        f"or '{list(FAMILIES)[-1]}'"
    )


def test_family_only_field_on_another_family_is_refused() -> None:
    with pytest.raises(ValueError, match="num_experts only applies to arch mixtral, not qwen2"):
        tiny("qwen2", num_experts=8)


def test_qwen2_is_llama_with_attention_biases_and_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    qwen2 = build_model(tiny("qwen2", num_kv_heads=1), VOCAB, SEQ_LEN)
    llama = build_model(tiny("llama", num_kv_heads=1), VOCAB, SEQ_LEN)
    assert type(qwen2.model).__name__ == "Qwen2ForCausalLM" and qwen2.objective.name == "causal_lm"
    head_dim = 32 // 2
    biases = 2 * (32 + 2 * head_dim)  # per layer: q (hidden) and k, v (one kv head each)
    assert qwen2.model.num_parameters() == llama.model.num_parameters() + biases
    qwen2.model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    tokens = torch.randint(4, VOCAB, (2, SEQ_LEN + 1), generator=torch.Generator().manual_seed(0))
    objective = objective_for(None, loaded.config, VOCAB)
    with torch.no_grad():
        before = qwen2.objective.loss(qwen2.model.eval(), tokens, torch.Generator())[0]
        after = objective.loss(loaded.eval(), tokens, torch.Generator())[0]
    assert after.item() == pytest.approx(before.item(), rel=1e-5)


@pytest.mark.parametrize("arch", list(DENOISERS))
def test_denoiser_spec_builds_a_model_with_its_fsdp_units(arch: str) -> None:
    """Each arch builds (the text ones on a table of 11 caption embeddings, the last the empty
    caption, so label 10 is the null label as for 10 classes), takes the objective's call and
    holds the module classes FSDP wraps."""
    cfg = DiffusionModelConfig(arch=arch, **TINY_DENOISERS[arch])
    torch.manual_seed(0)
    if DENOISERS[arch].text:
        generator = np.random.default_rng(0)
        table = text_table(
            generator.standard_normal((11, 4, 6)).astype(np.float32),
            np.ones((11, 4), bool),
            generator.standard_normal((11, 5)).astype(np.float32),
        )
        model = build_text_denoiser(cfg, 1, 8, table, "stages.diffusion")
    else:
        model = build_denoiser(cfg, 1, 8, 10, "stages.diffusion")
    sample = model(
        torch.zeros(2, 1, 8, 8), torch.tensor([0, 5]), class_labels=torch.tensor([0, 10])
    )
    assert sample.sample.shape == (2, 1, 8, 8)
    names = {type(m).__name__ for m in model.modules()}
    assert set(DENOISERS[arch].wrap_classes) <= names
