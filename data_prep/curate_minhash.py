"""Near-duplicate removal: datatrove's MinHash signature and bucket stages, then our clustering.

datatrove's MinhashDedupSignature hashes the word shingles of each document and writes, per part
and per band, the band's hashes sorted; MinhashDedupBuckets merges the parts' files of one band
and writes every pair of documents whose band matches. Both run here unchanged, on our folders,
with one substitution: the signature stage splits datatrove's simplified text (lower case, no
punctuation, single spaces) on spaces instead of with spaCy's English tokenizer, which on such
text finds the same words (it splits a few contractions such as "cannot") at about a hundredth
of the cost.

The clustering is ours. datatrove's MinhashDedupCluster keeps whichever document union by size
leaves at the root, keeps every pair the bands propose (about 5% of pairs at Jaccard 0.5 with 14
bands of 8), and says nothing of which document was kept. Here each candidate pair is confirmed
by the Jaccard similarity its full signatures estimate (num_hashes hashes: about +-0.04), the
confirmed pairs are joined into clusters, and the earliest document of each cluster is kept; every
other one is removed naming it and the similarity to it.

The bucket stage writes, for each group of documents whose band matches, a chain: every member
paired with the member before it. Union of every pair (datatrove's clustering) joins the group
whatever the chain's order, but dropping a pair breaks it: a member an earlier step removed, or
a chance candidate the signatures reject, would cut off every member after it (a near copy
following its original and the original's exact copy was kept). So the chains are read back
into their groups, and each kept member is linked to the nearest earlier kept member of its
group that the signatures confirm.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from datatrove.data import Document as DatatroveDocument
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupSignature,
)
from datatrove.utils.text import TextNormConfig
from datatrove.utils.word_tokenizers import WordTokenizer

from data_prep.curate_options import NearOptions

SIGNATURES_FILE = "signatures.npy"
NO_SIGNATURE = np.iinfo(np.uint64).max  # a document shorter than one shingle


class _SpaceWords(WordTokenizer):
    """Words of text datatrove's simplify_text already normalised: split on spaces."""

    def word_tokenize(self, text: str) -> list[str]:
        return text.split()

    def sent_tokenize(self, text: str) -> list[str]:
        return [text]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(0, len(text))]


def minhash_config(options: NearOptions) -> MinhashConfig:
    return MinhashConfig(
        n_grams=options.shingle_size,
        num_buckets=options.bands,
        hashes_per_bucket=options.rows,
        seed=options.seed,
        norm_config=TextNormConfig(norm_numbers=options.ignore_numbers),
    )


def sign(
    documents: Iterator[DatatroveDocument], options: NearOptions, folder: Path, part: int
) -> None:
    """Run datatrove's signature stage over one part's documents (all of them, in order)."""
    block = MinhashDedupSignature(output_folder=str(folder), config=minhash_config(options))
    block.word_tokenizer = _SpaceWords()
    block.run(documents, rank=part, world_size=1)


def gather_signatures(
    options: NearOptions, folder: Path, part: int, num_documents: int, out: Path
) -> None:
    """Write the part's full signatures (one row per document, in order) from its band files."""
    rows = options.rows
    record = np.dtype([("hashes", "<u8", (rows,)), ("doc", "<u4")])
    signatures = np.lib.format.open_memmap(
        out, mode="w+", dtype=np.uint64, shape=(num_documents, options.num_hashes)
    )
    signatures[:] = NO_SIGNATURE
    for band in range(options.bands):
        data = np.fromfile(folder / f"bucket_{band:03d}" / f"{part:05d}.minhash.sig", record)
        signatures[data["doc"], band * rows : (band + 1) * rows] = data["hashes"]
    signatures.flush()
    del signatures


def candidate_pairs(options: NearOptions, folder: Path, dups: Path) -> list[np.ndarray]:
    """Per band, the (part, doc, part, doc) pairs datatrove's bucket stage writes: each member of
    a group of documents whose band matches, with the member before it."""
    config = minhash_config(options)
    found = []
    for band in range(options.bands):
        block = MinhashDedupBuckets(
            input_folder=str(folder), output_folder=str(dups), config=config
        )
        block.run(None, rank=band, world_size=options.bands)
        files = sorted(dups.glob(f"{band:05d}_*.dups"))
        pairs = [np.fromfile(path, "<u4").reshape(-1, 4) for path in files]
        found.append(np.concatenate([np.empty((0, 4), np.uint32), *pairs]))
    return found


def band_groups(chain: np.ndarray) -> list[np.ndarray]:
    """The groups of one band's chain pairs (global ids, n x 2), each as its ids in order."""
    if not len(chain):
        return []
    starts = np.flatnonzero(np.r_[True, chain[1:, 0] != chain[:-1, 1]])
    ends = [*starts[1:].tolist(), len(chain)]
    return [
        np.sort(np.r_[chain[start, 0], chain[start:end, 1]])
        for start, end in zip(starts.tolist(), ends, strict=True)
    ]


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """The Jaccard similarity two full signatures estimate."""
    return float(np.mean(a == b))


def clusters(
    groups: list[np.ndarray],
    alive: np.ndarray,
    signature: Callable[[int], np.ndarray],
    threshold: float,
) -> tuple[dict[int, tuple[int, float]], Counter[int]]:
    """{removed document: (kept document, estimated Jaccard)} and the cluster-size histogram.

    `groups` are the global ids of documents some band matches; removed documents are left out.
    """
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        while parent.get(x, x) != x:
            parent[x] = parent.get(parent[x], parent[x])  # path halving
            x = parent[x]
        return x

    for group in groups:
        members = group[alive[group]].tolist()
        if len(members) < 2:
            continue
        table = np.stack([signature(m) for m in members])
        for i in range(1, len(members)):
            if root(members[i]) == root(members[i - 1]):
                continue  # already joined (the group recurs in most bands)
            link = _nearest_confirmed(table, i, threshold)
            if link < 0:
                continue
            ra, rb = root(members[i]), root(members[link])
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)  # the earliest document is every cluster's root
    removed: dict[int, tuple[int, float]] = {}
    sizes: Counter[int] = Counter()
    for node in sorted(parent):
        kept = root(node)
        if node != kept:
            removed[node] = (kept, similarity(signature(node), signature(kept)))
            sizes[kept] += 1
    return removed, Counter(size + 1 for size in sizes.values())


def _nearest_confirmed(table: np.ndarray, i: int, threshold: float) -> int:
    """The last row before row i whose signature confirms row i's, or -1 (the row just before
    is tried first: in a group of near copies it confirms, so a group costs linear time)."""
    if similarity(table[i - 1], table[i]) >= threshold:
        return i - 1
    confirmed = np.flatnonzero((table[: i - 1] == table[i]).mean(axis=1) >= threshold)
    return int(confirmed[-1]) if len(confirmed) else -1


def signature_reader(folders: list[Path], offsets: list[int]) -> Callable[[int], np.ndarray]:
    """signature(global id) over the parts' signature files (memory-mapped)."""
    tables = [np.load(folder / SIGNATURES_FILE, mmap_mode="r") for folder in folders]
    starts = np.asarray(offsets)

    def signature(index: int) -> np.ndarray:
        part = int(np.searchsorted(starts, index, side="right")) - 1
        return tables[part][index - offsets[part]]

    return signature


def global_pairs(raw: np.ndarray, offsets: list[int]) -> np.ndarray:
    """(part, doc, part, doc) rows as (global id, global id)."""
    starts = np.asarray(offsets, np.int64)
    return np.stack([starts[raw[:, 0]] + raw[:, 1], starts[raw[:, 2]] + raw[:, 3]], axis=1).astype(
        np.int64
    )
