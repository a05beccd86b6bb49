"""Weighted mixtures: token shares per window, stop vs cycle, resume, validation, val per source.

The two sources write disjoint alphabets (letters, digits) with no spaces, so every token of the
shards can be traced back to its source without trusting the stage's own record.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from data_prep.mixture import Weighted
from data_prep.shards import TokenShards
from data_prep.sources import SourceStageConfig
from data_prep.tokenize import PROGRESS_FILE, read_meta, tokenize_corpus
from data_prep.tokenizer import EOS_ID, train_tokenizer
from eval.mixture import per_source_val_evaluator, val_runs
from pipeline.engine.config import load_recipe
from pipeline.engine.errors import RecipeError
from tests.helpers import tiny_recipe, write_recipe

SEQ_LEN = 64
SETTINGS: dict[str, Any] = {"seed": 3, "val_fraction": 0.05, "num_workers": 1}


def write_source(path: Path, alphabet: str, count: int, seed: int) -> None:
    """`count` JSONL documents of 10..300 random characters of `alphabet`, no spaces."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(count):
            text = "".join(rng.choices(alphabet, k=rng.randint(10, 300)))
            f.write(json.dumps({"text": text}) + "\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mixture")
    write_source(root / "letters.jsonl", "abcdefghij", 2500, seed=1)
    write_source(root / "digits.jsonl", "0123456789", 2500, seed=2)
    write_source(root / "few_digits.jsonl", "0123456789", 300, seed=3)
    docs = [json.loads(line)["text"] for name in ("letters", "digits") for line in
            (root / f"{name}.jsonl").read_text().splitlines()[:400]]  # fmt: skip
    train_tokenizer(docs, root / "tok", vocab_size=300)
    return root


def mixture(corpus: Path, second: str = "digits", **options: Any) -> Weighted:
    """letters 0.7, `second` 0.3, with per-source options ({"letters": {...}})."""
    cfg = SourceStageConfig.model_validate(
        {
            "kind": "x",
            "source": [
                {"uri": str(corpus / "letters.jsonl"), "weight": 0.7, **options.get("letters", {})},
                {"uri": str(corpus / f"{second}.jsonl"), "weight": 0.3, **options.get(second, {})},
            ],
        }
    )
    return Weighted(cfg.source, cfg.source_names())


def token_sources(corpus: Path, tokens: np.ndarray) -> np.ndarray:
    """0 for a token of letters, 1 for digits; an eos takes the source of the token before it."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(corpus / "tok" / "tokenizer.model"))
    kinds = np.full(sp.get_piece_size(), -1)
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        kinds[i] = (
            0 if any(c.isalpha() for c in piece) else 1 if any(c.isdigit() for c in piece) else -1
        )
    sources = kinds[tokens]
    assert (sources[tokens != EOS_ID] >= 0).all() and sources[0] >= 0
    for i in np.flatnonzero(tokens == EOS_ID):
        sources[i] = sources[i - 1]
    return sources


def worst_window(sources: np.ndarray, share: float, window_sequences: int) -> float:
    """The largest |share of source 0 - share| over every run of `window_sequences` sequences."""
    starts = np.arange(0, len(sources) - window_sequences * SEQ_LEN + 1, SEQ_LEN)
    counts = np.concatenate([[0], np.cumsum(sources == 0)])
    width = window_sequences * SEQ_LEN
    return float(np.abs((counts[starts + width] - counts[starts]) / width - share).max())


def tokenize(corpus: Path, out: Path, mix: Weighted, **extra: Any) -> dict[str, Any]:
    return tokenize_corpus(mix, corpus / "tok" / "tokenizer.model", out, **SETTINGS, **extra)


def test_mixture_weight_shares_within_one_point_over_every_window(
    tmp_path: Path, corpus: Path
) -> None:
    stats = tokenize(corpus, tmp_path, mixture(corpus))
    meta = read_meta(tmp_path)["mixture"]
    train = TokenShards(tmp_path / "train")
    sources = token_sources(corpus, train.tokens(0, train.num_tokens))
    window_sequences = math.ceil(meta["window_tokens"] / SEQ_LEN)  # N
    assert train.num_tokens > 8 * window_sequences * SEQ_LEN  # many windows, not one
    worst = worst_window(sources, 0.7, window_sequences)
    print(f"N={window_sequences} sequences of {SEQ_LEN}: worst window deviation {worst:.4%}")
    assert worst <= 0.01
    assert abs(stats["share/letters"] - 0.7) < 0.001
    assert [s["train_tokens"] for s in meta["sources"]] == [
        int((sources == 0).sum()),
        int((sources == 1).sum()),
    ]
    # letters run out first (stop): every letters document was read, digits only partly
    assert sum(meta["sources"][0][k] for k in ("train_documents", "val_documents")) == 2500
    assert sum(meta["sources"][1][k] for k in ("train_documents", "val_documents")) < 2500
    val = TokenShards(tmp_path / "val")
    val_sources = token_sources(corpus, val.tokens(0, val.num_tokens))
    ends, owners = np.array(meta["val_runs"]).T
    recorded = np.repeat(owners, np.diff(np.concatenate([[0], ends])))
    assert ends[-1] == val.num_tokens and (recorded == val_sources).all()
    assert len(set(owners)) == 2


def test_mixture_weight_stop_ends_the_mixture_cycle_rereads_and_counts_epochs(
    tmp_path: Path, corpus: Path
) -> None:
    def documents(meta: dict[str, Any], k: int) -> int:
        return meta["sources"][k]["train_documents"] + meta["sources"][k]["val_documents"]

    tokenize(corpus, tmp_path / "stop", mixture(corpus, "few_digits"))
    stop = read_meta(tmp_path / "stop")["mixture"]
    assert documents(stop, 1) == 300 and documents(stop, 0) < 2500  # ended with few_digits
    assert stop["sources"][1]["epochs"] == 1.0 and stop["sources"][0]["epochs"] is None

    cycle = {"few_digits": {"on_exhausted": "cycle"}}
    stats = tokenize(corpus, tmp_path / "cycle", mixture(corpus, "few_digits", **cycle))
    meta = read_meta(tmp_path / "cycle")["mixture"]
    assert documents(meta, 0) == 2500  # ended when letters (stop) ran out
    epochs = documents(meta, 1) / 300
    assert epochs > 2 and stats["epochs/few_digits"] == meta["sources"][1]["epochs"] == epochs
    train = TokenShards(tmp_path / "cycle" / "train")
    sources = token_sources(corpus, train.tokens(0, train.num_tokens))
    assert worst_window(sources, 0.7, math.ceil(meta["window_tokens"] / SEQ_LEN)) <= 0.01

    both = {"letters": {"on_exhausted": "cycle"}, **cycle}  # ends once both were read through
    tokenize(corpus, tmp_path / "both", mixture(corpus, "few_digits", **both))
    assert files(tmp_path / "both" / "train") == files(tmp_path / "cycle" / "train")
    assert read_meta(tmp_path / "both")["mixture"]["val_runs"] == meta["val_runs"]


def interrupting(after: int) -> Any:
    """A progress wrapper that stops the run with a Ctrl-C after `after` documents."""

    def wrap(items: Iterator[Any], desc: str) -> Iterator[Any]:
        for count, item in enumerate(items):
            if count == after:
                raise KeyboardInterrupt
            yield item

    return wrap


def files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_mixture_weight_kill_and_resume_give_identical_shards(tmp_path: Path, corpus: Path) -> None:
    cycle = {"few_digits": {"on_exhausted": "cycle"}}
    small = {"shard_tokens": 5003}
    tokenize(corpus, tmp_path / "reference", mixture(corpus, "few_digits", **cycle), **small)
    state, out = tmp_path / "state", tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        tokenize(
            corpus, out, mixture(corpus, "few_digits", **cycle),
            resume_dir=state, progress=interrupting(2400), **small,
        )  # fmt: skip
    progress = json.loads((state / PROGRESS_FILE).read_text())
    assert progress["mixture"]["pass_documents"][1] == 300  # stopped after a restart
    stats = tokenize(corpus, out, mixture(corpus, "few_digits", **cycle), resume_dir=state, **small)
    assert 2000 < stats["resumed_documents"] <= 2400
    assert files(out) == files(tmp_path / "reference") and len(files(out)) > 40


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"uri": "builtin:python-stdlib", "weight": 1.0}, "`weight` needs a mixture"),
        ([{"uri": "builtin:python-stdlib", "weight": 1.0}], "`weight` needs a mixture"),
        (
            [{"uri": "builtin:python-stdlib", "weight": 0.7}, "builtin:arithmetic"],
            "source 1 has no `weight`",
        ),
        (
            [
                {"uri": "builtin:python-stdlib", "weight": 0.7, "repeat": 2},
                {"uri": "builtin:arithmetic", "weight": 0.3},
            ],
            "source 0 has both `repeat` and `weight`",
        ),  # fmt: skip
        ({"uri": "builtin:python-stdlib", "on_exhausted": "cycle"}, "belongs to weighted"),
        ([{"uri": "builtin:python-stdlib", "weight": -1}, "builtin:arithmetic"], "greater than 0"),
    ],
)
def test_mixture_weight_misuse_is_a_one_line_error(
    tmp_path: Path, source: Any, message: str
) -> None:
    data = tiny_recipe(tmp_path / "runs")
    data["stages"]["tokenize"]["source"] = source
    with pytest.raises(RecipeError, match=message) as error:
        load_recipe(write_recipe(tmp_path / "r.yaml", data))
    assert "stages.tokenize.source" in str(error.value) and "\n" not in str(error.value)


def test_mixture_weight_source_names() -> None:
    cfg = SourceStageConfig.model_validate(
        {
            "kind": "x",
            "source": [
                "builtin:python-stdlib",
                {"uri": "builtin:task", "task": {"name": "sort"}},
                "data/code/*.jsonl.zst",
                "other/code.txt",
                {"uri": "prose.parquet", "name": "books"},
            ],
        }
    )
    assert cfg.source_names() == ["python-stdlib", "sort", "code", "code-2", "books"]


def test_mixture_weight_val_loss_per_source_in_the_loop(tmp_path: Path, corpus: Path) -> None:
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenize(corpus, tmp_path, mixture(corpus))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    evaluate = per_source_val_evaluator(tmp_path, SEQ_LEN, max_windows=12, batch_size=5)
    metrics = evaluate(model)
    assert set(metrics) == {"val_loss/letters", "val_loss/digits"}

    windows = torch.as_tensor(np.stack(list(TokenShards(tmp_path / "val").windows(SEQ_LEN, 12))))
    with torch.no_grad():
        logits = model(windows[:, :-1]).logits
    nll = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten(), reduction="none")
    val = TokenShards(tmp_path / "val")
    owners = token_sources(corpus, val.tokens(0, val.num_tokens))
    targets = torch.as_tensor(owners[1 : 12 * SEQ_LEN + 1])  # target i: val token i + 1
    for index, name in enumerate(["letters", "digits"]):
        expected = nll[targets == index].double().mean().item()
        assert metrics[f"val_loss/{name}"] == pytest.approx(expected, rel=1e-5)

    meta = read_meta(tmp_path)
    del meta["mixture"]  # an export written before mixtures were recorded
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert val_runs(tmp_path) is None
    assert per_source_val_evaluator(tmp_path, SEQ_LEN, 12, 5)(model) == {}
