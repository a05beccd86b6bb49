"""Report sections: the tables and figures a stage hands to the report stage (eval.report).

Any stage, from data preparation to evaluation, writes them beside its export with
`write_sections`; the report stage reads every finished stage's file in recipe order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.engine.manifest import atomic_write_text

SECTIONS_FILE = "report.json"


def write_sections(export_dir: Path, sections: list[dict[str, Any]]) -> None:
    """Give the report tables and figures of a stage: `export_dir/report.json`.

    Each section is `{"title": str, "note": str?, "columns": [str], "rows": [[cell]],
    "images": [path relative to export_dir]}`; every key but `title` is optional. The report
    stage shows the sections of every finished stage, in recipe order, with its images copied
    beside the page.
    """
    for section in sections:
        if "title" not in section:
            raise ValueError(f"report section without a title: {section!r}")
        for image in section.get("images", []):
            if not (export_dir / image).is_file():
                raise ValueError(f"report section {section['title']!r}: no image {image}")
    export_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(export_dir / SECTIONS_FILE, json.dumps({"sections": sections}, indent=1))
