"""What the image_eval stage writes: metrics.json, report sections, tracker and stage summaries."""

from __future__ import annotations

import json
from typing import Any

from pipeline.engine.context import StageContext


def write_outputs(
    ctx: StageContext,
    guidance_scale: float,
    rows: list[tuple],
    grids: list[str],
    classes: list[str],
    summary: dict[str, Any],
    sections: list[dict[str, Any]] | None = None,
) -> None:
    """metrics.json, report sections, tracker summary and the stage summary. `classes`: one
    name per grid row; a text-to-image evaluation passes its numbered prompts and `sections`
    (its compositional scores), and its headline is the shapes score where there is one."""
    from pipeline.engine.sections import write_sections

    keys = ("fd", "kid", "precision", "recall", "class_accuracy", "nn_ratio", "images_per_second")
    table = [
        [name, steps if steps is not None else "-", count, *(m.get(k, "-") for k in keys)]
        for name, m, steps, count in rows
    ]
    (ctx.export_dir / "metrics.json").write_text(
        json.dumps({name: {"steps": s, "images": n, **m} for name, m, s, n in rows}, indent=1)
    )
    note = (
        f"Features and class accuracy from a CNN trained on the real training split "
        f"(its accuracy on held-out images: {summary['classifier_val_accuracy']:.3f}). FD/KID/"
        f"precision/recall against {len(classes)}-class real training images; guidance scale "
        f"{guidance_scale}; nn_ratio = median pixel distance to the nearest training image "
        f"over that of held-out images (well below 1 = copies). Lower FD/KID is better."
    )
    write_sections(
        ctx.export_dir,
        [
            {"title": "Sample quality and speed", "note": note,
             "columns": ["samples", "steps", "images", *keys], "rows": table},
            *(
                {"title": f"Samples: {_sampler_title(grid)}",
                 "note": (f"Prompts, left to right and top to bottom: {'; '.join(classes)}."
                          if sections is not None else
                          f"One row per class, top to bottom: {', '.join(classes)}."),
                 "images": [grid]}
                for grid in grids
            ),
            *(sections or []),
            {"title": "Nearest training images", "images": ["nearest.png"],
             "note": "Top: one sample per class; bottom: its nearest training image (pixels)."},
        ],
    )  # fmt: skip
    with ctx.tracker() as tracker:
        tracker.summary(summary)
    text = sections is not None and "shapes/overall" in summary
    ctx.write_summary(summary, headline="shapes/overall" if text else "class_accuracy")


def _sampler_title(grid: str) -> str:
    """'grid_dpm++_20.png' -> 'dpm++, 20 steps'."""
    sampler, steps = grid.removeprefix("grid_").removesuffix(".png").rsplit("_", 1)
    return f"{sampler}, {steps} steps"
