"""Planted corpora with known answers for the curate stage, shared by tests/test_curate.py and
bench/curate_scale.py: originals, exact copies, near copies whose word 5-gram Jaccard similarity
to their original lies in a chosen range, edited copies far enough from it to be kept, and
held-out task problems inside ordinary text, shuffled into one JSONL file.

Copies are made while the file is written, one document at a time from its own seed, so a corpus
of any size is written in the memory of its largest document (the originals may be a lazy
sequence, such as files read on access). Similarity is measured as the near step measures it:
word 5-grams of datatrove's simplified text, numbers kept (the step's default).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from datatrove.utils.text import TextNormConfig, simplify_text

LETTERS = "abcdefghijklmnopqrstuvwxyz"
SHINGLE = 5
# The near step's default normalisation (NearOptions.ignore_numbers False).
NORM = TextNormConfig(norm_numbers=False)
# kind -> the range of true Jaccard similarity of a copy to its original
COPIES = {"exact": (1.0, 1.0), "near": (0.85, 0.95), "edited": (0.0, 0.5)}
SPACES = re.compile(r"(\s+)")


def vocabulary(rng: random.Random, size: int = 4000) -> list[str]:
    """Letter-only words (datatrove's shingles map every number to 0, so no digits)."""
    return ["".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 9))) for _ in range(size)]


def shingles(text: str) -> set[tuple[str, ...]]:
    """Word 5-grams of the text as the MinHash step sees it (datatrove's simplify_text)."""
    words = simplify_text(text, NORM).split()
    return {tuple(words[i : i + SHINGLE]) for i in range(len(words) - SHINGLE + 1)}


def jaccard(a: str, b: str) -> float:
    x, y = shingles(a), shingles(b)
    return len(x & y) / max(len(x | y), 1)


def edited(rng: random.Random, text: str, words: list[str], low: float, high: float) -> str:
    """A copy with random words replaced until its true Jaccard lies in [low, high]; the text
    between words (line ends, indentation) is kept.

    The share of words to replace starts from the estimate for one 5-gram per word and is
    corrected after a miss: in code one whitespace-separated word is often several words of the
    simplified text, so a replacement breaks more 5-grams than the estimate counts.
    """
    pieces = SPACES.split(text)  # words at even positions, the spaces between them at odd ones
    slots = range(0, len(pieces), 2)
    target = (low + high) / 2
    share = (1 - target) / (1 + target) / SHINGLE  # words to replace
    for _ in range(100):
        copy = list(pieces)
        for _ in range(max(1, round(share * len(slots)))):
            copy[rng.choice(slots)] = rng.choice(words)
        candidate = "".join(copy)
        similarity = jaccard(text, candidate)
        if low <= similarity <= high:
            return candidate
        share *= 1.25 if similarity > high else 0.8
    raise AssertionError("could not plant a copy in the Jaccard range")


@dataclass
class Truth:
    """What each document of a planted file is; ids are line numbers (the stage's document ids)."""

    kinds: list[str] = field(default_factory=list)  # original, exact, near, edited or an extra
    source_of: dict[int, int] = field(default_factory=dict)  # copy id -> its original's id
    num_bytes: int = 0  # UTF-8 bytes of text

    def pairs(self, kind: str) -> list[tuple[int, int]]:
        """(copy, original) ids of the planted copies of one kind."""
        return [(c, o) for c, o in self.source_of.items() if self.kinds[c] == kind]


def write_planted(
    path: Path,
    originals: Sequence[str],
    rng: random.Random,
    words: list[str],
    copies: dict[str, int],
    extras: Sequence[tuple[str, str]] = (),
) -> Truth:
    """Write `originals`, `copies[kind]` copies of distinct random originals per kind of COPIES,
    and each extra (kind, text) after the first 300 characters of a random original (a
    different one for each), shuffled, as JSONL {"text": ...} lines; what each line is."""
    specs: list[tuple[str, int, int]] = [("original", i, 0) for i in range(len(originals))]
    for kind, count in copies.items():
        specs += [(kind, i, rng.getrandbits(64)) for i in rng.sample(range(len(originals)), count)]
    # distinct hosts: two extras in one original's text would be near copies of each other
    hosts = rng.sample(range(len(originals)), len(extras))
    specs += [
        (kind, host, i) for i, ((kind, _), host) in enumerate(zip(extras, hosts, strict=True))
    ]
    order = list(range(len(specs)))
    rng.shuffle(order)
    position = {spec: line for line, spec in enumerate(order)}
    truth = Truth()
    with path.open("w", encoding="utf-8") as f:
        for spec in order:
            kind, original, seed = specs[spec]
            text = originals[original]
            if kind in COPIES and kind != "exact":
                text = edited(random.Random(seed), text, words, *COPIES[kind])
            elif kind not in COPIES and kind != "original":  # a held-out problem in ordinary text
                text = f"{text[:300]} {extras[seed][1]} end."
            if kind in COPIES:
                truth.source_of[len(truth.kinds)] = position[original]
            truth.kinds.append(kind)
            truth.num_bytes += len(text.encode("utf-8"))
            f.write(json.dumps({"text": text}) + "\n")
    return truth
