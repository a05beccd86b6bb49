"""Fixtures shared by the test modules; the helpers they import are in tests/helpers.py."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import helpers
from tests.helpers import tiny_recipe, write_recipe


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Image listings (data_prep/image_listing.py) are cached in a temp dir, not ~/.cache."""
    os.environ["PIPELINE_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before the test's fixtures are set up: may it (or they) run the CLI in a subprocess?"""
    helpers.subprocess_allowed = any(item.get_closest_marker(m) for m in ("e2e", "slow"))


@pytest.fixture
def recipe_path(tmp_path: Path) -> Path:
    return write_recipe(tmp_path / "tiny.yaml", tiny_recipe(tmp_path / "runs" / "tiny"))


@pytest.fixture(autouse=True)
def stage_logging_removed() -> Iterator[None]:
    """A stage run in this process points the `pipeline` logger at its stage.log, and leaves
    Accelerate's process-wide state (precision, engine) set; undo both afterwards, so the next
    in-process run may choose its own."""
    yield
    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    for name in ("pipeline", "py.warnings"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()
    logging.captureWarnings(False)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run dir whose tiny tokenizer and tokenize stages are done (by the CLI, so e2e tests
    only); each test starts from a copy of it."""
    tmp = tmp_path_factory.mktemp("prepared")
    data = tiny_recipe(tmp / "run")
    data["stages"] = {name: data["stages"][name] for name in ("tokenizer", "tokenize")}
    result = helpers.cli("run", str(write_recipe(tmp / "tiny.yaml", data)))
    assert result.returncode == 0, result.stderr
    return tmp / "run"


# Tiny downloaded-style model dirs (tests/hf_models.py), shared by the whole session: copy one
# before changing it. Imported inside the fixtures because transformers takes seconds to import
# and most test sessions never use these.
@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Qwen2.5-style model dir: tied bf16 weights, byte-level BPE, ChatML template, no BOS."""
    from tests.hf_models import build_qwen2

    return build_qwen2(tmp_path_factory.mktemp("hf") / "qwen2")


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama-style model dir: SentencePiece tokenizer.model plus tokenizer.json, BOS, no pad."""
    from tests.hf_models import build_llama

    return build_llama(tmp_path_factory.mktemp("hf") / "llama")


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GPT-2-style model dir: byte-level BPE whose only special token is <|endoftext|>."""
    from tests.hf_models import build_gpt2

    return build_gpt2(tmp_path_factory.mktemp("hf") / "gpt2")
