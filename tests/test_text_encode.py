"""The text_encode stage: captions of an images export encoded once per distinct caption by a
causal LM, T5, CLIP or the bag-of-words builtin, cached with checksums, refused at plan time when
the wiring is wrong, and encoded again only when the encoder changes.

Every model is tiny and built here or in tests/hf_models.py (random weights: the tests check the
plumbing against a fresh encoding by transformers itself, never what an embedding means).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from data_prep.image_captions import read_captions
from data_prep.text_embeddings_meta import EncoderIdentity, TextEmbeddings
from pipeline.engine.config import validate_recipe
from pipeline.engine.errors import PipelineError
from pipeline.engine.graph import fingerprints, plan
from pipeline.engine.inputs import plan_problems
from pipeline.stages.text_encode_files import stored
from pipeline.stages.text_encode_models import BagOfWords, Encoded, HFTextEncoder
from tests.helpers import cli, run_in_process, write_recipe

MAX_LENGTH = 32
SHAPES = {"uri": "builtin:shapes", "max_images": 64, "val_images": 16}
IMAGES = {"kind": "images", "source": SHAPES, "image_size": 32}
T5_SPECIALS, CLIP_SPECIALS = ["<pad>", "</s>", "<unk>"], ["<|startoftext|>", "<|endoftext|>"]


def build_t5(path: Path) -> Path:
    """A T5 encoder (d_model 32, one layer) with a byte-level BPE that appends </s>."""
    import torch
    from tokenizers import pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    from tests.hf_models import _byte_level_bpe

    backend = _byte_level_bpe(300, T5_SPECIALS, None, pre_tokenizers.ByteLevel())
    eos = backend.token_to_id("</s>")
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", eos)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    config = T5Config(
        d_model=32, d_ff=64, d_kv=16, num_layers=1, num_heads=2, vocab_size=300,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
        decoder_start_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    T5EncoderModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_clip(path: Path) -> Path:
    """A CLIP text model with a projection (hidden 32 -> 16), padded with <|endoftext|>."""
    import torch
    from tokenizers import pre_tokenizers, processors
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, PreTrainedTokenizerFast

    from tests.hf_models import _byte_level_bpe

    backend = _byte_level_bpe(300, CLIP_SPECIALS, None, pre_tokenizers.ByteLevel())
    bos, eos = (backend.token_to_id(token) for token in CLIP_SPECIALS)
    backend.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=CLIP_SPECIALS[0], eos_token=CLIP_SPECIALS[1],
        pad_token=CLIP_SPECIALS[1], unk_token=CLIP_SPECIALS[1], model_max_length=77,
    )  # fmt: skip
    config = CLIPTextConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=16,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPTextModelWithProjection(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def recipe(run_dir: Path, **stages: Any) -> dict[str, Any]:
    return {
        "name": "te",
        "run_dir": str(run_dir),
        "tracking": {"mode": "disabled"},
        "stages": {"images": IMAGES, **stages},
    }


def text_encode(encoder: Any, **fields: Any) -> dict[str, Any]:
    return {"kind": "text_encode", "after": ["images"], "encoder": encoder, **fields}


@pytest.fixture(scope="module")
def encoded(tmp_path_factory: pytest.TempPathFactory, qwen2_dir: Path) -> Path:
    """A run dir whose images stage (shapes) is encoded by Qwen2, T5 (both float32), CLIP
    (float16, and float32 at layer -2) and bag-of-words, all by one `pipeline run`."""
    tmp = tmp_path_factory.mktemp("text_encode")
    t5, clip = build_t5(tmp / "t5"), build_clip(tmp / "clip")
    data = recipe(
        tmp / "run",
        qwen={**text_encode({"path": str(qwen2_dir)}, dtype="float32", batch_size=16)},
        t5=text_encode({"path": str(t5)}, dtype="float32"),
        clip=text_encode({"path": str(clip)}),
        clip_layer=text_encode({"path": str(clip)}, dtype="float32", layer=-2),
        bow=text_encode("builtin:bag-of-words", max_length=4),
    )
    result = cli("run", str(write_recipe(tmp / "recipe.yaml", data)))
    assert result.returncode == 0, result.stderr
    return tmp / "run"


def fresh(path: Path, texts: list[str], layer: int | None = None) -> dict[str, np.ndarray]:
    """What transformers gives for `texts` padded right to MAX_LENGTH: states, mask, pooled."""
    import torch
    from transformers import AutoModel, AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    model_type = json.loads((path / "config.json").read_text())["model_type"]
    clip = model_type == "clip_text_model"
    classes = {"clip_text_model": CLIPTextModelWithProjection, "t5": T5EncoderModel}
    model_class = classes.get(model_type, AutoModel)
    model = model_class.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    batch = tokenizer(
        texts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
    )
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    states = (out.last_hidden_state if layer is None else out.hidden_states[layer]).numpy()
    mask = batch["attention_mask"].numpy().astype(bool)
    mean = (states * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    return {"states": states, "mask": mask, "pooled": out.text_embeds.numpy() if clip else mean}


def cached(export: Path) -> tuple[TextEmbeddings, dict[str, np.ndarray]]:
    embeddings = TextEmbeddings(export)
    states, mask, pooled = embeddings.states(np.arange(len(embeddings)))
    return embeddings, {"states": states, "mask": mask, "pooled": pooled}


@pytest.mark.e2e
def test_cached_embeddings_equal_a_fresh_encoding(encoded: Path, qwen2_dir: Path) -> None:
    """float32 storage: equal to transformers' own forward within 1e-5 (batching differs);
    float16 storage: equal to that forward rounded to float16, within one float16 step."""
    for stage, model_dir, layer, tolerance in [
        ("qwen", qwen2_dir, None, 1e-5),
        ("t5", encoded.parent / "t5", None, 1e-5),
        ("clip", encoded.parent / "clip", None, 2e-3),
        ("clip_layer", encoded.parent / "clip", -2, 1e-5),
    ]:
        embeddings, got = cached(encoded / stage / "export")
        want = fresh(model_dir, embeddings.captions(), layer)
        assert np.array_equal(got["mask"], want["mask"]), stage
        for key in ("states", "pooled"):
            expected = want[key].astype(embeddings.meta.dtype).astype(np.float32)
            np.testing.assert_allclose(got[key], expected, rtol=tolerance, atol=tolerance)
        assert embeddings.meta.encoder.layer == layer and embeddings.meta.max_length == MAX_LENGTH


@pytest.mark.e2e
def test_each_image_maps_to_its_caption_row_and_rows_are_distinct(encoded: Path) -> None:
    embeddings = TextEmbeddings(encoded / "qwen" / "export")
    rows = embeddings.captions()
    everything = []
    for split in ("train", "val"):
        captions = read_captions(encoded / "images" / "export", split)
        ids = embeddings.caption_ids(split)
        assert ids.dtype == np.int64 and [rows[i] for i in ids] == captions
        everything += captions
        states, _, _ = embeddings.for_images(split, np.array([2, 0]))
        np.testing.assert_array_equal(states, embeddings.states(ids[[2, 0]])[0])
    assert rows == list(dict.fromkeys(everything))  # distinct, in order of first appearance
    assert len(rows) < len(everything) and embeddings.meta.num_unique == len(rows)
    assert embeddings.meta.num_images == {"train": 64, "val": 16}
    embeddings.check_images(encoded / "images" / "export")  # made from these captions


@pytest.mark.e2e
def test_the_empty_caption_is_stored_apart(encoded: Path, qwen2_dir: Path) -> None:
    """T5 encodes "" as </s>: as transformers does. Qwen2 adds no token to "": no token, zeros."""
    states, mask, pooled = TextEmbeddings(encoded / "t5" / "export").empty()
    want = fresh(encoded.parent / "t5", [""])
    assert mask.sum() == 1 and np.array_equal(mask, want["mask"])
    np.testing.assert_allclose(states, want["states"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pooled, want["pooled"], rtol=1e-5, atol=1e-5)
    states, mask, pooled = TextEmbeddings(encoded / "qwen" / "export").empty()
    assert states.shape == (1, MAX_LENGTH, 64) and not mask.any()
    assert not states.any() and not pooled.any()


@pytest.mark.e2e
def test_t5_and_clip_shapes_and_the_resolved_recipe(encoded: Path) -> None:
    t5 = TextEmbeddings(encoded / "t5" / "export").meta
    assert (t5.dim, t5.pooled_dim, t5.encoder.model_class) == (32, 32, "T5EncoderModel")
    clip = TextEmbeddings(encoded / "clip" / "export")
    states, _, pooled = clip.states(np.array([0, 1]))
    assert states.shape == (2, MAX_LENGTH, 32) and pooled.shape == (2, 16)
    assert clip.meta.dtype == "float16" and clip.meta.encoder.kind == "directory"
    assert np.load(encoded / "clip" / "export" / "states.npy").dtype == np.float16
    assert clip.meta.num_truncated > 0  # small BPE: long captions are cut (and counted)
    resolved = (encoded / "recipe.yaml").read_text()
    assert "encoder: builtin:bag-of-words" in resolved  # the builtin survives the round trip
    manifest = json.loads((encoded / "clip" / "stage.json").read_text())
    assert manifest["summary"]["distinct_captions"] == len(clip)


@pytest.mark.e2e
def test_bag_of_words_export_and_its_determinism(encoded: Path) -> None:
    embeddings, got = cached(encoded / "bow" / "export")
    want = BagOfWords(max_length=4).encode(embeddings.captions())
    np.testing.assert_allclose(got["pooled"], want.pooled, atol=1e-3)  # float16 storage
    assert embeddings.meta.num_truncated == int(want.truncated.sum()) > 0  # > 4 words: cut
    assert embeddings.meta.encoder.kind == "bag-of-words" and embeddings.meta.dim == 64


def test_bag_of_words_same_words_same_vector() -> None:
    texts = ["A red circle", "a RED circle.", "circle red a", "a blue square", ""]
    first, again = BagOfWords(8).encode(texts), BagOfWords(8).encode(texts)
    np.testing.assert_array_equal(first.states, again.states)  # a pure function of the words
    np.testing.assert_array_equal(first.pooled[0], first.pooled[1])  # case and punctuation
    np.testing.assert_allclose(first.pooled[0], first.pooled[2], atol=1e-6)  # a bag: any order
    assert not np.array_equal(first.states[0], first.states[2])  # the states keep the order
    assert np.abs(first.pooled[0] - first.pooled[3]).max() > 0.1  # other words differ
    assert first.mask.sum(1).tolist() == [3, 3, 3, 3, 0] and not first.pooled[4].any()


@pytest.mark.e2e
def test_a_changed_encoder_reencodes_and_nothing_else_does(tmp_path: Path, gpt2_dir: Path) -> None:
    import torch
    from transformers import GPT2LMHeadModel

    model_dir = shutil.copytree(gpt2_dir, tmp_path / "gpt2")
    data = recipe(tmp_path / "run", te=text_encode({"path": str(model_dir)}))
    path = write_recipe(tmp_path / "recipe.yaml", data)
    assert cli("run", str(path)).returncode == 0
    before = np.load(tmp_path / "run" / "te" / "export" / "pooled.npy")
    data["stages"]["later"] = {**text_encode("builtin:bag-of-words"), "after": ["te"]}
    result = cli("run", str(write_recipe(path, data)))  # unchanged, and a stage added after it
    assert result.returncode == 0, result.stderr
    assert "te: skip, up to date" in result.stdout and ">> later" in result.stdout
    data["stages"]["later"]["max_length"] = 8  # a changed downstream stage
    steps = {step.name: step for step in plan(validate_recipe(data))}
    assert not steps["te"].run and steps["later"].run
    model = GPT2LMHeadModel.from_pretrained(model_dir)  # saved again with other weights
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    model.save_pretrained(model_dir)
    result = cli("run", str(path))
    assert result.returncode == 0, result.stderr
    assert ">> te (text_encode): config or upstream changed" in result.stdout
    assert not np.allclose(np.load(tmp_path / "run" / "te" / "export" / "pooled.npy"), before)


def test_an_encoder_stage_changed_upstream_changes_the_fingerprint(tmp_path: Path) -> None:
    source = "builtin:python-stdlib"
    stages = {
        "tokenizer": {"kind": "tokenizer", "source": source},
        "tokenize": {"kind": "tokenize", "after": ["tokenizer"], "source": source},
        "pretrain": {"kind": "pretrain", "after": ["tokenize"], "max_steps": 30},
        "images": IMAGES,
        "te": {**text_encode("pretrain"), "after": ["images", "pretrain"]},
        "downstream": {**text_encode("builtin:bag-of-words"), "after": ["te"]},
    }
    base = {"name": "t", "run_dir": str(tmp_path / "run"), "stages": stages}
    assert plan_problems(validate_recipe(base)) == []
    before = fingerprints(validate_recipe(base))
    stages["pretrain"]["max_steps"] = 40
    stages["downstream"]["max_length"] = 8
    after = fingerprints(validate_recipe(base))
    assert after["te"] != before["te"] and after["images"] == before["images"]
    stages["pretrain"]["max_steps"] = 30
    stages["te"]["batch_size"] = 7  # how it runs, not what it computes
    assert fingerprints(validate_recipe(base))["te"] == before["te"]


def test_dry_run_refuses_bad_wiring_in_one_line_each(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stages = {
        "digits": {"kind": "images", "source": "builtin:digits"},
        "uncaptioned": {**text_encode("builtin:bag-of-words"), "after": ["digits"]},
        "missing": text_encode({"path": str(tmp_path / "nope")}),
        "not_an_lm": {**text_encode("digits"), "after": ["images", "digits"]},
    }
    path = write_recipe(tmp_path / "bad.yaml", recipe(tmp_path / "run", **stages))
    code, err = run_in_process(["run", "--dry-run", str(path)], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 3, err
    assert lines[0].startswith(
        "error: stages.uncaptioned: images stage 'digits' reads builtin:digits, which has no "
        "captions; use a captioned source"
    )
    assert lines[1].startswith(f"error: stages.missing.encoder.path {tmp_path / 'nope'}: no such")
    assert lines[2] == (
        "error: stages.not_an_lm.encoder: 'digits' is a images stage (it makes images); name a "
        "stage that makes lm (pretrain, sft, rlhf)"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.e2e
def test_a_modified_array_fails_verify_in_one_line(encoded: Path, tmp_path: Path) -> None:
    export = shutil.copytree(encoded / "t5" / "export", tmp_path / "export")
    TextEmbeddings(export).verify()
    with open(export / "states.npy", "r+b") as file:
        file.seek(-4, 2)
        file.write(b"\x00\x01\x02\x03")
    with pytest.raises(PipelineError) as error:
        TextEmbeddings(export).verify()
    assert (
        str(error.value)
        == f"{export / 'states.npy'}: checksum mismatch; rerun the text_encode stage"
    )
    (export / "meta.json").unlink()
    with pytest.raises(PipelineError, match=r"meta.json: missing; run the text_encode stage first"):
        TextEmbeddings(export)


def test_run_time_errors_are_one_line(qwen2_dir: Path) -> None:
    """What only the run can know: a layer the model lacks, states past float16's range."""
    identity = EncoderIdentity(kind="directory", name="qwen2")
    encoder = HFTextEncoder(qwen2_dir, identity, 8, 5, "stages.te")
    with pytest.raises(PipelineError) as error:
        encoder.encode(["a red circle"])
    assert str(error.value) == (
        "stages.te.layer: 5, but qwen2 has hidden states 0..2 (0: embeddings; -1: the last "
        "block); pick one of them"
    )
    assert encoder.identity.model_class == "Qwen2Model"
    huge = Encoded(
        np.full((1, 2, 4), 1e5, np.float32), np.ones((1, 2), bool), np.zeros((1, 4), np.float32),
        np.zeros(1, bool),
    )  # fmt: skip
    with pytest.raises(PipelineError, match=r"^stages.te.dtype: qwen2's outputs exceed float16"):
        stored(huge, "float16", "stages.te", "qwen2")
    assert stored(huge, "float32", "stages.te", "qwen2")["states.npy"].max() == 1e5
