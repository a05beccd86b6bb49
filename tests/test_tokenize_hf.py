"""Tokenize with a user's Hugging Face tokenizer (`tokenizer: {path: DIR}`), typed TokensMeta, and
tokens of another tokenizer refused: by the plan where it can tell, at run time otherwise."""

from __future__ import annotations

import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.trainers import BpeTrainer
from transformers import AutoTokenizer, ByT5Tokenizer, PreTrainedTokenizerFast

from data_prep.encode import Encoder, open_tokenization
from data_prep.mixture import mixture_of
from data_prep.shards import TokenShards
from data_prep.sources import SourceConfig
from data_prep.tokenize import tokenize_corpus
from data_prep.tokenizer import EOS_ID, train_tokenizer
from data_prep.tokens_meta import TokensMeta, tokenizer_identity
from pipeline.engine.config import validate_recipe
from pipeline.engine.errors import PipelineError
from pipeline.engine.graph import fingerprints
from pipeline.engine.inputs import plan_problems
from tests.helpers import cli, write_recipe
from tests.test_tokenize_fanout import big_txt, export_files

ENDOFTEXT = "<|endoftext|>"
WORDS = [
    "alpha",
    "beta",
    "x = 1",
    "\tindent",
    "two  spaces",
    "é ü",
    "中文",
    "tokens",
    "merge",
    "🙂",
]


def documents(count: int, seed: int = 0) -> list[str]:
    """Documents of one to a few lines: words, code, tabs, runs of spaces, any Unicode."""
    rng = random.Random(seed)
    return [
        "\n".join(
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
            for _ in range(rng.randint(1, 4))
        )
        + rng.choice(["", "\n", "  "])
        for _ in range(count)
    ]


def build_tokenizer_dir(path: Path, seed: int = 0) -> Path:
    """A byte-level BPE (lossless on any text) saved as a fast tokenizer, eos <|endoftext|>."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=400,
        special_tokens=[ENDOFTEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(documents(300, seed), trainer)
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=ENDOFTEXT).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer_dir(tmp_path_factory.mktemp("hf") / "bpe")


@pytest.fixture(scope="module")
def sp_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer stage's export: tokenizer.model plus the HF tokenizer that encodes alike."""
    out = tmp_path_factory.mktemp("sp")
    train_tokenizer(documents(400, seed=1), out, vocab_size=300)
    return out


def split_documents(tokens: np.ndarray, eos_id: int) -> list[list[int]]:
    """The documents of a token stream in which each document ends with eos_id."""
    ends = np.flatnonzero(tokens == eos_id)
    assert len(ends) and ends[-1] == len(tokens) - 1, "the stream does not end with eos"
    starts = [0, *(ends[:-1] + 1).tolist()]
    return [tokens[s:e].tolist() for s, e in zip(starts, ends.tolist(), strict=True)]


def test_hf_tokenizer_shards_decode_to_the_documents_with_eos_between(
    hf_dir: Path, tmp_path: Path
) -> None:
    docs = documents(500, seed=2)
    stats = tokenize_corpus(docs, hf_dir, tmp_path, val_fraction=0.0, num_workers=2)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    eos_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    train = TokenShards(tmp_path / "train")
    encoded = split_documents(train.tokens(0, train.num_tokens), eos_id)
    assert len(encoded) == len(docs) == stats["documents"]
    expected = tokenizer(docs, add_special_tokens=False)["input_ids"]
    assert encoded == expected  # the same ids as the tokenizer itself gives each document
    decoded = [tokenizer.decode(ids, clean_up_tokenization_spaces=False) for ids in encoded]
    assert decoded == docs  # byte-level BPE is lossless
    meta = TokensMeta.read(tmp_path)
    assert (meta.vocab_size, meta.eos_id, meta.dtype) == (len(tokenizer), eos_id, "uint16")
    assert meta.tokenizer_path == str(hf_dir)
    assert meta.tokenizer_id == tokenizer_identity(hf_dir)
    assert meta.splits["train"].num_tokens == train.num_tokens


@pytest.mark.parametrize("family", ["qwen2", "llama", "gpt2"])
def test_encoder_gives_the_ids_of_each_family_tokenizer(
    request: pytest.FixtureRequest, family: str
) -> None:
    """Downloaded-style dirs: the same ids as tokenizer(doc), and the end-of-text separator."""
    from tests.hf_models import corpus

    model_dir = request.getfixturevalue(f"{family}_dir")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tok = open_tokenization(model_dir)
    docs = corpus()[:300] + ["literal <|im_end|> and </s> and <s> in text", "x" * 5000]
    with Encoder(tok.backend, tok.dtype, tok.eos_id, num_workers=2) as encoder:
        got = [tokens.tolist() for tokens, _ in encoder.encode((d, None) for d in docs)]
    expected = tokenizer(docs, add_special_tokens=False)["input_ids"]
    assert got == [ids + [tok.eos_id] for ids in expected]
    separator = {"qwen2": ENDOFTEXT, "gpt2": ENDOFTEXT, "llama": "</s>"}[family]
    assert tok.eos_id == tokenizer.convert_tokens_to_ids(separator)
    if family == "qwen2":  # its eos_token ends a chat turn; pretraining documents end otherwise
        assert tokenizer.eos_token == "<|im_end|>" and tok.eos_id != tokenizer.eos_token_id


def test_sentencepiece_and_its_hf_export_give_the_same_shards_and_identity(
    sp_export: Path, tmp_path: Path
) -> None:
    """The tokenizer stage's model (SentencePiece, as before) and `{path: its export}` (the HF
    backend) write the same bytes and record the same tokenizer identity."""
    docs = documents(800, seed=3)
    settings = {"seed": 4, "val_fraction": 0.1, "num_workers": 2, "shard_tokens": 1001}
    tokenize_corpus(docs, sp_export / "tokenizer.model", tmp_path / "sp", **settings)
    tokenize_corpus(docs, sp_export, tmp_path / "hf", **settings)
    sp_files, hf_files = export_files(tmp_path / "sp"), export_files(tmp_path / "hf")
    assert sp_files.keys() == hf_files.keys() and len(sp_files) > 4
    assert [n for n in sp_files if n != "meta.json" and sp_files[n] != hf_files[n]] == []
    sp_meta, hf_meta = TokensMeta.read(tmp_path / "sp"), TokensMeta.read(tmp_path / "hf")
    assert sp_meta.eos_id == hf_meta.eos_id == EOS_ID
    assert sp_meta.tokenizer_id == hf_meta.tokenizer_id == tokenizer_identity(sp_export)
    assert sp_meta.tokenizer_path is None and hf_meta.tokenizer_path == str(sp_export)


def stopping(docs: list[str], at: int) -> Iterator[str]:
    yield from docs[:at]
    raise KeyboardInterrupt


def test_hf_tokenize_resumes_and_mixes_as_before(hf_dir: Path, tmp_path: Path) -> None:
    docs = documents(12_000, seed=5)  # the encoder reads 4096 documents at a time
    settings = {"seed": 1, "val_fraction": 0.1, "num_workers": 1, "shard_tokens": 2999}
    tokenize_corpus(docs, hf_dir, tmp_path / "reference", **settings)
    state = tmp_path / "state"
    with pytest.raises(KeyboardInterrupt):
        tokenize_corpus(
            stopping(docs, 9000), hf_dir, tmp_path / "out", resume_dir=state, **settings
        )
    stats = tokenize_corpus(docs, hf_dir, tmp_path / "out", resume_dir=state, **settings)
    assert stats["resumed_documents"] > 0
    assert export_files(tmp_path / "out") == export_files(tmp_path / "reference")

    for name, seed in (("a", 6), ("b", 7)):
        (tmp_path / f"{name}.txt").write_text("\n\n".join(documents(200, seed)), encoding="utf-8")
    sources = [
        SourceConfig(uri=str(tmp_path / f"{n}.txt"), weight=w) for n, w in (("a", 3), ("b", 1))
    ]
    tokenize_corpus(mixture_of(sources, ["a", "b"]), hf_dir, tmp_path / "mix", **settings)
    meta = TokensMeta.read(tmp_path / "mix")
    assert meta.mixture is not None and [s.name for s in meta.mixture.sources] == ["a", "b"]
    assert meta.mixture.val_runs and meta.tokenizer_path == str(hf_dir)


def test_tokens_meta_round_trips_and_reads_older_exports(tmp_path: Path) -> None:
    meta = TokensMeta.model_validate(
        {
            "vocab_size": 70_000,
            "eos_id": 3,
            "dtype": "uint32",
            "splits": {"train": {"num_tokens": 10, "num_documents": 2}},
            "mixture": {"kind": "weighted", "sources": [{"name": "a", "epochs": None}],
                        "val_runs": [[5, 0]], "lag_spread": 1.5},
            "tokenizer_id": "abc",
            "tokenizer_path": "/models/x",
        }
    )  # fmt: skip
    meta.write(tmp_path)
    assert TokensMeta.read(tmp_path) == meta
    assert "None" not in (tmp_path / "meta.json").read_text()
    written = TokensMeta.read(tmp_path).model_dump(mode="json")
    assert written["mixture"]["sources"][0]["epochs"] is None  # extra fields kept as written
    old = '{"vocab_size": 300, "eos_id": 2, "dtype": "uint16", "splits": {}}'
    (tmp_path / "meta.json").write_text(old)
    assert TokensMeta.read(tmp_path).tokenizer_id is None
    TokensMeta.read(tmp_path).write(tmp_path / "again")
    assert (tmp_path / "again" / "meta.json").read_text().count(":") == 4  # no new keys


def test_tokens_of_another_tokenizer_are_refused_at_run_time(
    hf_dir: Path, sp_export: Path, tmp_path: Path
) -> None:
    tokenize_corpus(documents(50), sp_export / "tokenizer.model", tmp_path / "tokens")
    meta = TokensMeta.read(tmp_path / "tokens")
    meta.require_tokenizer(sp_export, str(sp_export), "tokenize", "pretrain")
    # A family's export adds special tokens past the vocabulary (bert's mask): still the same.
    extended = AutoTokenizer.from_pretrained(sp_export)
    extended.add_special_tokens({"mask_token": "<mask>"})
    extended.save_pretrained(tmp_path / "export")
    assert len(extended) == meta.vocab_size + 1
    meta.require_tokenizer(tmp_path / "export", "export", "tokenize", "pretrain")
    meta.require_tokenizer(extended, "export", "tokenize", "eval")
    with pytest.raises(PipelineError) as raised:
        meta.require_tokenizer(hf_dir, str(hf_dir), "tokenize", "eval")
    message = str(raised.value)
    assert "\n" not in message and message.startswith("stages.eval: the tokenizer of")
    assert f"tokenizer: {{path: {hf_dir}}}" in message


def test_a_slow_tokenizer_is_one_line_naming_the_directory(tmp_path: Path) -> None:
    ByT5Tokenizer().save_pretrained(tmp_path / "byt5")
    with pytest.raises(PipelineError) as raised:
        open_tokenization(tmp_path / "byt5")
    assert str(tmp_path / "byt5") in str(raised.value) and "slow" in str(raised.value)
    assert "\n" not in str(raised.value)


def tokenize_recipe(tmp_path: Path, tokenizer: object) -> object:
    stages = {"tokenize": {"kind": "tokenize", "source": "builtin:python-stdlib"}}
    stages["tokenize"]["tokenizer"] = tokenizer
    return validate_recipe({"name": "t", "run_dir": str(tmp_path / "run"), "stages": stages})


def test_a_tokenizer_directory_is_planned_and_fingerprinted_by_content(
    hf_dir: Path, tmp_path: Path
) -> None:
    local = shutil.copytree(hf_dir, tmp_path / "tok")
    recipe = tokenize_recipe(tmp_path, {"path": str(local)})
    assert plan_problems(recipe) == []  # no tokenizer stage needed
    before = fingerprints(recipe)["tokenize"]
    assert fingerprints(recipe)["tokenize"] == before
    tokenizer_json = local / "tokenizer.json"
    tokenizer_json.write_text(tokenizer_json.read_text().replace('"alpha"', '"alphA"', 1))
    assert fingerprints(recipe)["tokenize"] != before
    empty = tmp_path / "empty"
    empty.mkdir()
    problems = plan_problems(tokenize_recipe(tmp_path, {"path": str(empty)}))
    assert len(problems) == 1 and "no tokenizer files" in problems[0]


def dry_run(tmp_path: Path, tokenizer: object, model_dir: Path) -> tuple[int, list[str]]:
    """`pipeline run --dry-run` of tokenizer -> tokenize -> pretrain from model_dir."""
    source = {"uri": "builtin:python-stdlib", "max_bytes": 100_000}
    tokenize = {"kind": "tokenize", "after": ["tokenizer"], "source": source}
    if tokenizer is not None:
        tokenize["tokenizer"] = tokenizer
    data = {
        "name": "cpt",
        "run_dir": str(tmp_path / "run"),
        "tracking": {"mode": "disabled"},
        "stages": {
            "tokenizer": {"kind": "tokenizer", "source": source, "vocab_size": 300},
            "tokenize": tokenize,
            "pretrain": {
                "kind": "pretrain",
                "after": ["tokenize"],
                "model": {"path": str(model_dir)},
            },
        },
    }
    result = cli("run", "--dry-run", str(write_recipe(tmp_path / "recipe.yaml", data)))
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stderr.strip().splitlines()


@pytest.mark.e2e
def test_pretrain_plan_refuses_tokens_of_another_tokenizer(
    tmp_path: Path, qwen2_dir: Path, gpt2_dir: Path
) -> None:
    code, lines = dry_run(tmp_path, None, qwen2_dir)
    assert code == 2 and len(lines) == 1, lines
    assert "stages.pretrain.model.path" in lines[0] and "a tokenizer stage's" in lines[0]
    assert f"set stages.tokenize.tokenizer: {{path: {qwen2_dir}}}" in lines[0]

    code, lines = dry_run(tmp_path, {"path": str(gpt2_dir)}, qwen2_dir)
    assert code == 2 and len(lines) == 1, lines
    assert f"the tokenizer of {gpt2_dir}" in lines[0] and str(qwen2_dir) in lines[0]

    code, lines = dry_run(tmp_path, {"path": str(qwen2_dir)}, qwen2_dir)
    assert code == 0, lines
    # Another directory with the same tokenizer (e.g. a bigger model of the family) is fine.
    sibling = shutil.copytree(qwen2_dir, tmp_path / "sibling")
    code, lines = dry_run(tmp_path, {"path": str(sibling)}, qwen2_dir)
    assert code == 0, lines


@pytest.mark.e2e
def test_hf_tokenize_parts_give_the_bytes_of_one_process(hf_dir: Path, tmp_path: Path) -> None:
    path = big_txt(tmp_path / "input.txt", count=3000)
    tokenize = {"kind": "tokenize", "source": {"uri": str(path)}, "tokenizer": {"path": str(hf_dir)},
                "num_workers": 1, "shard_tokens": 2999, "val_fraction": 0.1}  # fmt: skip
    data = {"name": "hf", "run_dir": str(tmp_path / "run"), "tracking": {"mode": "disabled"},
            "stages": {"tokenize": tokenize}}  # fmt: skip
    recipe = write_recipe(tmp_path / "hf.yaml", data)
    export = tmp_path / "run" / "tokenize" / "export"
    single = cli("run", str(recipe))
    assert single.returncode == 0, single.stderr
    expected = export_files(export)
    fanned = cli("run", str(recipe), "-o", "stages.tokenize.parts=2")
    assert fanned.returncode == 0, fanned.stderr
    assert export_files(export) == expected
    assert TokensMeta.read(export).tokenizer_path == str(hf_dir)
    log = (tmp_path / "run" / "tokenize" / "stage.log").read_text()
    assert "encoding parts [0, 1] of 2 in 2 processes" in log
    assert f"encoding with the tokenizer of {hf_dir}" in log
