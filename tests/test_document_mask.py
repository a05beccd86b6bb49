"""Packing with document masking (`document_mask: true` on pretrain): inside a packed window no
token attends across an end-of-document token, positions restart at each document, and the
families that cannot honour that are refused at recipe validation."""

from __future__ import annotations

import math
import shlex
import string
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from pipeline.engine.config import validate_recipe
from pipeline.engine.context import StageContext
from pipeline.engine.errors import PipelineError
from pipeline.engine.manifest import write_manifest
from pipeline.models import build_model
from pipeline.models.families import EOS_ID, FAMILIES, ModelConfig
from pipeline.train.objectives import CausalLM, document_positions, next_token_inputs

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from pipeline.train.loop import Workload

VOCAB, SEQ_LEN = 64, 48
SUPPORTED = [arch for arch, spec in FAMILIES.items() if spec.document_mask_problem is None]
REJECTED = [arch for arch, spec in FAMILIES.items() if spec.document_mask_problem is not None]


def _documents(rng: np.random.Generator, lengths: list[int]) -> list[np.ndarray]:
    """Documents of random non-special tokens, each ending with eos, as tokenize writes them."""
    return [np.append(rng.integers(4, VOCAB, n - 1), EOS_ID) for n in lengths]


def _model(arch: str, attention: str) -> PreTrainedModel:
    import torch

    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, hidden_size=32, num_layers=2, num_heads=4)
    model = build_model(cfg, VOCAB, SEQ_LEN, document_eos_id=EOS_ID).model.float().eval()
    model.set_attn_implementation(attention)
    return model


def test_document_mask_positions_restart_after_each_eos() -> None:
    import torch

    e = EOS_ID
    rows = torch.tensor([[7, 8, e, 9, e, e, 5, 6], [7, 8, 9, 10, 11, 12, 13, 14]])
    expected = [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]
    assert document_positions(rows, e).tolist() == expected


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", SUPPORTED)
def test_document_mask_packed_logits_equal_each_document_alone(arch: str, attention: str) -> None:
    import torch

    model = _model(arch, attention)
    rng = np.random.default_rng(1)
    # Two rows with different boundaries; each window is SEQ_LEN + 1 tokens, the last document cut.
    rows = [_documents(rng, [11, 1, 17, 30]), _documents(rng, [5, 23, 40])]
    windows = torch.tensor(np.stack([np.concatenate(docs)[: SEQ_LEN + 1] for docs in rows]))
    with torch.no_grad():
        kwargs, _ = next_token_inputs(windows, EOS_ID)
        packed = model(**kwargs).logits  # [2, T, V]
        plain = model(input_ids=windows[:, :-1]).logits
        for row, docs in enumerate(rows):
            start = 0
            for doc in docs:
                end = min(start + len(doc), SEQ_LEN)
                alone = model(input_ids=torch.tensor(doc[: end - start])[None]).logits[0]
                torch.testing.assert_close(packed[row, start:end], alone, atol=1e-5, rtol=0)
                start = end
    # Without the mask the later documents see the earlier ones: the comparison has teeth.
    assert (plain[0, 12:29] - packed[0, 12:29]).abs().max() > 1e-3


def test_document_mask_loss_is_the_documents_own_losses() -> None:
    """The eos token's target (the next document's first token) is not scored."""
    import torch
    import torch.nn.functional as F

    model = _model("llama", "sdpa")
    docs = _documents(np.random.default_rng(2), [9, 14, 26])
    window = torch.tensor(np.concatenate(docs))[None]  # exactly SEQ_LEN + 1 tokens
    assert window.size(1) == SEQ_LEN + 1
    with torch.no_grad():
        loss, _ = CausalLM(EOS_ID).loss(model, window, torch.Generator())
        total, scored = 0.0, 0
        for doc in docs:
            tokens = torch.tensor(doc)[None]
            logits = model(input_ids=tokens[:, :-1]).logits[0]
            total += F.cross_entropy(logits, tokens[0, 1:], reduction="sum").item()
            scored += len(doc) - 1
    assert scored == SEQ_LEN - (len(docs) - 1)
    assert loss.item() == pytest.approx(total / scored, abs=1e-5)


def _recipe(run_dir: Path, arch: str, **pretrain: object) -> dict[str, object]:
    source = {"uri": "builtin:python-stdlib", "max_bytes": 300_000}
    stage = {"kind": "pretrain", "after": ["tokenize"], "model": {"arch": arch},
             "document_mask": True, **pretrain}  # fmt: skip
    return {
        "name": "docmask",
        "run_dir": str(run_dir),
        "tracking": {"mode": "disabled"},
        "launch": {"nproc": 1},
        "stages": {
            "tokenizer": {"kind": "tokenizer", "source": source, "vocab_size": 400},
            "tokenize": {"kind": "tokenize", "after": ["tokenizer"], "source": source},
            "pretrain": stage,
        },
    }


@pytest.mark.parametrize("arch", REJECTED)
def test_document_mask_refused_for_families_that_cannot_keep_documents_apart(
    arch: str, tmp_path: Path
) -> None:
    with pytest.raises(PipelineError) as caught:
        validate_recipe(_recipe(tmp_path, arch))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("recipe: stages.pretrain.document_mask: got True")
    assert f"arch {arch}" in message and "set document_mask: false" in message
    assert all(name in message for name in SUPPORTED)


@pytest.mark.parametrize("arch", SUPPORTED)
def test_document_mask_accepted_for_causal_families(arch: str, tmp_path: Path) -> None:
    assert validate_recipe(_recipe(tmp_path, arch)).stages["pretrain"].document_mask


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory whose tokenizer and tokenize stages are done: many short stdlib documents."""
    from data_prep.tokenize import tokenize_corpus
    from data_prep.tokenizer import MODEL_FILE, train_tokenizer

    root = tmp_path_factory.mktemp("docmask")
    text = "".join(Path(m.__file__).read_text(encoding="utf-8") for m in (textwrap, string, shlex))
    documents = [line for line in text.splitlines() if line.strip()]  # ~35 tokens each
    train_tokenizer(documents, root / "tokenizer" / "export", vocab_size=400, num_threads=1)
    tokenize_corpus(
        documents,
        root / "tokenizer" / "export" / MODEL_FILE,
        root / "tokenize" / "export",
        val_fraction=0.1,
        num_workers=1,
    )
    for name in ("tokenizer", "tokenize"):
        write_manifest(root / name, {"stage": name, "status": "done"})
    return root


def _workload(run_dir: Path, document_mask: bool) -> tuple[StageContext, Workload]:
    from pipeline.stages.pretrain import workload

    pretrain = {"model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2}, "seq_len": 64,
                "micro_batch_size": 8, "max_steps": 30, "optim": {"lr": 3e-3},
                "schedule": {"warmup_steps": 3}, "log_every": 1, "eval_every": 30,
                "eval_batches": 2, "checkpoint_every": 30, "document_mask": document_mask}  # fmt: skip
    recipe = validate_recipe(_recipe(run_dir, "llama", **pretrain))
    ctx = StageContext(run_dir=run_dir, name="pretrain", recipe=recipe, fingerprint="docmask")
    return ctx, workload(ctx)[0]


def test_document_mask_pretrain_in_process_trains(run_dir: Path) -> None:
    import torch

    from pipeline.engine.tracking import read_metrics
    from pipeline.train.loop import train

    ctx, work = _workload(run_dir, document_mask=True)
    _, plain = _workload(run_dir, document_mask=False)
    batch = work.train_batch(3, 0, 0, 1)  # [B, T + 1], the same pure function either way
    assert np.array_equal(batch, plain.train_batch(3, 0, 0, 1))
    assert (batch[:, :-1] == EOS_ID).sum() >= 4, "windows should pack several documents"
    tokens = torch.from_numpy(batch)
    with torch.no_grad():
        masked = work.loss(work.model, tokens, torch.Generator())[0]
        unmasked = plain.loss(plain.model, tokens, torch.Generator())[0]
    assert masked.item() != unmasked.item()  # same weights (same seed), different attention

    summary = train(ctx, ctx.config, work).summary  # type: ignore[arg-type]
    losses = [r["train/loss"] for r in read_metrics(ctx.stage_dir) if "train/loss" in r]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-5:]) < losses[0] - 1.0
    assert math.isfinite(summary["val_loss"])
