"""No import cycles among the project's modules (read from source, so lazy imports count too).

The graph builder (tests/import_graph.py) counts imports inside functions and leaves out those
under `if TYPE_CHECKING:`, which never execute. It is checked here on tiny synthetic packages.
"""

from __future__ import annotations

from pathlib import Path

from tests.import_graph import find_cycles, find_modules, import_graph

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "data_prep", "eval")


def write_package(root: Path, files: dict[str, str]) -> None:
    """Write `{relative path: source}` under `root`."""
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source, encoding="utf-8")


def test_project_has_no_import_cycles() -> None:
    """Stages, data_prep and eval import the engine and train library; nothing imports back up."""
    assert len(find_modules(ROOT, PACKAGES)) > 50  # the scan sees the real packages
    cycles = find_cycles(ROOT, PACKAGES)
    listing = "\n".join("  " + " -> ".join(cycle) for cycle in cycles)
    assert not cycles, (
        f"import cycles (one per strongly connected group of modules):\n{listing}\n"
        "move what both sides share down a layer (a constant, a function, a registry of module "
        "names resolved with importlib); an import inside a function still counts"
    )


def test_cycle_through_an_import_inside_a_function_is_found(tmp_path: Path) -> None:
    """a imports b inside a function, b imports a at top level: one cycle."""
    write_package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "def f():\n    from pkg import b\n\n    return b\n",
            "pkg/b.py": "import pkg.a\n",
            "pkg/c.py": "from pkg.a import f\n",
        },
    )
    assert find_cycles(tmp_path, ["pkg"]) == [["pkg.a", "pkg.b", "pkg.a"]]


def test_one_cycle_per_strongly_connected_group(tmp_path: Path) -> None:
    """Two separate groups give two cycles; a three-module ring is reported as one."""
    write_package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from . import b\n",
            "pkg/b.py": "from .c import thing\n",
            "pkg/c.py": "from pkg.a import x\nthing = 1\n",
            "pkg/sub/__init__.py": "from pkg.sub.d import y\n",
            "pkg/sub/d.py": "import pkg.sub\ny = 1\n",
        },
    )
    assert find_cycles(tmp_path, ["pkg"]) == [
        ["pkg.a", "pkg.b", "pkg.c", "pkg.a"],
        ["pkg.sub", "pkg.sub.d", "pkg.sub"],
    ]


def test_acyclic_package_passes(tmp_path: Path) -> None:
    """Downward imports, a TYPE_CHECKING-only import back up and a string registry: no cycle."""
    write_package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/low.py": (
                "from typing import TYPE_CHECKING\n\n"
                "if TYPE_CHECKING:\n    from pkg.high import Thing\n\n"
                "REGISTRY = {'high': 'pkg.high'}\n"
            ),
            "pkg/high.py": "import importlib\n\nfrom pkg import low\n\nclass Thing: ...\n",
            "pkg/main.py": "def main():\n    from pkg.high import Thing\n    return Thing\n",
        },
    )
    assert find_cycles(tmp_path, ["pkg"]) == []


def test_imports_resolve_to_modules(tmp_path: Path) -> None:
    """Submodules named by `from x import y`, relative levels, packages and outside names."""
    write_package(
        tmp_path,
        {
            "pkg/__init__.py": "from .core import VALUE\n",
            "pkg/core.py": "import os\nimport numpy\nVALUE = 1\n",
            "pkg/sub/__init__.py": "from . import leaf\n",
            "pkg/sub/leaf.py": (
                "from .. import core\nfrom ..core import VALUE\nfrom pkg import VALUE as V\n"
                "import pkg.sub.other as other\nimport typing\n\n"
                "if typing.TYPE_CHECKING:\n    from pkg.sub import nothing\n"
                "else:\n    from pkg.sub import other as o\n"
            ),
            "pkg/sub/other.py": "def f():\n    try:\n        from pkg.core import *\n"
            "    except ImportError:\n        pass\n",
        },
    )
    assert import_graph(find_modules(tmp_path, ["pkg"])) == {
        "pkg": {"pkg.core"},
        "pkg.core": set(),
        "pkg.sub": {"pkg.sub.leaf"},
        "pkg.sub.leaf": {"pkg", "pkg.core", "pkg.sub.other"},
        "pkg.sub.other": {"pkg.core"},
    }
