"""Near duplicates confirmed by their true Jaccard similarity, not only by its MinHash estimate.

112 hashes estimate a similarity to about +-0.04, so pairs of real text at a true 0.67-0.75
(versions of one module, say) pass a threshold of 0.75 as often as not: on 1 GB of source files
4.6% of the near removals were such pairs. The documents some band matches are few, so their
shingles are gathered in one more read of the sources into a memory-mapped file, and a pair the
signatures confirm must also reach the threshold with the Jaccard similarity of its shingle
sets. The shingles are the signature stage's own (datatrove's get_shingles with our word
splitting), so both measure the same sets.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from datatrove.pipeline.dedup.minhash import MinhashDedupSignature

from data_prep.curate_minhash import SpaceWords, minhash_config
from data_prep.curate_options import NearOptions
from pipeline.engine.errors import PipelineError


class Shingles:
    """The sorted distinct shingle hashes of some documents, by global id."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray, data: np.ndarray) -> None:
        self.ids, self.offsets, self.data = ids, offsets, data

    def of(self, doc: int) -> np.ndarray:
        k = int(np.searchsorted(self.ids, doc))
        return self.data[self.offsets[k] : self.offsets[k + 1]]

    def jaccard(self, a: int, b: int) -> float:
        """The true Jaccard similarity of two documents' shingle sets."""
        x, y = self.of(a), self.of(b)
        both = len(np.intersect1d(x, y, assume_unique=True))
        return both / max(len(x) + len(y) - both, 1)


def gather(texts: Iterator[str], wanted: np.ndarray, options: NearOptions, path: Path) -> Shingles:
    """Read `texts` (every document, in order) and keep the shingles of the `wanted` ids (sorted)
    in the file at `path`."""
    if not len(wanted):
        return Shingles(wanted, np.zeros(1, np.int64), np.empty(0, np.uint64))
    block = MinhashDedupSignature(output_folder=str(path.parent), config=minhash_config(options))
    block.word_tokenizer = SpaceWords()
    offsets = [0]
    read = 0
    with path.open("wb") as out:
        for index, text in enumerate(texts):
            read = index + 1
            if len(offsets) > len(wanted):
                break
            if index == wanted[len(offsets) - 1]:
                hashes = np.unique(block.get_shingles(text))
                out.write(hashes.astype("<u8").tobytes())
                offsets.append(offsets[-1] + len(hashes))
    if len(offsets) <= len(wanted):
        raise PipelineError(
            f"curate: the sources now give {read} documents, fewer than the {wanted[-1] + 1} "
            f"analysed (they changed during the stage); rerun the stage"
        )
    data = np.memmap(path, "<u8", mode="r") if offsets[-1] else np.empty(0, np.uint64)
    return Shingles(wanted, np.asarray(offsets, np.int64), data)
