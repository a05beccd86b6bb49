"""Stage kind `curate`: exact and near-duplicate removal, boilerplate lines, quality filters,
language identification and decontamination of a stage's sources before the tokenizer and
tokenize read them.

The steps run in the order `steps` declares, each on what the steps before it kept. The stage
works in three moves. Analysis passes read the documents once per pass (one, or two when steps
follow `lines`) and record what each step needs of each document (data_prep.curate_passes); with
`parts` > 1 the source is split as tokenize splits it (data_prep.fanout) and the parts run as
processes or Slurm array tasks. Then the decisions are taken over every part's records in
document order (data_prep.curate_decide), and one process writes the kept documents per source
and the removed ones per step with their reasons (data_prep.curate_write), so the export is the
same bytes for any number of parts. Parts are committed one by one: a killed stage redoes only
the parts it had not finished, then decides and writes again.

datatrove supplies the MinHash signature and bucket stages and the Gopher and C4 filters;
py3langid identifies languages (data_prep.curate_steps says why not datatrove's filter). The
rest is ours: exact deduplication is a 128-bit hash per document grouped with numpy, because it
must keep the first copy and name it for every removed one, which datatrove's ExactDedup stages
(per-rank hash files, a priority per document) do not report; boilerplate removal cuts a line
held by many documents from all of them, a different rule from datatrove's SentenceDedup (spans
of three spaCy sentences, first occurrence kept); clustering and decontamination say why in
their modules. The decontamination index covers the held-out problems of every task the recipe
names and the files listed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from data_prep import fanout
from data_prep.curate_options import (
    STEPS,
    DecontaminateOptions,
    ExactOptions,
    LanguageOptions,
    LinesOptions,
    NearOptions,
    QualityOptions,
    Step,
)
from data_prep.curate_passes import PartJob, analyze_part, part_done, phases
from data_prep.sources import ARITHMETIC, TASK, SourceConfig, SourceStageConfig
from data_prep.tasks import TaskBase
from pipeline.engine import faults
from pipeline.engine.config import Recipe
from pipeline.engine.context import StageContext
from pipeline.engine.errors import PipelineError
from pipeline.engine.inputs import StageSpec

WORK_DIR = "curate_work"
CONTAMINATION_FILE = "contamination.npz"
EARLIER_FILE = "earlier.npz"


class Config(SourceStageConfig):
    """Deduplicate, filter and decontaminate a source (or a mixture) into curated documents."""

    kind: Literal["curate"] = "curate"
    steps: list[Step] = Field(
        ["exact", "near", "decontaminate"],
        description="the steps, in the order they run: exact, near, lines, quality, language, "
        "decontaminate; each sees what the steps before it kept",
    )
    exact: ExactOptions = ExactOptions()
    near: NearOptions = NearOptions()
    lines: LinesOptions = LinesOptions()
    quality: QualityOptions = QualityOptions()
    language: LanguageOptions = Field(
        LanguageOptions(),
        description="language identification (step `language`) with py3langid 0.4, whose model "
        "is in its wheel: keep (languages), min_score (0-1), prefix_bytes (bytes scored)",
    )
    decontaminate: DecontaminateOptions = DecontaminateOptions()
    compression: Literal["zstd", "gzip"] = "zstd"
    shard_bytes: int = Field(
        100_000_000, ge=1, description="uncompressed JSONL bytes per output shard"
    )
    parts: int = Field(
        1,
        ge=1,
        description="analyse the source in this many parts at once (as tokenize splits it), "
        "then decide and write as one process would; needs a single file source without "
        "max_documents/max_bytes",
    )

    @model_serializer(mode="wrap")
    def _without_new_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """The fields, less `language` at its defaults: it came after runs existed, and a
        stage's fingerprint hashes its config, so curate stages without the step keep theirs."""
        data = handler(self)
        if "language" in data and self.language == type(self).model_fields["language"].default:
            del data["language"]
        return data

    @field_validator("steps")
    @classmethod
    def _each_once(cls, steps: list[Step]) -> list[Step]:
        repeated = sorted({s for s in steps if steps.count(s) > 1})
        if repeated:
            raise ValueError(f"{', '.join(repeated)} listed twice; list each step once")
        return steps

    @model_validator(mode="after")
    def _options_and_parts(self) -> Config:
        fields = type(self).model_fields
        unused = [s for s in STEPS if s not in self.steps and getattr(self, s) != fields[s].default]
        if unused:
            raise ValueError(
                f"options for {', '.join(unused)}, which `steps` leaves out; add it to steps or "
                f"remove the options"
            )
        if problem := fanout.parts_problem(self.parts, self.source):
            raise ValueError(problem)
        return self

    def check_inputs(self) -> None:
        super().check_inputs()
        if "decontaminate" in self.steps:
            for index, file in enumerate(self.decontaminate.files):
                try:
                    file.check()
                except PipelineError as exc:
                    raise PipelineError(f"decontaminate.files.{index}: {exc}") from None

    def recipe_signature(self, recipe: Recipe) -> dict[str, Any]:
        """The tasks other stages name, which decontamination removes (a changed one reruns)."""
        if not self.decontaminate.recipe_tasks:
            return {}
        return {"tasks": sorted(t.model_dump_json() for t in recipe_tasks(recipe))}

    def data_signature(self) -> dict[str, Any]:
        files = [Path(f.path) for f in self.decontaminate.files if Path(f.path).is_file()]
        stats = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
        return {**super().data_signature(), "decontaminate_files": stats}


def run(ctx: StageContext) -> None:
    """Analyse every part, decide, and write the curated documents to `ctx.export_dir`."""
    from data_prep import curate_report
    from data_prep.curate_decide import decide
    from data_prep.curate_write import write_documents

    cfg: Config = ctx.config  # type: ignore[assignment]
    work = ctx.stage_dir / WORK_DIR
    origins, items = _contamination(ctx, work)
    groups = phases(list(cfg.steps))
    folders = [work / f"phase{k}" for k in range(len(groups))]
    _analyze(ctx, 0, folders[0], items_path(work, cfg))
    if len(groups) > 1:
        before = decide(cfg, folders[:1], cfg.parts, origins, upto=len(groups[0]))
        earlier = work / EARLIER_FILE
        np.savez(earlier, boilerplate=before.boilerplate, removed=before.fate != 0)
        _analyze(ctx, 1, folders[1], items_path(work, cfg), earlier)
    decisions = decide(cfg, folders, cfg.parts, origins)
    staging = work / "export"
    shutil.rmtree(staging, ignore_errors=True)
    meta = write_documents(
        cfg, cfg.source_names(), decisions, staging, lambda: faults.point(ctx.name, "data_write")
    )
    meta.decontaminated_against = items
    meta.write(staging)
    sections = curate_report.write(meta, staging, _locator(work, cfg))
    shutil.rmtree(ctx.export_dir, ignore_errors=True)
    os.replace(staging, ctx.export_dir)
    shutil.rmtree(work)
    stats = summary(meta)
    for step in meta.steps:
        removed = sum(c.documents for c in step.removed.values())
        ctx.log.info("%s: removed %d documents", step.step, removed)
        for example in step.examples[:2]:
            ctx.log.info("  %s", example)
    ctx.log.info("kept %d of %d documents", stats["kept_documents"], stats["read_documents"])
    with ctx.tracker(resume_step=-1) as tracker:  # one row, step 0: a rerun replaces it
        curate_report.track(tracker, stats, sections, ctx.export_dir)
    ctx.write_summary(stats, headline="kept_fraction")


def run_part(ctx: StageContext, index: int) -> None:
    """Analyse part `index` of the first pass (one task of the stage's Slurm job array)."""
    cfg: Config = ctx.config  # type: ignore[assignment]
    if not 0 <= index < cfg.parts:
        raise PipelineError(f"stage {ctx.name}: part {index} out of range 0..{cfg.parts - 1}")
    work = ctx.stage_dir / WORK_DIR
    _contamination(ctx, work)
    _analyze(ctx, 0, work / "phase0", items_path(work, cfg), only=index)


def _locator(work: Path, cfg: Config) -> Any:
    """Where a decontaminated text holds its item (for the report's examples), or None."""
    from data_prep.curate_steps import Contamination

    path = items_path(work, cfg)
    return Contamination.load(str(path)).where if path is not None else None


def items_path(work: Path, cfg: Config) -> Path | None:
    return work / CONTAMINATION_FILE if "decontaminate" in cfg.steps else None


def summary(meta: Any) -> dict[str, Any]:
    """Flat metrics for the manifest and W&B: read, kept and removed documents and bytes, per
    step and per source."""
    stats: dict[str, Any] = {
        "read_documents": sum(s.read.documents for s in meta.sources),
        "read_bytes": sum(s.read.bytes for s in meta.sources),
        "kept_documents": sum(s.kept.documents for s in meta.sources),
        "kept_bytes": sum(s.kept.bytes for s in meta.sources),
    }
    stats["kept_fraction"] = stats["kept_documents"] / max(stats["read_documents"], 1)
    for source in meta.sources:
        stats[f"kept_documents/{source.name}"] = source.kept.documents
        stats[f"kept_bytes/{source.name}"] = source.kept.bytes
    for step in meta.steps:
        stats[f"removed_documents/{step.step}"] = sum(c.documents for c in step.removed.values())
        stats[f"removed_bytes/{step.step}"] = sum(c.bytes for c in step.removed.values())
        for name, counts in step.removed.items():
            stats[f"removed_documents/{step.step}/{name}"] = counts.documents
            stats[f"removed_bytes/{step.step}/{name}"] = counts.bytes
        if step.lines_cut:
            stats["lines_cut"] = sum(c.documents for c in step.lines_cut.values())
            stats["lines_cut_bytes"] = sum(c.bytes for c in step.lines_cut.values())
    for size, count in meta.cluster_sizes.items():
        stats[f"near_clusters/size_{size}"] = count
    return stats


def _analyze(
    ctx: StageContext,
    phase: int,
    folder: Path,
    contamination: Path | None,
    earlier: Path | None = None,
    only: int | None = None,
) -> None:
    """Run the pass's parts not yet committed: in this process for one part (or `only`, one
    part of a fanned-out stage), else one process each."""
    cfg: Config = ctx.config  # type: ignore[assignment]
    key = {"fingerprint": ctx.fingerprint, "phase": phase, "parts": cfg.parts}
    plan = fanout.plan_parts(cfg.source[0], cfg.parts) if cfg.parts > 1 else [None]
    firsts = _first_documents(folder, cfg.parts) if earlier is not None else [0] * cfg.parts
    jobs = [
        PartJob(cfg, phase, k, folder, {**key, "part": k}, plan[k], contamination, earlier, first)
        for k, first in enumerate(firsts)
    ]
    todo = [job for job in jobs if not part_done(job) and (only is None or job.part == only)]
    if not todo:
        return
    ctx.log.info("pass %d: analysing parts %s of %d", phase, [j.part for j in todo], cfg.parts)
    if cfg.parts == 1 or only is not None:  # one part: in this process
        analyze_part(todo[0])
    else:
        fanout.run_processes(analyze_part, [(job,) for job in todo])
    faults.point(ctx.name, "data_write")  # the pass's parts committed, nothing decided yet


def _first_documents(folder: Path, parts: int) -> list[int]:
    """The global index of each part's first document, from the first pass's parts."""
    from data_prep.curate_passes import read_part

    counts = [read_part(folder.parent / "phase0" / f"part_{k:05d}")[0] for k in range(parts)]
    return np.concatenate([[0], np.cumsum([c["num_documents"] for c in counts])[:-1]]).tolist()


def _contamination(ctx: StageContext, work: Path) -> tuple[list[str], dict[str, int]]:
    """Build (or reuse) the decontamination index; its origins and items per origin."""
    cfg: Config = ctx.config  # type: ignore[assignment]
    if "decontaminate" not in cfg.steps:
        return [], {}
    from data_prep.curate_steps import Contamination

    path = work / CONTAMINATION_FILE
    tasks = recipe_tasks(ctx.recipe) if cfg.decontaminate.recipe_tasks else []
    tasks = _unique([*tasks, *cfg.decontaminate.tasks])
    index, items = Contamination.build(cfg.decontaminate, tasks)
    if not index.tables:
        ctx.log.warning("decontaminate: no task or file gives an item to search for")
    work.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{os.getpid()}.{path.name}")
    index.save(str(temporary))
    os.replace(temporary, path)
    for origin, count in items.items():
        ctx.log.info("decontaminate: %d items of %s", count, origin)
    return index.origins, items


def recipe_tasks(recipe: Recipe) -> list[TaskBase]:
    """Every task a stage of the recipe names: `task:` fields, eval tasks, builtin:task sources."""
    found: list[TaskBase] = []
    for cfg in recipe.stages.values():
        found += _tasks_in(cfg)
    return _unique(found)


def _tasks_in(value: Any) -> list[TaskBase]:
    if isinstance(value, TaskBase):
        return [value]
    if isinstance(value, SourceConfig):
        return [value.task_config()] if value.uri in (TASK, ARITHMETIC) else []
    if isinstance(value, BaseModel):
        return [t for name in type(value).model_fields for t in _tasks_in(getattr(value, name))]
    if isinstance(value, list | tuple):
        return [t for item in value for t in _tasks_in(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tasks_in(item)]
    return []


def _unique(tasks: list[TaskBase]) -> list[TaskBase]:
    seen: dict[str, TaskBase] = {}
    for task in tasks:
        seen.setdefault(task.model_dump_json(), task)
    return list(seen.values())


SPEC = StageSpec(Config, run, "documents", run_part=run_part)
