"""Mixtures for the tokenize stage: which source each document comes from, and where it went.

A list of sources without weights is mixed round-robin, one document of each in turn (see
sources.tagged_documents). With `weight:` on every source, source k's share of the train tokens
is w_k = weight_k / (sum of weights), counted after packing: its documents' tokens, each with its
end-of-document token, as written to train/. Before each document the source furthest below
its share goes next: the one with the smallest lag_k = train_tokens_k - w_k * train_tokens (the
earlier source on a tie). A lag changes by at most one document's tokens at a time and the
chosen source's lag is never positive, so over any stretch of W train tokens each share is
within spread / W of its weight, where spread is the largest range (max - min) a source's lag
took: with two sources at most the longest document. The stage records the spread and
`window_tokens` = 100 * spread, the stretch over which every share is within 1 point; N, the
number of sequences, is window_tokens / seq_len.

When a weighted source runs out, `on_exhausted: stop` ends the mixture (no source is read past
its end) and `cycle` reads it again from its first document (its epochs are counted); a mixture
of cycling sources ends once every source has been read to its end at least once.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from data_prep.sources import SourceConfig, iter_documents, tagged_documents

# encode(items of (text, payload)) -> (tokens incl. end-of-document token, payload), in order
Encode = Callable[..., Iterator[tuple[Any, Any]]]
Item = str | tuple[str, int] | tuple[str, int, int]
WINDOW_POINTS = 100  # window_tokens = WINDOW_POINTS x spread: every share within 1 point


class Mixture:
    """Documents tagged with their source, and a tally of where each source's documents went.

    The tally (train and val tokens and documents per source, and which runs of the val token
    stream came from which source) is the state a resumed run restores; `record()` is what the
    tokenize export's meta.json keeps.
    """

    def __init__(self, names: list[str], sources: list[SourceConfig] | None = None) -> None:
        self.names = names
        self.sources = sources
        size = len(names)
        self.tally: dict[str, Any] = {
            key: [0] * size for key in ("train_tokens", "train_documents", "val_tokens")
        }
        self.tally["val_documents"] = [0] * size
        self.tally["val_runs"] = []  # [end (exclusive) in the val token stream, source]

    def items(self, encode: Encode, start: int) -> Iterator[tuple[Any, int, int]]:
        """(tokens, copies in train, source) per document, from document `start` on."""
        raise NotImplementedError

    def count(self, source: int, split: str, num_tokens: int, documents: int = 1) -> None:
        """Record that `num_tokens` tokens of `source` (in `documents` documents) went to `split`."""
        self.tally[f"{split}_tokens"][source] += num_tokens
        self.tally[f"{split}_documents"][source] += documents
        if split == "val":
            runs = self.tally["val_runs"]
            end = (runs[-1][0] if runs else 0) + num_tokens
            if runs and runs[-1][1] == source:
                runs[-1][0] = end
            else:
                runs.append([end, source])

    def state(self) -> dict[str, Any]:
        """What a resumed run needs to continue the mixture identically."""
        return {"tally": self.tally}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from `state()` of a run of the same mixture."""
        self.tally = state["tally"]

    def record(self) -> dict[str, Any]:
        """Per-source counts and the val runs, for the export's meta.json."""
        sources = []
        for k, name in enumerate(self.names):
            entry: dict[str, Any] = {"name": name}
            if self.sources is not None:
                entry["uri"] = self.sources[k].uri
            entry |= {key: self.tally[key][k] for key in self.tally if key != "val_runs"}
            sources.append(entry)
        return {"kind": "round_robin", "sources": sources, "val_runs": self.tally["val_runs"]}

    def summary(self) -> dict[str, float]:
        """Each source's share of the train tokens, for the stage summary."""
        total = max(sum(self.tally["train_tokens"]), 1)
        return {
            f"share/{n}": t / total
            for n, t in zip(self.names, self.tally["train_tokens"], strict=True)
        }


class Stream(Mixture):
    """Documents given in order: plain text, (text, copies) or (text, copies, source index)."""

    def __init__(
        self,
        documents: Iterable[Item],
        names: list[str] | None = None,
        sources: list[SourceConfig] | None = None,
    ) -> None:
        super().__init__(names or ["corpus"], sources)
        self.documents = documents

    def items(self, encode: Encode, start: int) -> Iterator[tuple[Any, int, int]]:
        """(tokens, copies, source) of each document after the first `start`."""
        rest = itertools.islice(self.documents, start, None)  # earlier ones: in the shards
        tagged = (_tagged(item) for item in rest)
        for tokens, (copies, source) in encode((doc, (c, s)) for doc, c, s in tagged):
            yield tokens, copies, source


def _tagged(item: Item) -> tuple[str, int, int]:
    if isinstance(item, str):
        return item, 1, 0
    return (item[0], item[1], item[2] if len(item) > 2 else 0)  # type: ignore[misc]


class Weighted(Mixture):
    """Documents of weighted sources, the source furthest below its share of train tokens next."""

    def __init__(self, sources: list[SourceConfig], names: list[str]) -> None:
        super().__init__(names, sources)
        weights = [float(s.weight or 0) for s in sources]
        self.shares = [w / sum(weights) for w in weights]
        self.pass_documents: list[int | None] = [None] * len(sources)  # known once read through
        self.lag_range = [[0.0, 0.0] for _ in sources]

    def items(self, encode: Encode, start: int) -> Iterator[tuple[Any, int, int]]:
        """(tokens, 1, source) per document until the mixture ends (see the module docstring)."""
        assert self.sources is not None
        streams = [self._stream(k, encode, self._position(k)) for k in range(len(self.sources))]
        while True:
            k = self._next_source()
            tokens = next(streams[k], None)
            if tokens is None:  # source k ran out
                read = self._documents(k)
                self.pass_documents[k] = self.pass_documents[k] or read
                ends = self.sources[k].on_exhausted == "stop"
                if ends or all(p is not None for p in self.pass_documents):
                    return
                streams[k] = self._stream(k, encode, 0)
                tokens = next(streams[k])  # a source with no document at all raised already
            yield tokens, 1, k

    def _next_source(self) -> int:
        """The source with the smallest lag (the first on a tie); the lag ranges are updated."""
        total = sum(self.tally["train_tokens"])
        lags = [t - w * total for t, w in zip(self.tally["train_tokens"], self.shares, strict=True)]
        for lag, bounds in zip(lags, self.lag_range, strict=True):
            bounds[0], bounds[1] = min(bounds[0], lag), max(bounds[1], lag)
        return min(range(len(lags)), key=lags.__getitem__)

    def _documents(self, k: int) -> int:
        return self.tally["train_documents"][k] + self.tally["val_documents"][k]

    def _position(self, k: int) -> int | None:
        """Documents of the current pass already read; None at the end of a pass."""
        read, per_pass = self._documents(k), self.pass_documents[k]
        if per_pass is None:
            return read
        return None if read and read % per_pass == 0 else read % per_pass

    def _stream(self, k: int, encode: Encode, skip: int | None) -> Iterator[Any]:
        """Source k's tokens from document `skip` of a pass (None: an ended pass, empty)."""
        assert self.sources is not None
        if skip is None:
            return iter(())
        docs = itertools.islice(iter_documents(self.sources[k]), skip, None)
        return (tokens for tokens, _ in encode(((d, None) for d in docs), self.shares[k]))

    def state(self) -> dict[str, Any]:
        """The tally, the documents per pass found so far and the lag ranges."""
        return {**super().state(), "pass_documents": self.pass_documents, "lags": self.lag_range}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from `state()` of a run of the same mixture."""
        pass_documents, lags = state["pass_documents"], state["lags"]
        super().restore(state)
        self.pass_documents, self.lag_range = pass_documents, lags

    def record(self) -> dict[str, Any]:
        """The round-robin record plus weights, epochs, the lag spread and window_tokens."""
        assert self.sources is not None
        self._next_source()  # the lags after the last document
        record = super().record()
        for k, entry in enumerate(record["sources"]):
            per_pass = self.pass_documents[k]
            entry["weight"] = self.sources[k].weight
            entry["share"] = self.shares[k]
            entry["on_exhausted"] = self.sources[k].on_exhausted
            entry["epochs"] = None if per_pass is None else self._documents(k) / per_pass
        spread = max(high - low for low, high in self.lag_range)
        window = math.ceil(WINDOW_POINTS * spread)
        return {**record, "kind": "weighted", "lag_spread": spread, "window_tokens": window}

    def summary(self) -> dict[str, float]:
        """Shares, epochs (of sources read to their end) and the 1-point window in tokens."""
        record = self.record()
        epochs = {f"epochs/{s['name']}": s["epochs"] for s in record["sources"] if s["epochs"]}
        return {**super().summary(), **epochs, "mixture_window_tokens": record["window_tokens"]}


def mixture_of(sources: list[SourceConfig], names: list[str]) -> Mixture:
    """The mixture a tokenize stage reads: weighted when the sources have weights."""
    if sources[0].weight is not None:
        return Weighted(sources, names)
    return Stream(tagged_documents(sources), names, sources)
