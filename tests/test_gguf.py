"""Exports read by llama.cpp as we read them (pipeline/train/tokenizer_files.py): llama.cpp's own
converter turns a real pretrain export into a GGUF whose vocabulary is our SentencePiece model,
pieces, scores and types, and which says our tokenizer adds no BOS, no EOS and no prefix space.

The converter (convert_hf_to_gguf.py with its gguf-py) is unpacked into the virtualenv by
`make test` (the Makefile's llama-cpp step); without it the conversion test skips.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pipeline.engine.config import validate_recipe
from pipeline.engine.runner import run_recipe
from pipeline.train.tokenizer_files import carry_sentencepiece
from tests.helpers import tiny_recipe

CONVERTER_DIR = Path(sys.prefix) / "llama.cpp"  # where the Makefile unpacks it
CONVERTER = CONVERTER_DIR / "convert_hf_to_gguf.py"
# SentencePiece piece types as llama.cpp's vocabulary stores them (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny tokenizer -> tokenize -> pretrain run, in this process."""
    run_dir = tmp_path_factory.mktemp("gguf") / "run"
    data = tiny_recipe(run_dir)
    del data["stages"]["eval"]
    data["stages"]["pretrain"].update(max_steps=4, eval_every=4, checkpoint_every=4)
    run_recipe(validate_recipe(data))
    return run_dir


@pytest.fixture(scope="module")
def gguf() -> Any:
    """llama.cpp's gguf-py, as its converter imports it."""
    if not CONVERTER.is_file():
        pytest.skip(f"llama.cpp's converter is not at {CONVERTER}: `make llama-cpp` unpacks it")
    sys.path.insert(0, str(CONVERTER_DIR / "gguf-py"))
    try:
        import gguf
    finally:
        sys.path.remove(str(CONVERTER_DIR / "gguf-py"))
    return gguf


def _convert(export: Path, out: Path) -> None:
    """Convert `export` with llama.cpp's converter, weights in f32."""
    result = subprocess.run(
        [sys.executable, str(CONVERTER), str(export), "--outfile", str(out), "--outtype", "f32"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def _fields(gguf: Any, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metadata key -> value, tensor name -> shape) of a GGUF file."""
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    return fields, {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}


def test_llama_cpp_converts_a_pretrain_export_with_our_sentencepiece_vocab_and_flags(
    run_dir: Path, gguf: Any, tmp_path: Path
) -> None:
    import sentencepiece as spm
    from transformers import AutoTokenizer

    export = run_dir / "pretrain" / "export"
    out = tmp_path / "model.gguf"
    _convert(export, out)
    fields, tensors = _fields(gguf, out)
    processor = spm.SentencePieceProcessor(
        model_file=str(run_dir / "tokenizer/export/tokenizer.model")
    )
    size = processor.get_piece_size()
    config = json.loads((export / "config.json").read_text())
    assert fields["general.architecture"] == "llama"
    assert tensors["token_embd.weight"] == (config["hidden_size"], config["vocab_size"])
    assert f"blk.{config['num_hidden_layers'] - 1}.attn_q.weight" in tensors
    # The SentencePiece vocabulary, not tokenizer.json's with placeholder scores.
    assert fields["tokenizer.ggml.model"] == "llama"
    tokens = fields["tokenizer.ggml.tokens"]
    assert tokens == [processor.id_to_piece(i) for i in range(size)]
    vocab = AutoTokenizer.from_pretrained(export).get_vocab()
    assert tokens == sorted(vocab, key=vocab.__getitem__)
    scores = fields["tokenizer.ggml.scores"]
    assert scores == pytest.approx([processor.get_score(i) for i in range(size)], abs=0)
    kinds = [
        UNKNOWN if processor.is_unknown(i) else CONTROL if processor.is_control(i)
        else BYTE if processor.is_byte(i) else NORMAL
        for i in range(size)
    ]  # fmt: skip
    assert fields["tokenizer.ggml.token_type"] == kinds
    assert kinds[:4] == [UNKNOWN, CONTROL, CONTROL, CONTROL] and kinds.count(BYTE) == 256
    normal = [score for score, kind in zip(scores, kinds, strict=True) if kind == NORMAL]
    assert len(set(normal)) == len(normal)  # BPE: one score per merge, not a placeholder
    # Encode as we do: no BOS, no EOS, no space before the text.
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.ggml.add_eos_token"] is False
    assert fields["tokenizer.ggml.add_space_prefix"] is False
    assert fields["tokenizer.ggml.bos_token_id"] == processor.bos_id()
    assert fields["tokenizer.ggml.eos_token_id"] == processor.eos_id()
    assert fields["tokenizer.ggml.padding_token_id"] == processor.pad_id()


def test_every_tokenizer_file_the_converter_reads_says_no_bos_no_eos_no_prefix_space(
    run_dir: Path,
) -> None:
    """The tokenizer stage's export and the pretrain export both; transformers encodes the same."""
    from transformers import AutoTokenizer

    text = "  def f(x):\n\treturn x  # é 42"
    for stage in ("tokenizer", "pretrain"):
        export = run_dir / stage / "export"
        config = json.loads((export / "tokenizer_config.json").read_text())
        flags = {k: config.get(k) for k in ("add_bos_token", "add_eos_token", "add_prefix_space")}
        assert flags == dict.fromkeys(flags, False), stage
        post = json.loads((export / "tokenizer.json").read_text())["post_processor"]
        assert post["single"] == [{"Sequence": {"id": "A", "type_id": 0}}], stage
        tokenizer = AutoTokenizer.from_pretrained(export)
        assert tokenizer(text)["input_ids"] == tokenizer.encode(text, add_special_tokens=False)
    model = (run_dir / "pretrain/export/tokenizer.model").read_bytes()
    assert model == (run_dir / "tokenizer/export/tokenizer.model").read_bytes()


def test_a_tokenizer_saved_by_a_trainer_export_gets_the_files_from_where_it_was_loaded(
    run_dir: Path, tmp_path: Path
) -> None:
    """As export_trainer saves the tokenizer a TRL stage loaded from its upstream export."""
    from transformers import AutoTokenizer

    from pipeline.models import unmatch_special_tokens

    tokenizer = AutoTokenizer.from_pretrained(run_dir / "pretrain" / "export")
    tokenizer.save_pretrained(tmp_path)
    unmatch_special_tokens(tmp_path / "tokenizer.json")
    assert not (tmp_path / "tokenizer.model").exists()  # save_pretrained writes no SP model
    assert "add_bos_token" not in json.loads((tmp_path / "tokenizer_config.json").read_text())
    carry_sentencepiece(Path(tokenizer.name_or_path), tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (config["add_bos_token"], config["add_eos_token"], config["add_prefix_space"]) == (
        False,
        False,
        False,
    )
    assert (tmp_path / "tokenizer.model").read_bytes() == (
        run_dir / "tokenizer/export/tokenizer.model"
    ).read_bytes()


def test_a_tokenizer_that_adds_bos_is_described_so(run_dir: Path, tmp_path: Path) -> None:
    """The flags say what tokenizer.json does, not what the tokenizer stage made."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run_dir / "pretrain" / "export", add_bos_token=True)
    tokenizer.save_pretrained(tmp_path)
    carry_sentencepiece(run_dir / "pretrain" / "export", tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (config["add_bos_token"], config["add_eos_token"]) == (True, False)


def test_a_sentencepiece_model_our_stage_did_not_make_is_left_alone(tmp_path: Path) -> None:
    """A user's model (here: SentencePiece's default normalisation, dummy prefix) keeps its files."""
    import sentencepiece as spm

    source, export = tmp_path / "user_model", tmp_path / "export"
    source.mkdir()
    export.mkdir()
    lines = [f"line {i} of some text, with words and numbers {i * 7}" for i in range(300)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(source / "tokenizer"), vocab_size=120,
        minloglevel=2,
    )  # fmt: skip
    (export / "tokenizer_config.json").write_text('{"add_prefix_space": true}')
    carry_sentencepiece(source, export)
    assert [p.name for p in export.iterdir()] == ["tokenizer_config.json"]
    assert (export / "tokenizer_config.json").read_text() == '{"add_prefix_space": true}'


def test_an_export_whose_tokenizer_is_not_the_sentencepiece_model_gets_no_copy_of_it(
    run_dir: Path, tmp_path: Path
) -> None:
    """llama.cpp would read tokenizer.model's ids, the model's embeddings follow tokenizer.json."""
    export = tmp_path / "export"
    shutil.copytree(run_dir / "pretrain" / "export", export)
    (export / "tokenizer.model").unlink()
    data = json.loads((export / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    first, second = list(vocab)[10:12]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (export / "tokenizer.json").write_text(json.dumps(data))
    config = (export / "tokenizer_config.json").read_text()
    carry_sentencepiece(run_dir / "tokenizer" / "export", export)
    assert not (export / "tokenizer.model").exists()
    assert (export / "tokenizer_config.json").read_text() == config
