"""Tiny Hugging Face model directories as a user has them after downloading Qwen2.5, Llama or
GPT-2: config.json, generation_config.json, model.safetensors and the family's tokenizer files.

Built locally in about a second each (no network), for tests that take `model: {path: DIR}`.
Each keeps the quirks of its family that a pipeline must cope with: Qwen2 ties its embeddings,
stores bf16 weights, has no BOS, ends turns with `<|im_end|>`, puts its special tokens after the
BPE vocab and pads the embedding rows past the tokenizer; Llama has a SentencePiece
`tokenizer.model`, adds BOS and has no pad token; GPT-2 has one `<|endoftext|>` for everything.
The weights are random: what a test checks is the plumbing, never the text a model writes.
Two builds of one family give byte-identical files (seeded torch, single-threaded SentencePiece).
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import sentencepiece as spm
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer
from transformers import (
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Tokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaTokenizer,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Tokenizer,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

SEED = 0
MAX_POSITIONS = 256
# Shared by the three families: 2 layers of width 64, so each model is ~100k parameters.
SHAPE = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": MAX_POSITIONS,
}

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# Qwen2.5's template without its tools branch and default system prompt: one ChatML block per
# message, and the assistant header when a generation prompt is asked for.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Qwen2.5 has 151,665 tokens and 151,936 embedding rows; ours rounds up the same way.
QWEN2_EMBEDDING_MULTIPLE = 128
# Enough distinct words that each tokenizer reaches its vocab size.
WORDS = """
about after again always animal answer around because before better between bright build
change children city close color common country course different during early earth enough
example family father field final follow forest friend garden government great ground group
happy heavy history important island kitchen language laugh letter light little machine market
measure minute money morning mother mountain music nature number ocean often order paper people
picture place plant problem question quickly rather reason record remember river school science
season second should simple sister small sometimes sound special spring square station story
strong student study summer system table teacher through together toward travel under until
village voice weather window winter without woman wonder world yellow young
"""


def corpus(seed: int = SEED) -> list[str]:
    """~1,700 short documents: English sentences, numbers, arithmetic Q&A and Python snippets."""
    rng = random.Random(seed)
    subjects = ["The cat", "A small dog", "My friend", "The teacher", "Every student", "The river"]
    subjects += ["Our team", "The old man", "A young girl", "The computer", "This model"]
    verbs = ["reads", "writes", "finds", "watches", "builds", "remembers", "carries", "answers"]
    verbs += ["explains", "follows", "counts", "learns"]
    objects = ["a long book", "the answer", "three apples", "the blue house", "a simple program"]
    objects += ["every question", "the morning train", "a quiet song", "the next number"]
    endings = [".", " today.", " again.", " in the evening.", " with great care.", "!", "?"]
    documents = [
        f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}{rng.choice(endings)}"
        for _ in range(600)
    ]
    words = WORDS.split()
    documents += [
        " ".join(rng.choice(words) for _ in range(rng.randint(6, 14))).capitalize() + "."
        for _ in range(300)
    ]
    documents += [" ".join(str(rng.randrange(10 ** rng.randint(1, 6))) for _ in range(8))]
    documents += ["0123456789 " * 4]
    for _ in range(500):
        a, b = rng.randrange(100), rng.randrange(100)
        op, result = rng.choice([("+", a + b), ("-", a - b), ("*", a * b)])
        documents.append(f"What is {a} {op} {b}? {result}")
    names = ["add", "scale", "total", "mean", "clip", "square", "count_words", "first_item"]
    for _ in range(300):
        name, arg = rng.choice(names), rng.choice(["x", "values", "n", "text"])
        k = rng.randint(1, 9)
        documents.append(
            f"def {name}({arg}):\n"
            f'    """Return {name.replace("_", " ")} of {arg}."""\n'
            f"    if not {arg}:\n        return None\n"
            f"    result = [{arg} * {k} for _ in range({k})]\n"
            f"    return result\n"
        )
    return documents


def build_qwen2(path: Path, **shape: int) -> Path:
    """A Qwen2.5-style dir: tied bf16 weights, byte-level BPE, ChatML, no BOS; returns `path`.
    `shape` overrides SHAPE's entries."""
    # Qwen's own normalizer and pre-tokenizer: AutoTokenizer loads a qwen2 dir as Qwen2Tokenizer,
    # which keeps only the vocab and merges of tokenizer.json and rebuilds the rest as these.
    backend = _byte_level_bpe(
        vocab_size=800,
        specials=[ENDOFTEXT, IM_START, IM_END],
        normalizer=normalizers.NFC(),
        pre_tokenizer=pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        ),
    )
    tokenizer = Qwen2Tokenizer(
        tokenizer_object=backend,
        bos_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        extra_special_tokens=[IM_START],
        chat_template=CHATML_TEMPLATE,
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )
    endoftext, im_end = backend.token_to_id(ENDOFTEXT), backend.token_to_id(IM_END)
    multiple = QWEN2_EMBEDDING_MULTIPLE
    config = Qwen2Config(
        **SHAPE | shape,
        vocab_size=-(-backend.get_vocab_size() // multiple) * multiple,
        tie_word_embeddings=True,
        rope_theta=1_000_000.0,
        bos_token_id=endoftext,
        eos_token_id=im_end,
    )
    generation = GenerationConfig(
        bos_token_id=endoftext, eos_token_id=[im_end, endoftext], pad_token_id=endoftext
    )
    return _save(path, Qwen2ForCausalLM, config, generation, tokenizer, torch.bfloat16)


def build_llama(path: Path, **shape: int) -> Path:
    """A Llama-2-style dir: untied fp32 weights, SentencePiece BPE adding BOS, no pad token;
    `shape` overrides SHAPE's entries."""
    model_file = path / "tokenizer.model"
    path.mkdir(parents=True, exist_ok=True)
    model_file.write_bytes(_sentencepiece_bpe(vocab_size=600))
    # LlamaTokenizer converts a .model file only through convert_to_native_format (from_pretrained
    # calls it); it also offers <s> and </s> as extra special tokens, which Llama's own dirs lack.
    native = LlamaTokenizer.convert_to_native_format(vocab_file=str(model_file))
    native.pop("additional_special_tokens", None)
    tokenizer = LlamaTokenizer(**native, add_bos_token=True)
    config = LlamaConfig(**SHAPE | shape, vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2)
    generation = GenerationConfig(bos_token_id=1, eos_token_id=2)
    return _save(path, LlamaForCausalLM, config, generation, tokenizer, torch.float32)


def build_gpt2(path: Path) -> Path:
    """A GPT-2-style dir: fp32 weights, byte-level BPE whose last id is `<|endoftext|>`, no pad."""
    backend = _byte_level_bpe(
        vocab_size=700,
        specials=[ENDOFTEXT],
        normalizer=None,
        pre_tokenizer=pre_tokenizers.ByteLevel(add_prefix_space=False),
    )
    tokenizer = GPT2Tokenizer(
        tokenizer_object=backend,
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
        model_max_length=MAX_POSITIONS,
    )
    endoftext = backend.token_to_id(ENDOFTEXT)
    config = GPT2Config(
        vocab_size=backend.get_vocab_size(),
        n_positions=MAX_POSITIONS,
        n_embd=SHAPE["hidden_size"],
        n_layer=SHAPE["num_hidden_layers"],
        n_head=SHAPE["num_attention_heads"],
        n_inner=SHAPE["intermediate_size"],
        bos_token_id=endoftext,
        eos_token_id=endoftext,
    )
    generation = GenerationConfig(bos_token_id=endoftext, eos_token_id=endoftext)
    return _save(path, GPT2LMHeadModel, config, generation, tokenizer, torch.float32)


def _byte_level_bpe(
    vocab_size: int,
    specials: list[str],
    normalizer: normalizers.Normalizer | None,
    pre_tokenizer: pre_tokenizers.PreTokenizer,
) -> Tokenizer:
    """A byte-level BPE trained on `corpus()`, its special tokens appended after the merges."""
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = BpeTrainer(
        vocab_size=vocab_size - len(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus(), trainer)
    # Added after training, as Qwen and GPT-2 have them: ids past every BPE token.
    backend.add_special_tokens(specials)
    return backend


def _sentencepiece_bpe(vocab_size: int) -> bytes:
    """A serialized SentencePiece BPE model with Llama 2's normalizer and trainer settings."""
    model = io.BytesIO()
    spm.set_random_generator_seed(SEED)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        # Llama's tokenizer.model: no NFKC, spaces kept as they are, a "▁" before the text.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def _save(
    path: Path,
    model_class: type[PreTrainedModel],
    config: PreTrainedConfig,
    generation: GenerationConfig,
    tokenizer: PreTrainedTokenizerBase,
    dtype: torch.dtype,
) -> Path:
    """Seeded random weights in `dtype` plus the tokenizer, written to `path` by save_pretrained."""
    torch.manual_seed(SEED)
    model = model_class(config).to(dtype)
    model.generation_config = generation
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
