"""Model families and their objectives on tiny configs: classes, determinism, masking, spans, ids."""

from __future__ import annotations

import string
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from pydantic import ValidationError

from pipeline.models import BuiltModel, add_special_tokens, build_model
from pipeline.models.causal_lm import ModelConfig
from pipeline.train.objectives import (
    IGNORE_INDEX,
    corrupt_spans,
    expert_fractions,
    mask_tokens,
    noise_spans,
    span_counts,
)

VOCAB, SEQ_LEN = 120, 32
EXPECTED = {
    "llama": ("LlamaForCausalLM", "AutoModelForCausalLM"),
    "gpt2": ("GPT2LMHeadModel", "AutoModelForCausalLM"),
    "mixtral": ("MixtralForCausalLM", "AutoModelForCausalLM"),
    "bert": ("BertForMaskedLM", "AutoModelForMaskedLM"),
    "t5": ("T5ForConditionalGeneration", "AutoModelForSeq2SeqLM"),
}


def tiny(arch: str, **fields: object) -> ModelConfig:
    return ModelConfig(arch=arch, hidden_size=32, num_layers=2, num_heads=2, **fields)


def windows(seed: int = 0, batch: int = 4) -> torch.Tensor:
    """Token windows [batch, SEQ_LEN + 1] of ordinary (non-special) ids."""
    return torch.randint(
        4, VOCAB, (batch, SEQ_LEN + 1), generator=torch.Generator().manual_seed(seed)
    )


def loss_of(built: BuiltModel, tokens: torch.Tensor, seed: int) -> tuple[float, dict[str, float]]:
    """The objective's loss and metrics without gradients, its randomness seeded by `seed`."""
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        loss, metrics = built.objective.loss(built.model, tokens, generator)
    return loss.item(), metrics


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_builder_class_and_auto_class_round_trip(arch: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    built = build_model(tiny(arch), VOCAB, SEQ_LEN)
    model_class, auto_class = EXPECTED[arch]
    assert type(built.model).__name__ == model_class and built.auto_class == auto_class
    built.model.save_pretrained(tmp_path)
    loaded = getattr(transformers, auto_class).from_pretrained(tmp_path)
    assert type(loaded).__name__ == model_class
    tokens = windows()
    built.model.eval()
    reloaded = BuiltModel(loaded.eval(), built.objective, auto_class)
    assert loss_of(built, tokens, 0)[0] == pytest.approx(loss_of(reloaded, tokens, 0)[0], rel=1e-5)


@pytest.mark.parametrize("arch", ["mixtral", "bert", "t5"])
def test_objective_is_a_function_of_tokens_and_generator_seed(arch: str) -> None:
    torch.manual_seed(0)
    built = build_model(tiny(arch), VOCAB, SEQ_LEN)
    built.model.eval()
    tokens = windows()
    first, first_metrics = loss_of(built, tokens, seed=7)
    again, again_metrics = loss_of(built, tokens, seed=7)
    assert first == again and first_metrics == again_metrics
    if arch != "mixtral":  # the causal objective draws no randomness
        assert loss_of(built, tokens, seed=8)[0] != first


def test_masking_chooses_real_tokens_at_the_rate_and_mixes_mask_random_keep() -> None:
    tokens = torch.randint(4, VOCAB, (64, 100), generator=torch.Generator().manual_seed(0))
    tokens[:, 90:] = 3  # trailing pad is never chosen
    mask_id = VOCAB
    inputs, labels = mask_tokens(
        tokens, torch.Generator().manual_seed(1), mask_id=mask_id, vocab_size=VOCAB,
        mlm_probability=0.2, pad_id=3,
    )  # fmt: skip
    chosen = labels != IGNORE_INDEX
    assert (chosen.sum(1) == 18).all()  # round(0.2 * 90) per row
    assert not chosen[:, 90:].any()
    assert torch.equal(labels[chosen], tokens[chosen])
    assert torch.equal(inputs[~chosen], tokens[~chosen])
    masked = (inputs[chosen] == mask_id).float().mean().item()
    kept = (inputs[chosen] == tokens[chosen]).float().mean().item()
    assert 0.75 < masked < 0.85 and 0.07 < kept < 0.16  # 10% kept + random hits of the same id
    assert int(inputs.max()) <= mask_id


def test_masked_lm_scores_only_the_chosen_positions() -> None:
    """Changing the model's logits on unchosen positions leaves the loss unchanged."""
    torch.manual_seed(0)
    built = build_model(tiny("bert"), VOCAB, SEQ_LEN)
    built.model.eval()
    tokens = windows()
    _, labels = mask_tokens(
        tokens[:, :-1], torch.Generator().manual_seed(3), mask_id=VOCAB, vocab_size=VOCAB,
        mlm_probability=0.15, pad_id=3,
    )  # fmt: skip
    unchosen = labels == IGNORE_INDEX  # [B, T]

    def scramble_unchosen(module, args, output):
        output.logits[unchosen] = torch.randn_like(output.logits[unchosen]) * 100
        return output

    reference = loss_of(built, tokens, seed=3)
    built.model.register_forward_hook(scramble_unchosen)
    assert loss_of(built, tokens, seed=3)[0] == pytest.approx(reference[0], rel=1e-6)
    assert 0 <= reference[1]["mlm_accuracy"] <= 1


def _uncorrupt(inputs: list[int], targets: list[int], sentinel_start: int, eos: int) -> list[int]:
    """Put each sentinel's span from the targets back into the inputs."""
    spans: dict[int, list[int]] = {}
    current = None
    for token in targets[:-1]:
        if token >= sentinel_start:
            current = spans.setdefault(token, [])
        else:
            current.append(token)
    assert targets[-1] == eos and inputs[-1] == eos
    return [t for token in inputs[:-1] for t in spans.get(token, [token])]


@pytest.mark.parametrize(
    ("seq_len", "density", "mean"), [(32, 0.15, 3.0), (100, 0.3, 2.0), (9, 0.5, 1.0)]
)
def test_span_corruption_inputs_and_targets_rebuild_the_sequence(
    seq_len: int, density: float, mean: float
) -> None:
    tokens = torch.randint(4, VOCAB, (6, seq_len), generator=torch.Generator().manual_seed(0))
    span_ids = noise_spans(6, seq_len, density, mean, torch.Generator().manual_seed(1))
    inputs, targets = corrupt_spans(tokens, span_ids, sentinel_start=VOCAB, eos_id=2)
    num_noise, num_spans = span_counts(seq_len, density, mean)
    assert inputs.shape == (6, seq_len - num_noise + num_spans + 1)
    assert targets.shape == (6, num_noise + num_spans + 1)
    for row in range(6):
        sentinels = [t for t in inputs[row].tolist() if t >= VOCAB]
        assert sentinels == list(range(VOCAB, VOCAB + num_spans))
        rebuilt = _uncorrupt(inputs[row].tolist(), targets[row].tolist(), VOCAB, eos=2)
        assert rebuilt == tokens[row].tolist()
    assert not torch.equal(span_ids[0], span_ids[1])  # rows draw their own spans
    assert (span_ids[:, 0] == -1).all()  # as in T5, every row starts with kept tokens


def test_expert_fractions_sum_to_one_and_aux_loss_is_positive() -> None:
    torch.manual_seed(0)
    built = build_model(tiny("mixtral", num_experts=4, experts_per_token=2), VOCAB, SEQ_LEN)
    loss, metrics = loss_of(built, windows(), seed=0)
    metrics = {key: float(value) for key, value in metrics.items()}  # the loop logs floats
    fractions = [metrics[f"moe/expert_{i}_fraction"] for i in range(4)]
    assert sum(fractions) == pytest.approx(1.0)
    assert metrics["moe/max_expert_fraction"] == max(fractions)
    assert 0 < metrics["moe/aux_loss"] < float("inf")
    assert loss == pytest.approx(metrics["lm_loss"] + 0.01 * metrics["moe/aux_loss"], rel=1e-5)
    logits = (torch.tensor([[5.0, 4.0, 0.0], [0.0, 5.0, 4.0]]),)  # one layer, two tokens
    assert expert_fractions(logits, top_k=1).tolist() == [0.5, 0.5, 0.0]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from data_prep.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    documents = [Path(m.__file__).read_text(encoding="utf-8") for m in (textwrap, string)]
    train_tokenizer(documents, out, vocab_size=400, num_threads=1)
    return out


@pytest.mark.parametrize("arch", ["bert", "t5"])
def test_added_special_tokens_get_the_ids_the_objective_uses(
    arch: str, tokenizer_dir: Path
) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab_size = len(tokenizer)
    built = build_model(tiny(arch), vocab_size, SEQ_LEN)
    add_special_tokens(tokenizer, built.added_special_tokens)
    assert len(tokenizer) == built.model.config.vocab_size
    if arch == "bert":
        assert tokenizer.mask_token_id == built.objective.mask_id == vocab_size
    else:
        sentinels = built.added_special_tokens["additional_special_tokens"]
        assert len(sentinels) == span_counts(SEQ_LEN, 0.15, 3.0)[1]
        ids = tokenizer.convert_tokens_to_ids(sentinels)
        assert ids == [built.objective.sentinel_start + i for i in range(len(sentinels))]
    with pytest.raises(ValueError, match="already knew"):
        add_special_tokens(tokenizer, built.added_special_tokens)


def test_impossible_combinations_are_rejected() -> None:
    with pytest.raises(ValidationError, match="experts_per_token 3 exceeds num_experts 2"):
        tiny("mixtral", num_experts=2, experts_per_token=3)
    with pytest.raises(ValidationError, match="mlm_probability only applies to arch bert"):
        tiny("llama", mlm_probability=0.2)
    with pytest.raises(ValidationError):
        tiny("t5", mean_span_length=0.5)
