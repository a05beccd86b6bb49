"""Security: no unsafe deserialisation, no implicit remote code, secrets never written, sbatch
values cannot inject shell, and literal special-token strings are text for every tokenizer."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pipeline.cli import main
from pipeline.engine.config import load_recipe, stage_kinds
from pipeline.engine.config_docs import describe_config
from pipeline.engine.runner import run_recipe
from tests.helpers import ROOT, tiny_recipe, write_recipe

SOURCE_DIRS = ("pipeline", "data_prep", "eval", "bench")
FAKE_SECRETS = {
    "WANDB_API_KEY": "wandbfake" + "0123456789" * 3,
    "HF_TOKEN": "hf_fakeTOKEN9876543210xyz",
}


def calls() -> list[tuple[str, ast.Call]]:
    """(file:line, call) of every call in the project's source."""
    found = []
    for root in SOURCE_DIRS:
        for path in sorted((ROOT / root).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Call):
                    found.append((f"{path.relative_to(ROOT)}:{node.lineno}", node))
    return found


def dotted(func: ast.expr) -> str:
    """`a.b.c` of a called name, '' for anything else."""
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return f"{dotted(func.value)}.{func.attr}"
    return ""


def keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


# Loads of files this process wrote itself a moment before, never a file a user handed in:
# (file, text in the call) -> why weights_only=True cannot be used there.
OWN_FILES = {
    ("pipeline/train/checkpoint.py", "optimizer_state.pt"): "ds_to_universal's output of the "
    "run's own checkpoint, converted in the same call; DeepSpeed pickles its own objects in it",
}


def test_no_unsafe_deserialisation_in_source() -> None:
    """torch.load only with weights_only=True; no pickle loads, no np.load(allow_pickle=True)."""
    bad = []
    for where, call in calls():
        name = dotted(call.func)
        own = any(
            where.startswith(f"{file}:") and text in ast.unparse(call) for file, text in OWN_FILES
        )
        if name == "torch.load" and not is_true(keyword(call, "weights_only")) and not own:
            bad.append(f"{where}: torch.load without weights_only=True")
        if name in {"pickle.load", "pickle.loads", "joblib.load", "dill.load", "cloudpickle.load"}:
            bad.append(f"{where}: {name} runs code from the file")
        if name in {"np.load", "numpy.load"} and is_true(keyword(call, "allow_pickle")):
            bad.append(f"{where}: np.load(allow_pickle=True)")
    assert not bad, "\n".join(bad)


def test_the_scan_finds_what_it_looks_for() -> None:
    tree = ast.parse("torch.load(p)\ntorch.load(p, weights_only=True)\npickle.loads(b)\n")
    found = [dotted(c.func) for c in ast.walk(tree) if isinstance(c, ast.Call)]
    assert found.count("torch.load") == 2 and "pickle.loads" in found
    loads = [c for c in ast.walk(tree) if isinstance(c, ast.Call)]
    assert [is_true(keyword(c, "weights_only")) for c in loads] == [False, True, False]


def test_trust_remote_code_is_never_implicit() -> None:
    """No call passes trust_remote_code=True; any other value must be a config field defaulting
    to False."""
    bad = []
    for where, call in calls():
        value = keyword(call, "trust_remote_code")
        if value is None or (isinstance(value, ast.Constant) and value.value is False):
            continue
        if not (isinstance(value, ast.Attribute) and value.attr == "trust_remote_code"):
            bad.append(f"{where}: trust_remote_code={ast.unparse(value)}")
    assert not bad, "\n".join(bad)
    for kind, config in stage_kinds().items():
        for doc in describe_config(config):
            if doc.name.split(".")[-1] == "trust_remote_code":
                assert doc.default == "false", f"{kind}.{doc.name} defaults to {doc.default}"


def all_text(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_secrets_never_reach_the_run_dir_or_sbatch_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A stage run with fake keys in the environment (W&B offline), and the sbatch files."""
    for name, value in FAKE_SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    data = tiny_recipe(run_dir, tracking="offline")
    data["stages"] = {k: data["stages"][k] for k in ("tokenizer", "tokenize", "pretrain")}
    data["stages"]["pretrain"]["max_steps"] = 4
    path = write_recipe(tmp_path / "tiny.yaml", data)
    assert main(["submit", "--dry-run", str(path)]) == 0  # sbatch files for every stage
    run_recipe(load_recipe(path))
    files = all_text(run_dir)
    assert any(p.suffix == ".sbatch" for p in files), "no sbatch file rendered"
    assert any("wandb" in p.parts for p in files), "no W&B offline files written"
    assert any(p.name == "stage.json" for p in files) and (run_dir / "recipe.yaml") in files
    for name, value in FAKE_SECRETS.items():
        leaked = [
            str(p.relative_to(run_dir)) for p, body in files.items() if value.encode() in body
        ]
        assert not leaked, f"{name} written to {leaked}"
    out = capsys.readouterr()
    assert not any(v in out.out + out.err for v in FAKE_SECRETS.values())


INJECTIONS = {
    "slurm.partition": "gpu;touch pwned",
    "slurm.account": "$(touch pwned)",
    "slurm.qos": "`touch pwned`",
    "slurm.mem": "1G\ntouch pwned",
    "slurm.time": "04:00:00;touch pwned",
    "slurm.extra": ["--constraint=a\ntouch pwned"],
    "name": "x;touch pwned",
    "run_dir": "/tmp/x\ntouch pwned",
}


@pytest.mark.parametrize("key", list(INJECTIONS))
def test_shell_in_sbatch_values_is_rejected(
    key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tiny_recipe(tmp_path / "run")
    node: Any = data
    *parents, last = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = INJECTIONS[key]
    path = write_recipe(tmp_path / "r.yaml", data)
    assert main(["submit", "--dry-run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0], err
    assert not (tmp_path / "run").exists() and not list(tmp_path.rglob("pwned"))


def test_shell_characters_in_paths_and_options_stay_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run_dir and an sbatch option full of shell syntax render to a script that bash parses,
    whose assignments hold the exact path, and that runs none of it."""
    run_dir = tmp_path / "r;id>pwned1;$(id>pwned2)`id>pwned3`&|<>*?'"
    data = tiny_recipe(tmp_path / "placeholder")
    data["run_dir"] = str(run_dir).replace("'", "")  # quotes cannot reach sbatch's own parser
    data["slurm"] = {"extra": ["--comment=$(id>pwned4);`id>pwned5`"]}
    run_dir = Path(data["run_dir"])
    path = write_recipe(tmp_path / "r.yaml", data)
    assert main(["submit", "--dry-run", "--only", "tokenizer", str(path)]) == 0, capsys.readouterr()
    script = next(run_dir.rglob("*.sbatch")).read_text()
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    header, body = script.split("\nset -u\n", 1)
    assert all(line.startswith("#") for line in header.splitlines()), header
    assignments = "\n".join(
        line for line in body.splitlines() if line.startswith(("RUN_DIR=", "STAGE="))
    )
    probe = f'{header}\nset -u\n{assignments}\nprintf "%s\\n" "$RUN_DIR" "$STAGE"\n'
    proc = subprocess.run(["bash"], input=probe, text=True, capture_output=True, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.splitlines() == [str(run_dir), "tokenizer"]
    assert not list(tmp_path.rglob("pwned*")), "the script ran a value as a command"


SPECIAL_TEXTS = [
    "<s>",
    "</s>",
    "<pad>",
    "<unk>",
    "changelog: pad with <pad> until </s>; start <s> <unk>",
    "x<pad>y</s>z",
]


@pytest.fixture(scope="module")
def tokenizer_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from data_prep.sources import SourceConfig, iter_documents
    from data_prep.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    source = SourceConfig(uri="builtin:python-stdlib", max_bytes=100_000)
    train_tokenizer(iter_documents(source), out, vocab_size=500)
    return out


@pytest.mark.parametrize("text", SPECIAL_TEXTS)
def test_literal_special_tokens_are_text_for_every_consumer(
    tokenizer_export: Path, text: str
) -> None:
    """SentencePiece, transformers and tokenizer.json alone give the same ids and round-trip."""
    import sentencepiece as spm
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_export / "tokenizer.model"))
    hf = AutoTokenizer.from_pretrained(str(tokenizer_export))
    backend = Tokenizer.from_file(str(tokenizer_export / "tokenizer.json"))
    ids = sp.encode(text)
    assert not {0, 1, 2, 3} & set(ids)
    assert hf.encode(text) == ids
    assert backend.encode(text).ids == ids
    assert sp.decode(ids) == hf.decode(ids) == backend.decode(ids) == text
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2, 3)
    assert [backend.id_to_token(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
