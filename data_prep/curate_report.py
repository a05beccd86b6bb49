"""The curate stage's report sections and W&B logs: kept and removed documents and bytes per step
and per source, the sizes of the near-duplicate clusters (a table and a PNG), and a few removed
documents of each reason with the start of their text.

The sections go to `export/report.json` through pipeline.engine.sections.write_sections, so the report stage
shows them as it shows any stage's; the same numbers go to metrics.jsonl and W&B. Everything here
is read from the export (documents.json and the removed/ shards), so the figures are those of
the files a user can open, and the same bytes for any number of parts.
"""

from __future__ import annotations

import gzip
import io
import json
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeAlias

import zstandard

from data_prep.documents_meta import REMOVED_DIR, Counts, DocumentsMeta
from pipeline.engine.sections import write_sections
from pipeline.engine.tracking import Tracker

Locate: TypeAlias = Callable[[str], "tuple[int, int] | None"]
CLUSTERS_PNG = "near_clusters.png"
COUNTS_TITLE = "Curation: kept and removed"
CLUSTERS_TITLE = "Near-duplicate clusters"
EXAMPLES_TITLE = "Removed documents: examples"
WANDB_KEYS = {COUNTS_TITLE: "curate/counts", CLUSTERS_TITLE: "curate/near_clusters",
              EXAMPLES_TITLE: "curate/examples"}  # fmt: skip
EXAMPLES_PER_REASON = 3
EXAMPLE_CHARS = 240
COUNT_COLUMNS = ["step", "source", "documents", "bytes", "documents %", "bytes %"]
EXAMPLE_COLUMNS = ["step", "reason", "id", "source", "kept id", "text"]
# Reasons that name a document or a similarity: one group per step, not one per removal.
ONE_REASON = {"exact": "exact duplicate", "near": "near duplicate", "lines": "only boilerplate"}


def write(
    meta: DocumentsMeta, export_dir: Path, locate: Locate | None = None
) -> list[dict[str, Any]]:
    """Write the curation sections (and the cluster PNG) into `export_dir`; the sections.
    `locate` finds the evaluation item in a decontaminated text (Contamination.where)."""
    sections = [counts_section(meta)]
    if any(step.step == "near" for step in meta.steps):
        sections.append(clusters_section(meta.cluster_sizes, export_dir))
    examples = example_rows(meta, export_dir, locate)
    if examples:
        sections.append(
            {
                "title": EXAMPLES_TITLE,
                "note": f"Up to {EXAMPLES_PER_REASON} removed documents of each reason, in "
                f"document order, their text cut at {EXAMPLE_CHARS} characters (a "
                f"decontaminated one around the item it holds); every removed document is in "
                f"{REMOVED_DIR}/<step>/ with its reason.",
                "columns": EXAMPLE_COLUMNS,
                "rows": examples,
            }
        )
    write_sections(export_dir, sections)
    return sections


def counts_section(meta: DocumentsMeta) -> dict[str, Any]:
    """Read, removed per step and kept documents and bytes, per source (and for all sources)."""
    names = [source.name for source in meta.sources]
    read = {s.name: s.read for s in meta.sources}
    blocks: list[tuple[str, dict[str, Counts]]] = [("read", read)]
    blocks += [(step.step, step.removed) for step in meta.steps]
    blocks.append(("kept", {s.name: s.kept for s in meta.sources}))
    total_read = _total(read.values())
    rows = []
    for label, counts in blocks:
        for name in names:
            rows.append(_count_row(label, name, counts[name], read[name]))
        if len(names) > 1:
            rows.append(_count_row(label, "all", _total(counts.values()), total_read))
    cut = [step for step in meta.steps if step.lines_cut]
    note = "Each step sees what the steps before it kept; % of what the source read."
    if meta.decontaminated_against:
        items = ", ".join(f"{o} ({n} items)" for o, n in meta.decontaminated_against.items())
        note += f" Decontaminated against {items}."
    if cut:
        lines = _total(cut[0].lines_cut.values())
        note += (
            f" Boilerplate removal also cut {lines.documents} lines ({lines.bytes} bytes) out "
            f"of documents it kept."
        )
    return {"title": COUNTS_TITLE, "note": note, "columns": COUNT_COLUMNS,
            "rows": rows}  # fmt: skip


def _count_row(label: str, name: str, counts: Counts, read: Counts) -> list[Any]:
    return [
        label,
        name,
        counts.documents,
        counts.bytes,
        round(100 * counts.documents / max(read.documents, 1), 3),
        round(100 * counts.bytes / max(read.bytes, 1), 3),
    ]


def _total(counts: Any) -> Counts:
    found = list(counts)
    return Counts(documents=sum(c.documents for c in found), bytes=sum(c.bytes for c in found))


def clusters_section(cluster_sizes: dict[int, int], export_dir: Path) -> dict[str, Any]:
    """Near-duplicate clusters by size (documents, the kept one included), table and PNG."""
    rows = [[size, count, size * count] for size, count in sorted(cluster_sizes.items())]
    if not rows:
        return {"title": CLUSTERS_TITLE, "note": "No near-duplicate cluster found."}
    clusters = sum(count for _, count, _ in rows)
    removed = sum(documents - count for _, count, documents in rows)
    plot_clusters(cluster_sizes, export_dir / CLUSTERS_PNG)
    return {
        "title": CLUSTERS_TITLE,
        "note": f"{clusters} clusters; the earliest document of each is kept, the other "
        f"{removed} removed naming it.",
        "columns": ["cluster size", "clusters", "documents"],
        "rows": rows,
        "images": [CLUSTERS_PNG],
    }


def plot_clusters(cluster_sizes: dict[int, int], path: Path) -> None:
    """Bar chart of clusters per cluster size, counts on a log axis (most clusters are pairs)."""
    from matplotlib.figure import Figure  # heavy; only when there are clusters to draw

    sizes = sorted(cluster_sizes)
    figure = Figure(figsize=(6, 3.2), dpi=100, layout="constrained")
    axes = figure.subplots()
    bars = axes.bar([str(s) for s in sizes], [cluster_sizes[s] for s in sizes], color="tab:blue")
    axes.bar_label(bars, fontsize=8)
    axes.set_yscale("log")
    axes.set_xlabel("cluster size (documents)")
    axes.set_ylabel("clusters")
    axes.set_title("Near-duplicate clusters by size")
    axes.grid(alpha=0.3, axis="y")
    figure.savefig(path, format="png", metadata={"Software": None})


def example_rows(
    meta: DocumentsMeta, export_dir: Path, locate: Locate | None = None
) -> list[list[Any]]:
    """The first EXAMPLES_PER_REASON removed documents of each reason, per step in order."""
    rows = []
    for step in meta.steps:
        found: Counter[str] = Counter()
        for record in _step_records(meta, export_dir, step.step):
            reason = _group(step.step, record)
            if found[reason] < EXAMPLES_PER_REASON:
                found[reason] += 1
                rows.append(_example(step.step, reason, record, locate))
            elif step.step in ONE_REASON:
                break  # the step's one reason has its examples: read no further
    return rows


def _group(step: str, record: dict[str, Any]) -> str:
    """The reason a removal's examples are grouped by: one per duplicate step, one per language
    found (its reason also holds a score), else the reason itself."""
    if step == "language":
        return f"language {record['language']}"
    return ONE_REASON.get(step, record["reason"])


def _step_records(meta: DocumentsMeta, export_dir: Path, step: str) -> Iterator[dict[str, Any]]:
    for shard in meta.removed_shards.get(step, []):
        yield from records(export_dir / shard)


def _example(step: str, reason: str, record: dict[str, Any], locate: Locate | None) -> list[Any]:
    text = record["text"]
    span = locate(text) if locate is not None and step == "decontaminate" else None
    start = max(0, span[0] - EXAMPLE_CHARS // 3) if span is not None else 0
    cut = text[start : start + EXAMPLE_CHARS]
    cut = (
        ("[...] " if start else "") + cut + (" [...]" if start + EXAMPLE_CHARS < len(text) else "")
    )
    kept = record.get("kept_id")  # None: the report shows "-"
    detail = record["reason"] if step in ONE_REASON or step == "language" else reason
    return [step, detail, record["id"], record["source"], kept, cut]


def records(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON records of one shard (.jsonl.zst or .jsonl.gz), streamed."""
    with path.open("rb") as raw:
        if path.name.endswith(".gz"):
            stream: Any = gzip.GzipFile(fileobj=raw)
        else:
            stream = zstandard.ZstdDecompressor().stream_reader(raw)
        for line in io.TextIOWrapper(stream, encoding="utf-8"):
            yield json.loads(line)


def track(
    tracker: Tracker, stats: dict[str, Any], sections: list[dict[str, Any]], export_dir: Path
) -> None:
    """The summary's numbers to metrics.jsonl and W&B (step 0), and the sections as W&B
    tables, the cluster sizes as a histogram and its PNG as an image."""
    tracker.log(stats, step=0)
    tracker.summary(stats)
    if tracker.wandb_run is not None:
        tracker.wandb_run.log(wandb_payload(sections, export_dir), step=0)


def wandb_payload(sections: list[dict[str, Any]], export_dir: Path) -> dict[str, Any]:
    """W&B objects for the sections: a Table per table, a Histogram of cluster sizes, Images."""
    import wandb  # heavy; only when a W&B run is on

    payload: dict[str, Any] = {}
    for section in sections:
        key = WANDB_KEYS[section["title"]]
        if section.get("rows"):
            payload[key] = wandb.Table(columns=section["columns"], data=section["rows"])
        for image in section.get("images", []):
            payload[f"{key}_plot"] = wandb.Image(str(export_dir / image))
        if section["title"] == CLUSTERS_TITLE and section.get("rows"):
            sizes = [size for size, count, _ in section["rows"] for _ in range(count)]
            bins = min(64, max(sizes) - min(sizes) + 1)
            payload[f"{key}_sizes"] = wandb.Histogram(sizes, num_bins=bins)
    return payload
