"""Sequence baselines: next-byte prediction with RNN, LSTM, GRU and a small Transformer.

The text of a source (default builtin:python-stdlib, via data_prep.sources) is read as UTF-8
bytes (vocabulary 256, lossless for any text); its last `test_fraction` is held out. Every net
gets the same budget: the same optimiser steps on the same batches of windows (a pure function of
seed and step), so the same training bytes; parameter counts are listed beside the scores, and
the recipe sizes the nets to comparable counts. Scores are bits per byte and next-byte accuracy
on fixed held-out windows, with an add-one unigram model of the training bytes as the floor.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field

from pipeline.baselines import plots
from pipeline.baselines.core import Job, Task
from pipeline.baselines.training import (
    DeepOptions,
    TrainSettings,
    lr_factor,
    make_optimizer,
)
from pipeline.engine.errors import PipelineError
from pipeline.train.runtime import torch_threads

VOCAB_SIZE = 256  # bytes


class SequenceModel(TrainSettings):
    """One next-byte model and its optimiser settings (the step budget is stage-wide)."""

    net: Literal["rnn", "lstm", "gru", "transformer"]
    embed_dim: int = Field(64, ge=1, description="byte embedding width (transformer: model width)")
    hidden_size: int = Field(128, ge=1, description="rnn/lstm/gru: state width")
    num_layers: int = Field(1, ge=1)
    num_heads: int = Field(4, ge=1, description="transformer: attention heads")
    dropout: float = Field(0.0, ge=0, lt=1)
    lr: float = Field(3e-3, gt=0, description="peak learning rate")
    grad_clip: float = Field(1.0, ge=0, description="max gradient norm; 0: no clipping")


class SequenceOptions(DeepOptions):
    """The budget and data every net of the stage shares."""

    steps: int = Field(300, ge=1, description="optimiser steps, the same for every net")
    batch_size: int = Field(32, ge=1, description="windows per step")
    seq_len: int = Field(64, ge=2, description="bytes per window")
    max_bytes: int = Field(1_000_000, ge=1000, description="bytes of the source to read")
    eval_windows: int = Field(128, ge=1, description="held-out windows scored")
    eval_every: int = Field(50, ge=1, description="steps between held-out evaluations")


@dataclass(frozen=True)
class Text:
    """Training and held-out byte streams, and the held-out windows every net is scored on."""

    train: np.ndarray  # uint8
    held_out: np.ndarray  # uint8
    eval_windows: np.ndarray  # [W, seq_len + 1]
    unigram_bits: float  # add-one unigram of the training bytes, on the held-out windows


def read_bytes(uri: str, max_bytes: int) -> np.ndarray:
    """The source's documents as one UTF-8 byte stream, documents separated by a newline."""
    from data_prep.sources import SourceConfig, iter_documents

    data = "\n".join(iter_documents(SourceConfig(uri=uri, max_bytes=max_bytes))).encode("utf-8")
    return np.frombuffer(data, dtype=np.uint8)


def unigram_bits(train: np.ndarray, targets: np.ndarray) -> float:
    """Bits per byte of an add-one smoothed unigram model of `train` on `targets`."""
    counts = np.bincount(train, minlength=VOCAB_SIZE) + 1.0
    return float(-np.log2(counts[targets] / counts.sum()).mean())


def window_batch(stream: np.ndarray, seq_len: int, batch: int, seed: int, step: int) -> np.ndarray:
    """`batch` random windows of seq_len + 1 bytes: a pure function of (seed, step)."""
    starts = np.random.default_rng([seed, step]).integers(0, len(stream) - seq_len - 1, batch)
    return np.stack([stream[s : s + seq_len + 1] for s in starts]).astype(np.int64)


class SequenceTask(Task):
    """Next-byte models under one step budget; table: held-out bits per byte, accuracy, params."""

    Model = SequenceModel
    Options = SequenceOptions
    primary = "bits_per_byte"
    higher_is_better = False
    columns = ("bits_per_byte", "accuracy", "params", "train_bytes_per_second")

    def dataset_signature(self, config: Any) -> dict[str, Any]:
        from data_prep.sources import SourceConfig, source_signature

        return source_signature(SourceConfig(uri=config.dataset))

    def load(self, job: Job) -> Text:
        import pipeline.baselines.nets  # noqa: F401 - torch loads here, not in a model's seconds

        options = job.options
        stream = read_bytes(job.config.dataset, options.max_bytes)
        cut = int(len(stream) * (1 - job.config.test_fraction))
        train, held_out = stream[:cut], stream[cut:]
        span = options.seq_len + 1
        if min(len(train), len(held_out)) <= span:
            raise PipelineError(
                f"stages.{job.stage}.options.max_bytes: {len(stream)} bytes leave a split shorter "
                f"than one window of {span}; read more bytes or shorten seq_len"
            )
        count = min(options.eval_windows, len(held_out) // span)
        starts = np.linspace(0, len(held_out) - span, count).astype(np.int64)
        windows = np.stack([held_out[s : s + span] for s in starts]).astype(np.int64)
        return Text(train, held_out, windows, unigram_bits(train, windows[:, 1:].ravel()))

    def check(self, job: Job, data: Text) -> None:
        for name, model in job.models.items():
            if model.net == "transformer" and model.embed_dim % model.num_heads:
                raise PipelineError(
                    f"{job.where(name, 'num_heads')}: {model.num_heads} does not divide "
                    f"embed_dim {model.embed_dim}; pick a divisor"
                )

    def describe(self, job: Job, data: Text) -> str:
        o = job.options
        return (
            f"Next-byte prediction on {job.config.dataset}: {len(data.train)} training and "
            f"{len(data.held_out)} held-out bytes. Same budget for every net: {o.steps} steps of "
            f"{o.batch_size} windows of {o.seq_len} bytes (same batches); scored on "
            f"{len(data.eval_windows)} held-out windows. An add-one unigram model of the training "
            f"bytes scores {data.unigram_bits:.3f} bits per byte."
        )

    def evaluate(self, job: Job, data: Text, name: str, model: SequenceModel) -> dict[str, Any]:
        with torch_threads(job.options.cpu_threads):
            return self.train(job, data, name, model)

    def train(self, job: Job, data: Text, name: str, model: SequenceModel) -> dict[str, Any]:
        """Train one net for the stage's step budget and score it on the held-out windows."""
        import torch

        from pipeline.baselines.nets import build_sequence_net, init_weights, num_params

        options = job.options
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(job.seed)
        net = build_sequence_net(
            model.net, VOCAB_SIZE, options.seq_len, embed_dim=model.embed_dim,
            hidden_size=model.hidden_size, num_layers=model.num_layers,
            num_heads=model.num_heads, dropout=model.dropout,
        ).to(device)  # fmt: skip
        init_weights(net, model.init)
        optimizer = make_optimizer(net.parameters(), model)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, options.steps, model)
        )
        history: list[dict[str, float]] = []
        losses: list[float] = []
        train_seconds = 0.0
        for step in range(options.steps):
            started = time.perf_counter()
            net.train()
            batch = window_batch(data.train, options.seq_len, options.batch_size, job.seed, step)
            tokens = torch.from_numpy(batch).to(device)  # [B, T + 1]
            logits = net(tokens[:, :-1])  # [B, T, V]
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if model.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(net.parameters(), model.grad_clip)
            optimizer.step()
            scheduler.step()
            train_seconds += time.perf_counter() - started
            losses.append(loss.item())
            done = step + 1
            if done % options.eval_every == 0 or done == options.steps:
                bits, accuracy = self.score(net, data.eval_windows, options.batch_size)
                row = {
                    "train_bits_per_byte": float(np.mean(losses)) / math.log(2),
                    "val_bits_per_byte": bits,
                    "val_accuracy": accuracy,
                    "lr": scheduler.get_last_lr()[0],
                }
                history.append({"step": done, **row})
                job.log_row(name, row, step=done)
                losses = []
        bits, accuracy = history[-1]["val_bits_per_byte"], history[-1]["val_accuracy"]
        trained_bytes = options.steps * options.batch_size * options.seq_len
        return {
            "metrics": {
                "bits_per_byte": bits,
                "accuracy": accuracy,
                "params": num_params(net),
                "train_bytes_per_second": trained_bytes / max(train_seconds, 1e-9),
            },
            "best_step": min(history, key=lambda row: row["val_bits_per_byte"])["step"],
            "history": history,
        }

    @staticmethod
    def score(net: Any, windows: np.ndarray, batch_size: int) -> tuple[float, float]:
        """Held-out bits per byte and next-byte accuracy over every position of `windows`."""
        import torch

        net.eval()
        nats, correct, count = 0.0, 0, 0
        device = next(net.parameters()).device
        with torch.no_grad():
            for chunk in torch.from_numpy(windows).to(device).split(batch_size):
                logits = net(chunk[:, :-1])  # [B, T, V]
                targets = chunk[:, 1:]
                nats += torch.nn.functional.cross_entropy(
                    logits.flatten(0, 1), targets.flatten(), reduction="sum"
                ).item()
                correct += int((logits.argmax(dim=-1) == targets).sum().item())
                count += targets.numel()
        return nats / count / math.log(2), correct / count

    def sections(self, job: Job, data: Text, results: dict[str, dict[str, Any]]) -> list[dict]:
        path, relative = job.figure("training_curves.png")
        histories = {name: r["history"] for name, r in results.items()}
        keys = ("train_bits_per_byte", "val_bits_per_byte", "val_accuracy")
        plots.training_curves(path, histories, keys, "step")
        note = f"Held-out windows; the unigram floor is {data.unigram_bits:.3f} bits per byte."
        return [{"title": "training curves", "note": note, "images": [relative]}]


SEQUENCE = SequenceTask()
