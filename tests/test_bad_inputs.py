"""Bad inputs, one table: each is exit 2, one line on stderr naming the input, no traceback, and
nothing marked done; checks that can be made before running are made by `--dry-run` too.

Cases run `pipeline.cli.main` in this process; the few marked e2e run the real command.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import cli, run_in_process, tiny_recipe, write_recipe

Setup = Callable[[Path], list[str]]


@dataclass(frozen=True)
class Case:
    """One bad input: `setup` writes what it needs under a folder and returns the CLI args;
    the error line must contain `names` (the input it is about)."""

    id: str
    setup: Setup
    names: str


def lm_recipe(tmp: Path) -> dict[str, Any]:
    """Every LM stage kind, valid, on built-in data: two model sizes for compare and scaling,
    and a report after every stage whose results it shows."""
    data = tiny_recipe(tmp / "run")
    wide = {
        **data["stages"]["pretrain"],
        "model": {"hidden_size": 48, "num_layers": 2, "num_heads": 2},
    }
    data["stages"] |= {
        "pretrain_wide": wide,
        "sft": {"kind": "sft", "after": ["pretrain"], "max_steps": 2},
        "reward": {"kind": "reward", "after": ["sft"], "max_steps": 2},
        "rlhf": {"kind": "rlhf", "after": ["sft", "reward"], "max_steps": 2},
        "compare": {"kind": "compare", "after": ["pretrain", "pretrain_wide"]},
        "scaling": {"kind": "scaling", "after": ["pretrain", "pretrain_wide"]},
        "report": {"kind": "report", "after": ["eval", "compare", "scaling"]},
    }
    return data


def image_recipe(tmp: Path) -> dict[str, Any]:
    """Every image stage kind and a baseline, valid, on the bundled digits."""
    return {
        "name": "images",
        "run_dir": str(tmp / "run"),
        "tracking": {"mode": "disabled"},
        "stages": {
            "images": {"kind": "images", "source": "builtin:digits", "image_size": 8},
            "vae": {"kind": "vae", "after": ["images"], "max_steps": 100},
            "diffusion": {"kind": "diffusion", "after": ["images"], "max_steps": 100},
            "image_eval": {"kind": "image_eval", "after": ["diffusion", "images"]},
            "baseline": {
                "kind": "baseline",
                "task": "classification",
                "dataset": "builtin:digits",
                "models": {"tree": {"estimator": "sklearn.tree.DecisionTreeClassifier"}},
            },
        },
    }


def put(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c` in nested mappings (creating them)."""
    *parents, last = dotted.split(".")
    for key in parents:
        data = data.setdefault(key, {})
    data[last] = value


def recipe(
    names: str,
    changes: dict[str, Any],
    base: Callable[[Path], dict[str, Any]] = lm_recipe,
    command: tuple[str, ...] = ("run", "--dry-run"),
    files: Callable[[Path], dict[str, Any]] | None = None,
) -> Callable[[str], Case]:
    """A case from a valid recipe with `changes` (dotted key -> value; `files` adds values that
    depend on the folder, after writing their files)."""

    def setup(tmp: Path) -> list[str]:
        data = base(tmp)
        for key, value in {**changes, **(files(tmp) if files else {})}.items():
            put(data, key, value)
        return [*command, str(write_recipe(tmp / "recipe.yaml", data))]

    return lambda id: Case(id, setup, names)


def args(names: str, make: Setup) -> Callable[[str], Case]:
    return lambda id: Case(id, make, names)


def file(tmp: Path, name: str, content: bytes) -> Path:
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def raw_recipe(text: bytes) -> Setup:
    return lambda tmp: ["run", "--dry-run", str(file(tmp, "recipe.yaml", text))]


def with_override(*overrides: str) -> Setup:
    def setup(tmp: Path) -> list[str]:
        path = write_recipe(tmp / "recipe.yaml", lm_recipe(tmp))
        return ["run", "--dry-run", str(path), *(a for o in overrides for a in ("-o", o))]

    return setup


def text_source(name: str, content: bytes | None, **options: Any) -> Callable[[Path], Any]:
    """The tokenizer's source: a file `name` (written when `content` is not None)."""

    def values(tmp: Path) -> dict[str, Any]:
        path = file(tmp, name, content) if content is not None else tmp / name
        return {"stages.tokenizer.source": {"uri": str(path), **options}}

    return values


def parquet(tmp: Path, name: str, column: str) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp / name
    pq.write_table(pa.table({column: ["some text", "more text"]}), path)
    return path


def image_folder(tmp: Path, images: dict[str, bytes]) -> dict[str, Any]:
    root = tmp / "pictures"
    root.mkdir()
    for name, content in images.items():
        file(root, name, content)
    return {"stages.images.source": str(root)}


def deepspeed(content: str | None) -> Callable[[Path], dict[str, Any]]:
    """pretrain under DeepSpeed with an expert config file (none when `content` is None)."""

    def values(tmp: Path) -> dict[str, Any]:
        path = tmp / "ds.json"
        if content is not None:
            path.write_text(content)
        return {"launch.engine": "deepspeed", "launch.deepspeed_config": str(path)}

    return values


def unwritable_dir(tmp: Path) -> Path:
    """A folder this process cannot create anything in (sysfs when running as root)."""
    if os.geteuid() == 0:
        return Path("/sys/pipeline-bad-input")
    locked = tmp / "locked"
    locked.mkdir(mode=0o500)
    return locked / "run"


def under_a_file(tmp: Path) -> dict[str, Any]:
    return {"run_dir": str(file(tmp, "plain", b"x") / "run")}


IMG, LM = image_recipe, lm_recipe
# The tables stay one case per line: `ruff format` would spread them over twice the lines.
# fmt: off
CLI_CASES = {
    "cli-unknown-command": args("runx", lambda tmp: ["runx"]),
    "cli-unknown-flag": args("--bogus", lambda tmp: ["run", "--bogus", "demo"]),
    "cli-missing-recipe": args("nope.yaml", lambda tmp: ["run", str(tmp / "nope.yaml")]),
    "cli-directory-recipe": args("no such recipe", lambda tmp: ["run", str(tmp)]),
    "cli-yaml-syntax": args("malformed YAML", raw_recipe(b"name: x\nstages: {a: [1, 2}\n")),
    "cli-yaml-list": args("YAML mapping", raw_recipe(b"- name: x\n")),
    "cli-yaml-not-utf8": args("not UTF-8", raw_recipe(b"name: \xff\xfe\n")),
    "cli-no-stages": args("stages", raw_recipe(b"name: x\n")),
    "cli-from-unknown": args("--from pretrian", lambda tmp: [*with_override()(tmp), "--from", "pretrian"]),
    "cli-only-unknown": args("--only nope", lambda tmp: [*with_override()(tmp), "--only", "nope"]),
    "cli-show-unknown": args("nosuchkind", lambda tmp: ["show", "nosuchkind"]),
    "cli-status-not-run-dir": args("not a run directory", lambda tmp: ["status", str(tmp)]),
}
RECIPE_CASES = {
    "recipe-bad-name": recipe("name", {"name": "has space"}),
    "recipe-unknown-top-key": recipe("trackin", {"trackin": {}}),
    "recipe-unknown-kind": recipe("pretrian", {"stages.pretrain.kind": "pretrian"}),
    "recipe-after-unknown": recipe("tokeniser", {"stages.tokenize.after": ["tokeniser"]}),
    "recipe-cycle": recipe("cycle", {"stages.tokenizer.after": ["eval"]}),
    "tokenizer-key": recipe("vocab_sise", {"stages.tokenizer.vocab_sise": 400}),
    "tokenizer-type": recipe("vocab_size", {"stages.tokenizer.vocab_size": "big"}),
    "tokenizer-value": recipe("vocab_size", {"stages.tokenizer.vocab_size": 10}),
    "tokenize-key": recipe("val_fractoin", {"stages.tokenize.val_fractoin": 0.1}),
    "tokenize-type": recipe("num_workers", {"stages.tokenize.num_workers": "two"}),
    "tokenize-value": recipe("shard_tokens", {"stages.tokenize.shard_tokens": 0}),
    "pretrain-key": recipe("max_step", {"stages.pretrain.max_step": 3}),
    "pretrain-type": recipe("seq_len", {"stages.pretrain.seq_len": [32]}),
    "pretrain-value": recipe("optim.lr", {"stages.pretrain.optim.lr": -1}),
    "sft-key": recipe("num_exemples", {"stages.sft.num_exemples": 3}),
    "sft-type": recipe("max_steps", {"stages.sft.max_steps": "many"}),
    "sft-value": recipe("micro_batch_size", {"stages.sft.micro_batch_size": 0}),
    "reward-key": recipe("eval_pair", {"stages.reward.eval_pair": 3}),
    "reward-type": recipe("max_length", {"stages.reward.max_length": "long"}),
    "reward-value": recipe("num_examples", {"stages.reward.num_examples": 0}),
    "curate-value": recipe("num_hashes", {"stages.cur": {"kind": "curate", "source": "builtin:python-stdlib", "near": {"bands": 14, "rows": 9}}}),
    "preferences-key": recipe("num_prompt", {"stages.prefs": {"kind": "preferences", "after": ["sft"], "num_prompt": 5}}),
    "rlhf-key": recipe("rewardz", {"stages.rlhf.rewardz": ["exact"]}),
    "rlhf-type": recipe("temperature", {"stages.rlhf.temperature": "hot"}),
    "rlhf-value": recipe("algorithm", {"stages.rlhf.algorithm": "ppo"}),
    "rlhf-resume-inexact": recipe(
        "not a multiple of num_iterations",
        {"stages.rlhf.num_iterations": 2, "stages.rlhf.checkpoint_every": 3},
    ),
    "eval-key": recipe("max_token", {"stages.eval.max_token": 5}),
    "eval-type": recipe("batch_size", {"stages.eval.batch_size": [1]}),
    "eval-value": recipe("batch_size", {"stages.eval.batch_size": 0}),
    "report-key": recipe("titel", {"stages.report.titel": "x"}),
    "report-type": recipe("title", {"stages.report.title": ["x"]}),
    "report-value": recipe("report.after", {"stages.report.after": ["report"]}),
    "compare-key": recipe("column", {"stages.compare.column": []}),
    "compare-type": recipe("columns", {"stages.compare.columns": 3}),
    "scaling-key": recipe("loss", {"stages.scaling.loss": "val_loss"}),
    "scaling-type": recipe("params_key", {"stages.scaling.params_key": {"a": 1}}),
    "images-key": recipe("image_sise", {"stages.images.image_sise": 8}, IMG),
    "images-type": recipe("val_fraction", {"stages.images.val_fraction": "some"}, IMG),
    "images-value": recipe("channels", {"stages.images.channels": 2}, IMG),
    "images-builtin": recipe("builtin:digitz", {"stages.images.source": "builtin:digitz"}, IMG),
    "vae-key": recipe("kl_wieght", {"stages.vae.kl_wieght": 1}, IMG),
    "vae-type": recipe("max_steps", {"stages.vae.max_steps": "x"}, IMG),
    "vae-value": recipe("micro_batch_size", {"stages.vae.micro_batch_size": -4}, IMG),
    "diffusion-key": recipe("ema", {"stages.diffusion.ema": 0.9}, IMG),
    "diffusion-type": recipe("max_steps", {"stages.diffusion.max_steps": [1]}, IMG),
    "diffusion-value": recipe("space", {"stages.diffusion.space": "pixels"}, IMG),
    "diffusion-text-arch": recipe("text_encode", {"stages.diffusion.model.arch": "pixart"}, IMG),
    "text_encode-key": recipe("max_lenght", {"stages.te": {"kind": "text_encode", "after": ["images"], "encoder": "builtin:bag-of-words", "max_lenght": 8}}, IMG),
    "text_encode-builtin": recipe("builtin:bag-of-word", {"stages.te": {"kind": "text_encode", "after": ["images"], "encoder": "builtin:bag-of-word"}}, IMG),
    "text_encode-no-captions": recipe("builtin:digits", {"stages.te": {"kind": "text_encode", "after": ["images"], "encoder": "builtin:bag-of-words"}}, IMG),
    "image_eval-key": recipe("sampler", {"stages.image_eval.sampler": "euler"}, IMG),
    "image_eval-type": recipe("samples_per_class", {"stages.image_eval.samples_per_class": "x"}, IMG),
    "image_eval-value": recipe("guidance_scale", {"stages.image_eval.guidance_scale": -1}, IMG),
    "baseline-key": recipe("test_fractoin", {"stages.baseline.test_fractoin": 0.2}, IMG),
    "baseline-type": recipe("models", {"stages.baseline.models": ["tree"]}, IMG),
    "baseline-value": recipe("task", {"stages.baseline.task": "telepathy"}, IMG),
    "launch-nproc-zero": recipe("nproc", {"launch.nproc": 0}),
    "launch-zero-stage": recipe("zero_stage", {"launch.engine": "deepspeed", "launch.zero_stage": 4}),
    "launch-ds-without-deepspeed": recipe("deepspeed_config", {"launch.deepspeed_config": "x.json"}),
}
OVERRIDE_CASES = {
    "override-no-equals": args("stages.pretrain.max_steps", with_override("stages.pretrain.max_steps")),
    "override-empty-key": args("=3", with_override("=3")),
    "override-unknown-path": args("max_stepz", with_override("stages.pretrain.max_stepz=3")),
    "override-bad-type": args("max_steps", with_override("stages.pretrain.max_steps=abc")),
    "override-under-scalar": args("not a mapping", with_override("stages.pretrain.max_steps.x=1")),
    "override-unknown-stage": args("stages.pretrian", with_override("stages.pretrian.max_steps=3")),
}
# Checks made before running: the same line from `run --dry-run` and from `run`.
PRERUN_CASES = {
    "data-missing-txt": recipe("corpus.txt", {}, files=text_source("corpus.txt", None)),
    "data-missing-jsonl": recipe("corpus.jsonl", {}, files=text_source("corpus.jsonl", None)),
    "data-missing-parquet": recipe("c.parquet", {}, files=text_source("c.parquet", None)),
    "data-missing-zst": recipe("c.jsonl.zst", {}, files=text_source("c.jsonl.zst", None)),
    "data-missing-gz": recipe("c.txt.gz", {}, files=text_source("c.txt.gz", None)),
    "data-glob-no-match": recipe("*.jsonl", {}, files=text_source("none/*.jsonl", None)),
    "data-unknown-format": recipe("c.csv", {}, files=text_source("c.csv", b"a,b\n")),
    "data-empty-txt": recipe("empty.txt", {}, files=text_source("empty.txt", b"")),
    "data-empty-jsonl": recipe("empty.jsonl", {}, files=text_source("empty.jsonl", b"")),
    "data-empty-gz": recipe("e.txt.gz", {}, files=text_source("e.txt.gz", gzip.compress(b""))),
    "data-malformed-jsonl": recipe("bad.jsonl", {}, files=text_source("bad.jsonl", b'{"text": "a"\n')),
    "data-jsonl-not-object": recipe("list.jsonl", {}, files=text_source("list.jsonl", b"[1, 2]\n")),
    "data-jsonl-no-field": recipe("body", {}, files=text_source("f.jsonl", b'{"body": "x"}\n')),
    "data-not-utf8": recipe("latin.txt", {}, files=text_source("latin.txt", b"caf\xe9 \xff\n")),
    "data-bad-gz": recipe("broken.txt.gz", {}, files=text_source("broken.txt.gz", b"not gzip")),
    "data-parquet-no-field": recipe("no.parquet", {}, files=lambda tmp: {"stages.tokenizer.source": str(parquet(tmp, "no.parquet", "body"))}),
    "data-dir-not-dataset": recipe("folder", {}, files=lambda tmp: {"stages.tokenizer.source": str(file(tmp, "folder/a.txt", b"x").parent)}),
    "data-hf-dir-broken": recipe("hf", {}, files=lambda tmp: {"stages.tokenizer.source": str(file(tmp, "hf/dataset_info.json", b"{").parent)}),
    "images-missing-folder": recipe("nowhere", {"stages.images.source": "/nowhere/pics"}, IMG),
    "images-no-images": recipe("pictures", {}, IMG, files=lambda tmp: image_folder(tmp, {"cat/a.txt": b"x"})),
    "images-broken-image": recipe("a.png", {}, IMG, files=lambda tmp: image_folder(tmp, {"cat/a.png": b"not a png"})),
    "ds-missing-file": recipe("ds.json", {}, files=deepspeed(None)),
    "ds-not-json": recipe("ds.json", {}, files=deepspeed("{zero: 2")),
    "ds-not-object": recipe("ds.json", {}, files=deepspeed("[1]")),
    "ds-zero-stage": recipe("zero_optimization.stage", {}, files=deepspeed('{"zero_optimization": {"stage": 4}}')),
    "run-dir-under-file": recipe("plain", {}, files=under_a_file),
    "run-dir-not-writable": recipe("run_dir", {}, files=lambda tmp: {"run_dir": str(unwritable_dir(tmp))}),
    "ref-eval-model-kind": recipe("'tokenize' is a tokenize stage", {"stages.eval.models": ["tokenize"]}),
    "ref-eval-model-unknown": recipe("pretrian", {"stages.eval.models": ["pretrian"]}),
    "ref-eval-model-downstream": recipe("'rlhf' is not upstream", {"stages.eval.models": ["rlhf"]}),
    "ref-anneal-kind": recipe("'tokenize' is a tokenize stage", {"stages.pretrain.anneal_from": {"stage": "tokenize", "step": 2}, "stages.pretrain.schedule.kind": "wsd"}),
    "ref-reward-model-kind": recipe("'sft' is a sft stage", {"stages.rlhf.reward_model": "sft"}),
}
SLURM_CASES = {
    "slurm-time": recipe("slurm.time", {"slurm.time": "4 hours"}),
    "slurm-time-letters": recipe("slurm.time", {"stages.pretrain.slurm.time": "4h"}),
    "slurm-nodes": recipe("nnodes", {"launch.nnodes": 0}),
    "slurm-gpus": recipe("gpus_per_node", {"slurm.gpus_per_node": -1}),
    "slurm-partition-space": recipe("slurm.partition", {"slurm.partition": "gpu big"}),
    "slurm-partition-shell": recipe("slurm.partition", {"slurm.partition": "gpu;touch x"}),
    "slurm-account-subst": recipe("slurm.account", {"slurm.account": "$(touch x)"}),
    "slurm-qos-backtick": recipe("slurm.qos", {"stages.pretrain.slurm.qos": "`id`"}),
    "slurm-mem": recipe("slurm.mem", {"slurm.mem": "lots"}),
    "slurm-extra-newline": recipe("slurm.extra", {"slurm.extra": ["--constraint=a\necho hi"]}),
    "slurm-extra-not-option": recipe("slurm.extra", {"slurm.extra": ["rm -rf /"]}),
    "slurm-run-dir-newline": recipe("run_dir", {"run_dir": "/tmp/x\ntouch y"}),
    "slurm-run-dir-blank": recipe("sbatch cannot", {}, command=("submit", "--dry-run"), files=lambda tmp: {"run_dir": str(tmp / "a b")}),
}
# fmt: on


def cases(table: dict[str, Callable[[str], Case]]) -> list[Any]:
    return [pytest.param(make(id), id=id) for id, make in table.items()]


def assert_one_line(code: int, err: str, case: Case, root: Path) -> None:
    """Exit 2, one `error:` line naming the input, no traceback, no stage marked done."""
    lines = err.strip().splitlines()
    assert code == 2, f"{case.id}: exit {code}, stderr:\n{err}"
    assert len(lines) == 1, f"{case.id}: {len(lines)} lines on stderr:\n{err}"
    assert lines[0].startswith("error: ") and "Traceback" not in err, err
    assert case.names in lines[0], f"{case.id}: {case.names!r} not in {lines[0]!r}"
    done = [p for p in root.rglob("stage.json") if json.loads(p.read_text())["status"] == "done"]
    assert not done, f"{case.id}: marked done: {done}"


@pytest.mark.parametrize(
    "case", cases(CLI_CASES | RECIPE_CASES | OVERRIDE_CASES | PRERUN_CASES | SLURM_CASES)
)
def test_bad_input_is_one_line(
    case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, err = run_in_process(case.setup(tmp_path), capsys)
    assert_one_line(code, err, case, tmp_path)


@pytest.mark.parametrize("case", cases(PRERUN_CASES))
def test_checks_before_running_hold_without_dry_run(
    case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`run` stops on the same line as `run --dry-run`, before any stage starts."""
    monkeypatch.chdir(tmp_path)
    assert_run_stops_before_any_stage(case, tmp_path, capsys)


def assert_run_stops_before_any_stage(case: Case, tmp_path: Path, capsys: Any) -> None:
    """The case without --dry-run: the same one line, and no stage started."""
    argv = [a for a in case.setup(tmp_path) if a != "--dry-run"]
    code, err = run_in_process(argv, capsys)
    assert_one_line(code, err, case, tmp_path)
    assert not list(tmp_path.rglob("stage.json")), "a stage started"


def test_table_covers_every_stage_kind_and_sixty_cases() -> None:
    from pipeline.engine.config import stage_kinds

    ids = [*CLI_CASES, *RECIPE_CASES, *OVERRIDE_CASES, *PRERUN_CASES, *SLURM_CASES]
    assert len(ids) >= 60
    assert set(stage_kinds()) <= {i.split("-")[0] for i in RECIPE_CASES}


def test_valid_bases_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The recipes every case breaks are valid as they are (so each case fails for its reason)."""
    for base in (lm_recipe, image_recipe):
        path = write_recipe(tmp_path / "ok.yaml", base(tmp_path))
        assert run_in_process(["run", "--dry-run", str(path)], capsys) == (0, "")


E2E = [
    "cli-unknown-flag",
    "cli-yaml-syntax",
    "ds-missing-file",
    "run-dir-under-file",
    "data-hf-dir-broken",
]


@pytest.mark.e2e
@pytest.mark.parametrize("id", E2E)
def test_real_process_exits_2_without_traceback(id: str, tmp_path: Path) -> None:
    table = CLI_CASES | PRERUN_CASES
    case = table[id](id)
    proc = cli(*case.setup(tmp_path), cwd=tmp_path)
    assert_one_line(proc.returncode, proc.stderr, case, tmp_path)
