"""The package layout keeps its promises: layers import one way, one training loop, small files.

Read from the source (no imports run), so the checks hold for code paths no test executes.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.import_graph import find_modules, import_graph

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "data_prep", "eval")
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80


def _sources() -> dict[str, Path]:
    return find_modules(ROOT, PACKAGES)


def test_engine_and_train_library_import_nothing_above_them() -> None:
    """The engine knows no stage, model or training code; the train library no stage kind, data
    format, evaluation or baseline (both find stages only through the registry of names)."""
    graph = import_graph(_sources())
    above = {
        "pipeline.engine": ("pipeline.",),
        "pipeline.train": ("pipeline.stages", "pipeline.baselines", "pipeline.diffusion",
                           "pipeline.cli", "data_prep", "eval"),
    }  # fmt: skip
    wrong = []
    for module, targets in sorted(graph.items()):
        for layer, forbidden in above.items():
            if module == layer or module.startswith(layer + "."):
                wrong += [
                    f"{module} -> {t}"
                    for t in sorted(targets)
                    if t.startswith(forbidden) and not t.startswith(layer)
                ]
    assert len(graph) > 50 and any(m.startswith("pipeline.engine.") for m in graph)
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_one_file_holds_the_training_loop() -> None:
    """Gradient accumulation (`accelerator.accumulate(`) is written once, in pipeline/train/loop.py."""
    holders = sorted(
        str(path.relative_to(ROOT))
        for path in _sources().values()
        if "accumulate(" in path.read_text(encoding="utf-8")
    )
    assert holders == ["pipeline/train/loop.py"]


def test_no_module_over_400_lines_and_no_function_over_80() -> None:
    too_long = []
    for path in _sources().values():
        source = path.read_text(encoding="utf-8")
        name = str(path.relative_to(ROOT))
        if source.count("\n") > MAX_FILE_LINES:
            too_long.append(f"{name}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}:{node.lineno} {node.name}(): {length} lines")
    assert not too_long, "split by responsibility:\n" + "\n".join(too_long)
