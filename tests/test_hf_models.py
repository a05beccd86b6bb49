"""The tiny downloaded-style model dirs (tests/hf_models.py) are what they claim: transformers
loads each with its family's classes, and each keeps its family's tokenizer and weight quirks."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.hf_models import CHATML_TEMPLATE, build_gpt2, build_llama, build_qwen2

FAMILIES = ["qwen2", "llama", "gpt2"]
BUILDERS: dict[str, Callable[[Path], Path]] = {
    "qwen2": build_qwen2,
    "llama": build_llama,
    "gpt2": build_gpt2,
}
# What save_pretrained writes for a causal LM and a fast tokenizer in transformers 5.x.
COMMON_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
}
EXTRA_FILES = {"qwen2": {"chat_template.jinja"}, "llama": {"tokenizer.model"}, "gpt2": set()}
CLASSES = {
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Tokenizer"),
    "llama": ("LlamaForCausalLM", "LlamaTokenizer"),
    "gpt2": ("GPT2LMHeadModel", "GPT2Tokenizer"),
}
# Digits, arithmetic, code indentation, a tab, two spaces, and characters no tokenizer was
# trained on (bytes for the byte-level ones, byte fallback for Llama). No leading space: a Llama
# tokenizer in transformers decodes " x" as "x", as it does for the real Llama.
TEXT = "What is 12 + 34? 46\nThe cat reads  a book.\ndef f(x):\n\treturn x * 2  # naïve 日本 🙂"


def _dir(request: pytest.FixtureRequest, family: str) -> Path:
    return request.getfixturevalue(f"{family}_dir")


@pytest.mark.parametrize("family", FAMILIES)
def test_dir_loads_with_its_family_classes(request: pytest.FixtureRequest, family: str) -> None:
    """The files of a download, the family's Auto classes, and logits over the whole vocab."""
    path = _dir(request, family)
    assert {f.name for f in path.iterdir()} == COMMON_FILES | EXTRA_FILES[family]
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert (type(model).__name__, type(tokenizer).__name__) == CLASSES[family]
    assert sum(p.numel() for p in model.parameters()) < 200_000
    assert len(tokenizer) <= model.config.vocab_size
    input_ids = torch.tensor([tokenizer.encode("What is 3 + 4? 7")])
    with torch.no_grad():
        logits = model(input_ids).logits
    assert logits.shape == (1, input_ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_text_round_trips(request: pytest.FixtureRequest, family: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(_dir(request, family))
    ids = tokenizer.encode(TEXT)
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == TEXT


@pytest.mark.parametrize("family", FAMILIES)
def test_two_builds_are_byte_identical(
    request: pytest.FixtureRequest, family: str, tmp_path: Path
) -> None:
    """Seeded weights and deterministic tokenizer training: every file is the same bytes."""
    first = _dir(request, family)
    second = BUILDERS[family](tmp_path / family)
    names = sorted(f.name for f in first.iterdir())
    assert names == sorted(f.name for f in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_qwen2_ties_embeddings_and_stores_bf16(qwen2_dir: Path) -> None:
    """Like Qwen2.5: one embedding matrix saved (no lm_head), bf16 in the file and once loaded."""
    assert json.loads((qwen2_dir / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(qwen2_dir / "model.safetensors", framework="pt") as weights:
        names = weights.keys()  # a safe_open handle is no mapping: no `in`, no iteration
        assert "lm_head.weight" not in names
        assert {weights.get_tensor(name).dtype for name in names} == {torch.bfloat16}
    model = AutoModelForCausalLM.from_pretrained(qwen2_dir)
    assert model.config.dtype == torch.bfloat16
    assert model.dtype == torch.bfloat16
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert embed.data_ptr() == head.data_ptr()


def test_qwen2_special_tokens_follow_the_bpe_vocab(qwen2_dir: Path) -> None:
    """No BOS; eos <|im_end|>, pad <|endoftext|>; the specials are the last ids of the tokenizer
    and the embedding has spare rows past them, as Qwen2.5 has."""
    tokenizer = AutoTokenizer.from_pretrained(qwen2_dir)
    model = AutoModelForCausalLM.from_pretrained(qwen2_dir)
    assert tokenizer.bos_token is None
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    specials = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    assert specials == [len(tokenizer) - 3, len(tokenizer) - 2, len(tokenizer) - 1]
    assert model.config.vocab_size % 128 == 0 and model.config.vocab_size > len(tokenizer)
    assert not set(tokenizer.encode("hello world")) & set(specials)
    endoftext, _, im_end = specials
    generation = model.generation_config
    assert (generation.eos_token_id, generation.pad_token_id) == ([im_end, endoftext], endoftext)


def test_qwen2_chat_template_is_plain_chatml(qwen2_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(qwen2_dir)
    assert tokenizer.chat_template == CHATML_TEMPLATE
    assert not re.search(r"{%-?\s*generation\s*-?%}", tokenizer.chat_template)  # no markers
    conversation = [
        {"role": "user", "content": "What is 3 + 4?"},
        {"role": "assistant", "content": "7"},
    ]
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert text == (
        "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n7<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(
        conversation[:1], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.encode(text)
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 2
    assert ids.count(tokenizer.eos_token_id) == 2


def test_llama_tokenizer_matches_its_sentencepiece_model(llama_dir: Path) -> None:
    """<unk>, <s>, </s> at 0, 1, 2; BOS first and no EOS; after BOS, the same ids as the
    tokenizer.model itself; no pad, no chat template, untied embeddings."""
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    processor = spm.SentencePieceProcessor(model_file=str(llama_dir / "tokenizer.model"))
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert (tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token) == (
        "<unk>",
        "<s>",
        "</s>",
    )
    assert processor.get_piece_size() == len(tokenizer)
    for text in [TEXT, "The cat reads a book.", "What is 12 + 34? 46"]:
        ids = tokenizer.encode(text)
        assert ids[0] == tokenizer.bos_token_id and ids[-1] != tokenizer.eos_token_id
        assert ids[1:] == processor.encode(text)
    assert "<0xE6>" in tokenizer.tokenize("日")  # byte fallback, not <unk>
    assert tokenizer.pad_token is None and tokenizer.chat_template is None
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert embed.data_ptr() != head.data_ptr()
    assert model.dtype == torch.float32


def test_gpt2_tokenizer_has_one_special_token(gpt2_dir: Path) -> None:
    """<|endoftext|> is bos, eos and unk, and the last id; no pad, no chat template, no BOS."""
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    assert tokenizer.pad_token is None and tokenizer.chat_template is None
    assert {tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token} == {"<|endoftext|>"}
    assert tokenizer.eos_token_id == len(tokenizer) - 1
    assert tokenizer.encode("hello") == tokenizer.convert_tokens_to_ids(tokenizer.tokenize("hello"))
    generation = AutoModelForCausalLM.from_pretrained(gpt2_dir).generation_config
    assert generation.eos_token_id == tokenizer.eos_token_id
    assert generation.pad_token_id is None
