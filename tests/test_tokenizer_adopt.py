"""The tokenizer stage adopts a user's tokenizer (`tokenizer: {path: DIR}`): tokenize encodes with
it, pretrain builds a model from scratch with its special ids, and every export carries its files
byte for byte; the plan refuses what cannot work with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from data_prep.shards import TokenShards
from data_prep.sources import SourceConfig, mixed_documents
from data_prep.tokenizer import train_tokenizer
from data_prep.tokenizer_meta import META_FILE, STAGE_IDS, TokenizerMeta
from data_prep.tokens_meta import TokensMeta, tokenizer_identity
from tests.helpers import cli, run_in_process, write_recipe

SOURCE = {"uri": "builtin:python-stdlib", "max_bytes": 60_000}
MODEL = {"arch": "llama", "hidden_size": 32, "num_layers": 1, "num_heads": 2}


def recipe(root: Path, tokenizer_dir: Path, **pretrain: Any) -> dict[str, Any]:
    """Adopt -> tokenize -> pretrain from scratch -> sft on the builtin arithmetic task."""
    return {
        "name": "adopt",
        "run_dir": str(root / "run"),
        "tracking": {"mode": "disabled"},
        "launch": {"nproc": 1},
        "stages": {
            "tokenizer": {"kind": "tokenizer", "tokenizer": {"path": str(tokenizer_dir)},
                          "source": SOURCE},
            "tokenize": {"kind": "tokenize", "after": ["tokenizer"], "num_workers": 1,
                         "source": SOURCE},
            "pretrain": {"kind": "pretrain", "after": ["tokenize"], "seq_len": 32,
                         "micro_batch_size": 4, "max_steps": 2, "model": dict(MODEL),
                         "schedule": {"warmup_steps": 1}, "log_every": 1, "eval_every": 2,
                         "eval_batches": 1, "checkpoint_every": 2, **pretrain},
            "sft": {"kind": "sft", "after": ["pretrain"], "max_length": 32, "max_steps": 2,
                    "eval_problems": 4},
        },
    }  # fmt: skip


@pytest.fixture(scope="module")
def adopted_run(gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The recipe on GPT-2's tokenizer (no pad token, <|endoftext|> its only special token)."""
    root = tmp_path_factory.mktemp("adopt")
    result = cli("run", str(write_recipe(root / "recipe.yaml", recipe(root, gpt2_dir))))
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run"


@pytest.mark.e2e
def test_a_model_pretrained_from_scratch_speaks_the_adopted_tokenizer(
    adopted_run: Path, gpt2_dir: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    record = TokenizerMeta.read(adopted_run / "tokenizer" / "export")
    assert record.adopted and record.eos_id == endoftext and record.pad_id is None
    tokens = TokensMeta.read(adopted_run / "tokenize" / "export")
    assert tokens.eos_id == endoftext
    assert tokens.tokenizer_id == tokenizer_identity(gpt2_dir, tokens.vocab_size)
    for stage in ("tokenizer", "pretrain", "sft"):
        export = adopted_run / stage / "export"
        for name in ("tokenizer.json", "tokenizer_config.json"):
            assert (export / name).read_bytes() == (gpt2_dir / name).read_bytes(), (stage, name)
    model = AutoModelForCausalLM.from_pretrained(adopted_run / "pretrain" / "export")
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    # No pad token: padding is the end-of-document token, which also ends generation.
    for config in (model.config, model.generation_config):
        assert config.eos_token_id == config.pad_token_id == endoftext
    assert model.config.bos_token_id == tokenizer.bos_token_id


@pytest.mark.e2e
def test_an_adopted_sentencepiece_tokenizer_encodes_as_transformers_does(
    llama_dir: Path, tmp_path: Path
) -> None:
    """Llama's directory brings a tokenizer.model too; tokenize must still encode as its
    transformers tokenizer does (BOS not added inside documents, </s> between them)."""
    data = recipe(tmp_path, llama_dir)
    data["stages"] = {k: data["stages"][k] for k in ("tokenizer", "tokenize")}
    result = cli("run", str(write_recipe(tmp_path / "recipe.yaml", data)))
    assert result.returncode == 0, result.stderr[-3000:]
    export = tmp_path / "run" / "tokenize" / "export"
    meta = TokensMeta.read(export)
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    assert meta.eos_id == tokenizer.eos_token_id
    documents = [doc for doc, _ in mixed_documents([SourceConfig(**SOURCE)])]
    expected = {tuple(ids) for ids in tokenizer(documents, add_special_tokens=False)["input_ids"]}
    val = TokenShards(export / "val")
    stream = val.tokens(0, val.num_tokens)
    ends = np.flatnonzero(stream == meta.eos_id)
    found = [tuple(stream[a + 1 : b]) for a, b in zip([-1, *ends[:-1]], ends, strict=True)]
    assert found and all(ids in expected for ids in found)


def test_a_tokenizer_export_without_its_record_reads_as_the_stages_sentencepiece(
    tmp_path: Path,
) -> None:
    text = "".join(f"line {i}: some text to train a tokenizer on, {i * 7}\n" for i in range(400))
    train_tokenizer([text], tmp_path, vocab_size=300)
    written = TokenizerMeta.read(tmp_path)
    (tmp_path / META_FILE).unlink()  # as exports made before the record existed
    assert TokenizerMeta.read(tmp_path) == written
    assert written.backend == "sentencepiece" and written.vocab_size == 300
    assert {k: getattr(written, k) for k in STAGE_IDS} == STAGE_IDS


REFUSALS = {
    "training settings with an adopted tokenizer": (
        lambda s: s["tokenizer"].update(vocab_size=1000),
        "stages.tokenizer",
    ),
    "neither a source nor a tokenizer": (
        lambda s: s["tokenizer"].pop("tokenizer") and s["tokenizer"].pop("source"),
        "stages.tokenizer",
    ),
    "a missing directory": (
        lambda s: s["tokenizer"].update(tokenizer={"path": "/nonexistent/dir"}),
        "stages.tokenizer.tokenizer.path",
    ),
    "a masked LM from scratch on an adopted tokenizer": (
        lambda s: s["pretrain"]["model"].update(arch="bert"),
        "stages.pretrain.model.arch",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_dry_run_refuses_in_one_line(
    case: str, gpt2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    change, names = REFUSALS[case]
    data = recipe(tmp_path, gpt2_dir)
    change(data["stages"])
    code, err = run_in_process(
        ["run", "--dry-run", str(write_recipe(tmp_path / "r.yaml", data))], capsys
    )
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, f"exit {code}:\n{err}"
    assert lines[0].startswith("error: ") and names in lines[0], lines[0]
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").rglob("stage.json"))


def test_dry_run_accepts_the_adopting_recipe(
    gpt2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_recipe(tmp_path / "r.yaml", recipe(tmp_path, gpt2_dir))
    assert run_in_process(["run", "--dry-run", str(path)], capsys) == (0, "")
