"""Tokenizer stage: lossless round trip and Hugging Face export identical to SentencePiece."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from data_prep.sources import SourceConfig, iter_documents, stdlib_documents
from data_prep.tokenizer import Config, train_tokenizer, training_chunks

TRAIN_BYTES = 300_000
TRICKY = [
    "def f(x):\n    return x\n",
    "class A:\n    def g(self):\n        if x:\n            pass\n",
    " leading space",
    "   three leading spaces",
    "a  b   c    d",
    "\tx\t\ty\t",
    "\n\n\n",
    "trailing spaces   ",
    "trailing newline\n",
    "emoji 😀🚀 and ZWJ 👩‍👩‍👧",
    "CJK 中文字符 日本語 한국어",
    "combining e\u0301 a\u0308 \u0915\u094d\u0937",
    "windows\r\nline\r\nendings\r\n",
    "literal <s> </s> <unk> <pad> <0x41>",
    "mixed \u00a0nbsp\u2003em space\u200bzero width",
    "",
    " ",
    "What is 12 + 907? 919\nx1 = 0x1F + 3.14e-10, 2024-11-21 v2",
]


@pytest.fixture(scope="module", params=["bpe", "unigram", "bpe-split-digits"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp(request.param)
    source = SourceConfig(uri="builtin:python-stdlib", max_bytes=TRAIN_BYTES)
    stats = train_tokenizer(
        iter_documents(source),
        out,
        model_type=request.param.split("-")[0],
        vocab_size=700,
        split_digits=request.param.endswith("split-digits"),
    )
    return out, stats


def load(out: Path) -> tuple[Any, Any]:
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    return sp, AutoTokenizer.from_pretrained(str(out))


def held_out_documents() -> list[str]:
    """Every 15th stdlib file after the training sample (about 2 MB)."""
    return list(stdlib_documents())[200::15]


def test_export_files_and_special_ids(exported: Any) -> None:
    out, stats = exported
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()
    }
    sp, hf = load(out)
    assert stats["vocab_size"] == sp.get_piece_size() == len(hf) == 700
    assert 0 < stats["training_bytes"] <= TRAIN_BYTES and stats["bytes_per_token"] > 1.5
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2, 3)
    assert [sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert hf.encode("hello") == hf.encode("hello", add_special_tokens=False)


@pytest.mark.parametrize("text", TRICKY)
def test_lossless_and_identical_on_tricky_strings(exported: Any, text: str) -> None:
    sp, hf = load(exported[0])
    ids = sp.encode(text)
    assert sp.decode(ids) == text
    assert hf.encode(text) == ids
    assert hf.decode(hf.encode(text)) == text


def test_identical_on_held_out_stdlib(exported: Any) -> None:
    sp, hf = load(exported[0])
    docs = held_out_documents()
    assert len(docs) > 50
    sp_ids = sp.encode(docs)
    hf_ids = hf(docs)["input_ids"]
    mismatched = [i for i, (a, b) in enumerate(zip(sp_ids, hf_ids, strict=True)) if a != b]
    assert mismatched == []
    assert all(hf.decode(ids) == doc for ids, doc in zip(hf_ids, docs, strict=True))
    assert all(sp.decode(ids) == doc for ids, doc in zip(sp_ids, docs, strict=True))


def test_split_digits_gives_one_token_per_digit(exported: Any) -> None:
    out, _ = exported
    if not out.name.startswith("bpe-split-digits"):
        pytest.skip("only the split_digits tokenizer splits numbers by construction")
    sp, hf = load(out)
    pieces = [sp.id_to_piece(i) for i in hf.encode("x = 1234567 + 890")]
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("1234567890")


def test_whitespace_pieces_are_learned(exported: Any) -> None:
    sp, _ = load(exported[0])
    pieces = {sp.id_to_piece(i) for i in range(sp.get_piece_size())}
    assert "▁▁▁▁" in pieces
    assert any("\n" in p for p in pieces)


def test_training_chunks_keep_lines_and_fit() -> None:
    doc = "short line\n" + "x" * 9000 + "\n" + "é" * 3000 + "\nend"
    chunks = list(training_chunks([doc, "second"], chunk_bytes=4000))
    assert "".join(chunks) == doc + "second"
    assert all(len(c.encode()) <= 4000 for c in chunks)
    assert chunks[0] == "short line\n"


def test_config_accepts_bare_source_and_rejects_bad_values() -> None:
    from pydantic import ValidationError

    cfg = Config.model_validate({"kind": "tokenizer", "source": "builtin:python-stdlib"})
    assert [s.uri for s in cfg.source] == ["builtin:python-stdlib"] and cfg.model_type == "bpe"
    assert "python" in cfg.data_signature()["sources"][0]
    with pytest.raises(ValidationError):
        Config.model_validate({"kind": "tokenizer", "source": "x.txt", "vocab_size": 100})
    with pytest.raises(ValidationError):
        Config.model_validate({"kind": "tokenizer", "source": "x.txt", "bogus": 1})


# Tiny tokenizers for the agreement tests below: a stdlib sample without the letters of
# "<pad>", "<unk>" and "<0x41>" (so those literals hold characters that have no piece), and a
# split_digits sample where numerals other than 0-9 (², ½) sit inside pieces.
MISSING_LETTERS = "pdukx"
NUMERALS = "(x²) (y²), ½ ½ ½ ¼ ¾ ²)\n" * 400
# Whitespace, special-token literals, emoji, CJK, combining marks, code, letters without a piece,
# SentencePiece's own unknown mark (▅) and a noncharacter.
ATOMS = [" ", "\t", "\n", "\r\n", "\u00a0", "\u200b", "\ufeff", "\x00", "e\u0301", "\u0915\u094d"]
ATOMS += ["<s>", "</s>", "<pad>", "<unk>", "<0x41>", "<0xff>", "😀", "👩\u200d👩\u200d👧", "中文"]
ATOMS += ["def ", "self", "(x)", "==", "--", "1234", "²", "x", "p", "▅", "\uffff"]


def stdlib_files(start: int, stop: int) -> list[str]:
    """Stdlib files start..stop-1 in sorted order, without reading the rest."""
    import itertools

    return list(itertools.islice(stdlib_documents(), start, stop))


def tiny_tokenizer(out: Path, model_type: str, docs: list[str], split_digits: bool = False) -> Any:
    """(SentencePiece, tokenizers.Tokenizer) for a 400-piece tokenizer trained on `docs`."""
    import sentencepiece as spm
    from tokenizers import Tokenizer

    train_tokenizer(docs, out, model_type=model_type, vocab_size=400, split_digits=split_digits)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    return sp, Tokenizer.from_file(str(out / "tokenizer.json"))


def disagreements(sp: Any, hf: Any, texts: list[str]) -> list[tuple[str, list[str], list[str]]]:
    """(text, SentencePiece pieces, tokenizers pieces) for each text the two encode differently."""
    hf_ids = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    return [
        (text, sp.encode(text, out_type=str), [sp.id_to_piece(i) for i in ids])
        for text, ids in zip(texts, hf_ids, strict=True)
        if sp.encode(text) != ids
    ]


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def without_letters(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Any:
    strip = str.maketrans("", "", MISSING_LETTERS)
    docs = [doc.translate(strip) for doc in stdlib_files(0, 12)]
    return tiny_tokenizer(tmp_path_factory.mktemp(request.param), request.param, docs)


def test_special_literals_agree_when_their_letters_have_no_piece(without_letters: Any) -> None:
    # tokenizers' unigram matched the vocab entries <pad>, <unk>, <0x41> across the unknown
    # letters (as ids 3, 0, 69); SentencePiece never matches control or byte pieces.
    sp, hf = without_letters
    assert all(sp.piece_to_id(c) == sp.unk_id() for c in MISSING_LETTERS)
    texts = ["<pad>", "<unk>", "<0x41>", "</s>", "<s>", "a<pad>b", "<unk><unk>", "x<0xFF>\n"]
    assert disagreements(sp, hf, texts) == []
    assert all(sp.decode(sp.encode(text)) == text for text in texts)


def adversarial_texts(count: int, seed: int = 0) -> list[str]:
    """Random mixes of whitespace runs, special-token literals and any Unicode but surrogates."""
    import random

    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randrange(1, 30)):
            if rng.random() < 0.7:
                parts.append(rng.choice(ATOMS) * rng.choice([1, 1, 1, 2, 5, 17]))
            else:
                code = rng.randrange(0x110000 if rng.random() < 0.5 else 0x3000)
                parts.append(chr(code) if not 0xD800 <= code < 0xE000 else "?")
        texts.append("".join(parts))
    return texts


def test_adversarial_text_agrees(without_letters: Any) -> None:
    sp, hf = without_letters
    assert disagreements(sp, hf, adversarial_texts(400)) == []


def test_long_document_agrees(without_letters: Any) -> None:
    # The best unigram path scores below -2**20, where float32 sums of 1/16 steps round:
    # SentencePiece before 0.2.2 disagrees here (it rebases its sums from 0.2.2 on).
    sp, hf = without_letters
    doc = "".join(stdlib_files(300, 400))
    assert len(doc) > 1_000_000
    assert disagreements(sp, hf, [doc]) == []


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_split_digits_agrees_on_other_numerals(model_type: str, tmp_path: Path) -> None:
    # SentencePiece isolates 0-9 and full-width digits only; the Digits pre-tokenizer also
    # split ² and ½ out of pieces such as "²)" and "▁½".
    docs = [*stdlib_files(0, 12), NUMERALS]
    sp, hf = tiny_tokenizer(tmp_path, model_type, docs, split_digits=True)
    assert {"²)", "▁½"} & {sp.id_to_piece(i) for i in range(sp.get_piece_size())}
    texts = ["(x²)", " ½ ½", "²),", "a ¼", "x = 12 + \uff13\uff14", NUMERALS[:60]]
    assert disagreements(sp, hf, texts) == []
    assert [p for p in sp.encode("v 1024", out_type=str) if p.isdigit()] == list("1024")
