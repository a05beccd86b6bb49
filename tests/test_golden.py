"""The golden trace: code moves and refactors of the training loop change no float.

tests/golden/trace.json was recorded before the pretrain and image loops became one
(`python -m tests.golden_trace --record`); the same recipes, with the optimizer kernel the trace
was recorded with, must give the same per-step losses, grad norms, learning rates, val losses and
exported weights, bit for bit. CPUs of another kind round differently (their kernels differ):
`golden/trace-<machine>.json`, recorded there by the code of the last landed commit, is the
bit-for-bit reference on such a CPU; on a CPU with no trace of its own, the original trace is
compared within a relative 1e-5 (rounding, not a change of meaning) and the digests are skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.golden_trace import GOLDEN, golden_for_machine, trace


@pytest.mark.slow
def test_training_runs_reproduce_the_golden_trace_bit_for_bit(tmp_path: Path) -> None:
    own = golden_for_machine()
    expected = json.loads((own if own.exists() else GOLDEN).read_text())
    got = trace(tmp_path, with_kernel=True)
    assert set(got) == set(expected)
    for name in expected:
        if own.exists():
            assert got[name]["rows"] == expected[name]["rows"], name
            assert got[name]["val_loss"] == expected[name]["val_loss"], name
            assert got[name]["export_sha256"] == expected[name]["export_sha256"], name
        else:
            assert len(got[name]["rows"]) == len(expected[name]["rows"]), name
            for row, want in zip(got[name]["rows"], expected[name]["rows"], strict=True):
                assert row == pytest.approx(want, rel=1e-5), name
            assert got[name]["val_loss"] == pytest.approx(expected[name]["val_loss"], rel=1e-5)
