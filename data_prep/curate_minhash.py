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
by the Jaccard similarity its full signatures estimate (num_hashes hashes: about +-0.04) and
then by the true similarity of its shingle sets (data_prep.curate_confirm), and a document is
removed only when it is confirmed against a document kept before it, which it names with the
estimated similarity to it. Joining every confirmed pair into one cluster instead (union-find, as
datatrove does) chains documents through others: in real text (versions of one module, vendored
copies) 4% of the removed documents were then below the threshold with the kept document they
named, some at Jaccard 0.36, and their text was lost from the corpus.

The bucket stage writes, for each group of documents whose band matches, a chain: every member
paired with the member before it. Union of every pair (datatrove's clustering) joins the group
whatever the chain's order, but dropping a pair breaks it: a member an earlier step removed, or
a chance candidate the signatures reject, would cut off every member after it (a near copy
following its original and the original's exact copy was kept). So the chains are read back
into their groups, and each member is compared with every member of its groups kept before it.
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


class SpaceWords(WordTokenizer):
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
    block.word_tokenizer = SpaceWords()
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


def clusters(
    groups: list[np.ndarray],
    alive: np.ndarray,
    signature: Callable[[int], np.ndarray],
    threshold: float,
    confirm: Callable[[int, int], float] | None = None,
) -> tuple[dict[int, tuple[int, float]], Counter[int]]:
    """{removed document: (kept document, estimated Jaccard)} and the cluster-size histogram.

    `groups` are the global ids of documents some band matches; removed documents are left out.
    Documents are taken in order: one whose signature confirms (>= threshold) a document of its
    groups kept before it, and whose true similarity to it (`confirm`, when given) does too, is
    removed, naming the most similar such document; any other is kept.
    """
    member_of: dict[int, list[int]] = {}
    for index, group in enumerate(groups):
        members = group[alive[group]].tolist()
        if len(members) > 1:
            for member in members:
                member_of.setdefault(member, []).append(index)
    kept_in: list[list[int]] = [[] for _ in groups]  # each group's kept members so far
    removed: dict[int, tuple[int, float]] = {}
    for doc in sorted(member_of):
        candidates = sorted({kept for g in member_of[doc] for kept in kept_in[g]})
        found = _most_similar(doc, candidates, signature, threshold, confirm)
        if found is not None:
            removed[doc] = found
            continue
        for g in member_of[doc]:
            kept_in[g].append(doc)
    members = Counter(kept for kept, _ in removed.values())
    return removed, Counter(count + 1 for count in members.values())


def _most_similar(
    doc: int,
    candidates: list[int],
    signature: Callable[[int], np.ndarray],
    at: float,
    confirm: Callable[[int, int], float] | None,
) -> tuple[int, float] | None:
    """The candidate whose signature is most similar to the document's (the earliest of equals)
    among those confirmed at `at`, with the estimated similarity; None when none is."""
    if not candidates:
        return None
    row = signature(doc)
    similarities = (np.stack([signature(c) for c in candidates]) == row).mean(axis=1)
    for best in np.argsort(-similarities, kind="stable").tolist():
        if similarities[best] < at:
            return None
        if confirm is None or confirm(doc, candidates[best]) >= at:
            return candidates[best], float(similarities[best])
    return None


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
