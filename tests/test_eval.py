"""LM evaluation: scoring, bits per byte, the unigram baseline and greedy samples on tiny models."""

from __future__ import annotations

import json
import math
import shlex
import shutil
import string
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from data_prep.shards import TokenShards
from eval.lm import Config, run
from eval.lm_metrics import (
    evaluate_model,
    greedy_samples,
    score_windows,
    token_byte_lengths,
    unigram_loss,
)
from pipeline.engine.config import Recipe, StageConfig, TrackingConfig
from pipeline.engine.context import StageContext
from pipeline.engine.manifest import write_manifest
from pipeline.engine.rundir import SUMMARY_FILE
from pipeline.engine.tracking import read_metrics

SAMPLE_TEXT = "def f(x):\n    return  x + 1\t# café ü 日本 → ∑\n\n  end\n"
UNSEEN_TEXT = "naïve 🙂 Ωμ\t∫ dx — done\n"  # characters the tokenizer never saw: byte pieces


def tiny_llama(vocab_size: int, num_layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised llama small enough to run in milliseconds."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's own tokenizer (SentencePiece BPE, HF export) and token shards of stdlib code."""
    from data_prep.tokenize import tokenize_corpus
    from data_prep.tokenizer import MODEL_FILE, train_tokenizer

    root = tmp_path_factory.mktemp("data")
    documents = [Path(m.__file__).read_text(encoding="utf-8") for m in (textwrap, string, shlex)]
    documents += [SAMPLE_TEXT * 5, "\n".join(documents)]
    train_tokenizer(documents, root / "tokenizer", vocab_size=512, num_threads=1)
    tokenize_corpus(
        documents,
        root / "tokenizer" / MODEL_FILE,
        root / "tokenize",
        val_fraction=0.3,
        num_workers=1,
    )
    return root


@pytest.fixture(scope="module")
def tokenizer(data_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(data_dir / "tokenizer")


def test_score_windows_equals_cross_entropy_by_hand() -> None:
    model = tiny_llama(vocab_size=50)
    windows = np.random.default_rng(0).integers(0, 50, size=(5, 17))
    seen_batches: list[int] = []

    def progress(batches: list[np.ndarray]) -> list[np.ndarray]:
        seen_batches.append(len(batches))
        return batches

    total_nll, num_tokens = score_windows(model, windows, batch_size=2, progress=progress)

    tokens = torch.as_tensor(windows)
    with torch.no_grad():
        logits = model(tokens[:, :-1]).logits
    expected = F.cross_entropy(logits.reshape(-1, 50), tokens[:, 1:].reshape(-1), reduction="sum")
    assert num_tokens == 5 * 16
    assert total_nll == pytest.approx(expected.item(), rel=1e-5)
    assert seen_batches == [3]  # 2 + 2 + 1 windows


def test_model_matching_the_data_beats_uniform() -> None:
    """A llama wired to predict token t+1 after t scores near zero loss on counting sequences."""
    vocab_size = 16
    model = tiny_llama(vocab_size=vocab_size, num_layers=1)
    with torch.no_grad():
        for param in model.model.layers.parameters():
            param.zero_()  # every block adds nothing: the residual stream is the embedding
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, :vocab_size] = torch.eye(vocab_size)
        model.lm_head.weight.zero_()
        for token in range(vocab_size):
            model.lm_head.weight[(token + 1) % vocab_size, token] = 4.0
    starts = np.arange(8)[:, None]
    windows = (starts + np.arange(33)[None, :]) % vocab_size

    total_nll, num_tokens = score_windows(model, windows, batch_size=4)

    uniform_loss = math.log(vocab_size)
    assert total_nll / num_tokens < 0.01 * uniform_loss
    assert score_windows(tiny_llama(vocab_size), windows, 4)[0] / num_tokens > 0.5 * uniform_loss


def test_unigram_loss_matches_hand_computation() -> None:
    train_counts = np.bincount(np.array([0, 0, 1, 2]), minlength=4)  # +1 smoothing: 3, 2, 2, 1 / 8
    val_tokens = np.array([0, 3, 3])
    expected = -(math.log(3 / 8) + 2 * math.log(1 / 8)) / 3
    assert unigram_loss(train_counts, val_tokens) == pytest.approx(expected)


def test_token_byte_lengths_sum_to_utf8_length(tokenizer: PreTrainedTokenizerBase) -> None:
    lengths = token_byte_lengths(tokenizer)
    text = SAMPLE_TEXT + UNSEEN_TEXT
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert any(piece.startswith("<0x") for piece in tokenizer.convert_ids_to_tokens(ids))
    assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
    assert all(lengths[i] == 0 for i in tokenizer.all_special_ids)
    assert len(lengths) == len(tokenizer)


def test_evaluate_model_metrics_are_consistent(tokenizer: PreTrainedTokenizerBase) -> None:
    model = tiny_llama(vocab_size=len(tokenizer))
    ids = tokenizer.encode(SAMPLE_TEXT * 20, add_special_tokens=False)
    windows = np.array(ids[: 4 * 25]).reshape(4, 25)
    train_counts = np.bincount(ids, minlength=len(tokenizer))

    metrics = evaluate_model(model, tokenizer, windows, train_counts, batch_size=3)

    targets = windows[:, 1:].ravel()
    num_bytes = int(token_byte_lengths(tokenizer)[targets].sum())
    total_nll, num_tokens = score_windows(model, windows, batch_size=4)
    assert metrics["num_tokens"] == num_tokens == 4 * 24
    assert metrics["num_bytes"] == num_bytes
    assert metrics["val_loss"] == pytest.approx(total_nll / num_tokens, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["val_loss"]))
    assert metrics["bits_per_byte"] == pytest.approx(total_nll / math.log(2) / num_bytes, rel=1e-5)
    assert metrics["unigram_loss"] == pytest.approx(unigram_loss(train_counts, targets))
    assert metrics["loss_vs_unigram"] == pytest.approx(
        metrics["val_loss"] / metrics["unigram_loss"]
    )


def tiny_exports(run_dir: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    """Two finished "pretrain" stages, `small` and `other`: tiny llamas of different seeds."""
    for name, seed in (("small", 0), ("other", 1)):
        export = run_dir / name / "export"
        tiny_llama(vocab_size=len(tokenizer), seed=seed).save_pretrained(export)
        tokenizer.save_pretrained(export)
        write_manifest(run_dir / name, {"stage": name, "status": "done"})


def argmax_continuation(model: LlamaForCausalLM, ids: list[int], max_new_tokens: int) -> list[int]:
    """The greedy continuation of `ids` by hand: the most likely next token, one at a time."""
    ids, new = list(ids), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if token == model.config.eos_token_id:
                break
            ids.append(token)
            new.append(token)
    return new


def test_greedy_samples_are_the_argmax_continuation_of_a_fresh_document(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    model = tiny_llama(vocab_size=len(tokenizer))
    model.config.eos_token_id = tokenizer.eos_token_id
    prompts = Config().prompts
    samples = greedy_samples(model, tokenizer, prompts, max_new_tokens=8)
    assert len(samples) == len(prompts)
    for prompt, sample in zip(prompts, samples, strict=True):
        start = [tokenizer.eos_token_id, *tokenizer.encode(prompt, add_special_tokens=False)]
        expected = argmax_continuation(model, start, max_new_tokens=8)
        assert len(expected) == 8  # this model never picks end-of-text: nothing to cut short
        assert sample == tokenizer.decode(expected, skip_special_tokens=True) != ""
    assert greedy_samples(model, tokenizer, prompts, max_new_tokens=8) == samples


def test_eval_stage_scores_every_model_and_writes_its_outputs(
    data_dir: Path, tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    from pipeline.stages import pretrain

    run_dir = tmp_path / "run"
    tiny_exports(run_dir, tokenizer)
    shutil.copytree(data_dir / "tokenize", run_dir / "tokenize" / "export")
    write_manifest(run_dir / "tokenize", {"stage": "tokenize", "status": "done"})
    recipe = Recipe(
        name="tiny",
        run_dir=str(run_dir),
        tracking=TrackingConfig(mode="disabled"),
        stages={
            "tokenize": StageConfig(kind="tokenize"),
            "small": pretrain.Config(kind="pretrain", after=["tokenize"], seq_len=16),
            "other": pretrain.Config(kind="pretrain", after=["tokenize"], seq_len=32),
            "eval": Config(
                after=["small", "other"],
                models=["small", "other"],
                max_tokens=100,
                max_new_tokens=4,
                prompts=["def ", "x <y>"],
            ),
        },
    )

    run(StageContext(run_dir=run_dir, name="eval", recipe=recipe))

    export = run_dir / "eval" / "export"
    results = json.loads((export / "eval.json").read_text())["models"]
    assert list(results) == ["small", "other"]
    assert results["small"]["seq_len"] == 16 and results["other"]["seq_len"] == 32
    val = TokenShards(run_dir / "tokenize" / "export" / "val")
    assert val.num_windows(32) > 3  # so max_tokens, not the data, limits what is scored
    assert results["small"]["num_tokens"] == (100 // 16) * 16
    assert results["other"]["num_tokens"] == (100 // 32) * 32
    for metrics in results.values():
        assert 0 < metrics["unigram_loss"] < math.log(len(tokenizer))
        assert metrics["bits_per_byte"] > 0 and math.isfinite(metrics["val_loss"])
    samples = [json.loads(line) for line in (export / "samples.jsonl").read_text().splitlines()]
    assert [(s["model"], s["prompt"]) for s in samples] == [
        (model, prompt) for model in ("small", "other") for prompt in ("def ", "x <y>")
    ]
    for name, seed in (("small", 0), ("other", 1)):  # each model's own greedy completions
        model = tiny_llama(vocab_size=len(tokenizer), seed=seed)
        expected = greedy_samples(model, tokenizer, ["def ", "x <y>"], max_new_tokens=4)
        completions = [s["completion"] for s in samples if s["model"] == name]
        assert completions == expected and all(completions), name
    summary = json.loads((run_dir / "eval" / SUMMARY_FILE).read_text())
    assert summary["headline"] == "val_loss"
    assert summary["metrics"]["val_loss"] == results["small"]["val_loss"]
    assert summary["metrics"]["other/val_loss"] == results["other"]["val_loss"]
    assert [row["step"] for row in read_metrics(run_dir / "eval")] == [0, 1]


def test_evaluate_model_val_loss_per_source_of_a_mixture(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    from eval.mixture import target_sources

    model = tiny_llama(vocab_size=len(tokenizer))
    ids = tokenizer.encode(SAMPLE_TEXT * 20, add_special_tokens=False)
    windows = np.array(ids[: 4 * 25]).reshape(4, 25)
    train_counts = np.bincount(ids, minlength=len(tokenizer))
    # val tokens [0, 30) from "code", [30, 70) from "prose", then "code" again
    ends, owners = np.array([30, 70, 200]), np.array([0, 1, 0])
    of_target = target_sources(ends, owners, len(windows), 24)
    # targets of window i are val tokens 24 * i + 1 ... 24 * i + 24: here 29, 30, 69, 70
    assert [of_target[1, 4], of_target[1, 5], of_target[2, 20], of_target[2, 21]] == [0, 1, 1, 0]

    metrics = evaluate_model(
        model, tokenizer, windows, train_counts, 3, sources=(["code", "prose"], of_target)
    )

    with torch.no_grad():
        logits = model(torch.as_tensor(windows[:, :-1])).logits
    nll = F.cross_entropy(
        logits.flatten(0, 1), torch.as_tensor(windows[:, 1:]).flatten(), reduction="none"
    ).view(4, 24)
    positions = np.arange(4)[:, None] * 24 + 1 + np.arange(24)[None, :]
    prose = torch.as_tensor((positions >= 30) & (positions < 70))
    assert metrics["val_loss/prose"] == pytest.approx(nll[prose].mean().item(), rel=1e-5)
    assert metrics["val_loss/code"] == pytest.approx(nll[~prose].mean().item(), rel=1e-5)
    weighted = (metrics["val_loss/prose"] * 40 + metrics["val_loss/code"] * 56) / 96
    assert weighted == pytest.approx(metrics["val_loss"], rel=1e-5)
