"""Document masking's training cost on CPU: tokens/s of pretrain steps with `document_mask: true`
against plain packing, on the same llama, initial weights and token batches.

Both variants train their own copy of the model through the stage's objective (the causal one,
with and without an eos id), one AdamW step per round on the same batch, in alternating order
(A B, then B A) so machine drift and cache effects fall on both alike. The figure is the ratio of
tokens/s (masked / plain, i.e. plain median step time / masked median step time) with a 95%
bootstrap interval over the paired rounds. Documents are the stdlib's blank-line-separated
paragraphs (default: every window packs several, so every step pays for the block mask) or its
whole files (`--documents files`, as the bundled recipes pack them: most windows hold no boundary
and run the plain causal mask), tokenized by the project's own tokenizer and tokenize code.

    .venv/bin/python bench/document_mask.py [--steps 60] [--documents paragraphs|files]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from data_prep.shards import TokenShards
from data_prep.sources import stdlib_documents
from data_prep.tokenize import tokenize_corpus
from data_prep.tokenizer import EOS_ID, MODEL_FILE, train_tokenizer
from pipeline.models import build_model
from pipeline.models.families import ModelConfig

WARMUP_ROUNDS = 5


def token_shards(root: Path, max_bytes: int, vocab_size: int, unit: str) -> TokenShards:
    """Train split of the first `max_bytes` of stdlib files, as the pipeline packs it."""
    documents: list[str] = []
    size = 0
    for text in stdlib_documents():
        parts = text.split("\n\n") if unit == "paragraphs" else [text]
        documents += [part for part in parts if part.strip()]
        size += len(text)
        if size >= max_bytes:
            break
    train_tokenizer(documents, root / "tokenizer", vocab_size=vocab_size, num_threads=1)
    tokenize_corpus(documents, root / "tokenizer" / MODEL_FILE, root / "tokenize", num_workers=1)
    return TokenShards(root / "tokenize" / "train")


def step_seconds(model, objective, optimizer, tokens: torch.Tensor) -> tuple[float, float]:
    """(seconds, loss) of one training step: forward, backward, clip, AdamW."""
    start = time.perf_counter()
    loss, _ = objective.loss(model, tokens, torch.Generator())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start, loss.item()


def bootstrap_ratio(plain: list[float], masked: list[float], samples: int = 2000) -> list[float]:
    """Ratio of medians (plain / masked step time = masked / plain tokens/s) per paired resample."""
    rng = np.random.default_rng(0)
    a, b = np.asarray(plain), np.asarray(masked)
    picks = rng.integers(0, len(a), size=(samples, len(a)))
    return sorted(np.median(a[picks], axis=1) / np.median(b[picks], axis=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="paired rounds measured")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-bytes", type=int, default=1_000_000)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--documents", choices=("paragraphs", "files"), default="paragraphs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        shards = token_shards(Path(tmp), args.max_bytes, args.vocab, args.documents)
        rounds = WARMUP_ROUNDS + args.steps
        batches = [
            torch.from_numpy(shards.batch(0, s, 0, 1, args.batch, args.seq_len))
            for s in range(rounds)
        ]
    cfg = ModelConfig(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.hidden // 64)
    variants = []
    for eos_id in (None, EOS_ID):  # plain packing, then document masking
        torch.manual_seed(0)
        built = build_model(cfg, args.vocab, args.seq_len, document_eos_id=eos_id)
        optimizer = torch.optim.AdamW(built.model.parameters(), lr=1e-3)
        variants.append((built.model.train(), built.objective, optimizer))

    seconds: list[list[float]] = [[], []]
    losses: list[list[float]] = [[], []]
    for step, tokens in enumerate(batches):
        for v in (0, 1) if step % 2 == 0 else (1, 0):
            spent, loss = step_seconds(*variants[v], tokens)
            if step >= WARMUP_ROUNDS:
                seconds[v].append(spent)
                losses[v].append(loss)

    plain, masked = seconds
    ratios = bootstrap_ratio(plain, masked)
    low, high = ratios[int(0.025 * len(ratios))], ratios[int(0.975 * len(ratios)) - 1]
    tokens_per_step = args.batch * args.seq_len
    boundaries = [(b[:, :-1] == EOS_ID).sum(1) for b in batches]
    docs = statistics.mean(float(x) for x in itertools.chain.from_iterable(boundaries))
    no_boundary = sum(int((c == 0).all()) for c in boundaries)
    print(
        f"llama hidden {args.hidden} x {args.layers} layers, {args.batch} x {args.seq_len} tokens "
        f"per step, {args.threads} thread(s), {args.steps} paired rounds, "
        f"documents = stdlib {args.documents}"
    )
    print(
        f"end-of-document tokens per window: {docs:.2f} on average; {no_boundary} of "
        f"{len(batches)} batches have none (those run the plain causal mask)"
    )
    for name, times, loss in zip(("plain", "document_mask"), seconds, losses, strict=True):
        print(
            f"{name:>14}: median {statistics.median(times) * 1e3:.1f} ms/step = "
            f"{tokens_per_step / statistics.median(times):,.0f} tokens/s; "
            f"loss {loss[0]:.3f} -> {loss[-1]:.3f}"
        )
    ratio = statistics.median(plain) / statistics.median(masked)
    print(
        f"document_mask / plain tokens/s: {ratio:.3f} (95% bootstrap interval {low:.3f}-{high:.3f}); "
        f"cost {1 - ratio:+.1%}"
    )


if __name__ == "__main__":
    main()
