"""The golden trace: code moves and refactors of the training loop change no float.

tests/golden/trace.json was recorded before the pretrain and image loops became one
(`python -m tests.golden_trace --record`); the same recipes, with the optimizer kernel the trace
was recorded with, must give the same per-step losses, grad norms, learning rates, val losses and
exported weights, bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.golden_trace import GOLDEN, trace


@pytest.mark.slow
def test_training_runs_reproduce_the_golden_trace_bit_for_bit(tmp_path: Path) -> None:
    expected = json.loads(GOLDEN.read_text())
    got = trace(tmp_path, with_kernel=True)
    assert set(got) == set(expected)
    for name in expected:
        assert got[name]["rows"] == expected[name]["rows"], name
        assert got[name]["val_loss"] == expected[name]["val_loss"], name
        assert got[name]["export_sha256"] == expected[name]["export_sha256"], name
