"""Does llama.cpp run our language-model exports as transformers does?

Each export is converted with llama.cpp's own converter (f32 weights) and loaded in llama.cpp
(llama-cpp-python, CPU). Then, with each runtime's defaults for adding special tokens:
- tokenization: 60 texts (code, runs of spaces, tabs, newlines, Unicode, digits, literal
  special-token names, stdlib source) encoded by llama.cpp and by transformers, id for id, and
  llama.cpp's decode of its ids against the text;
- greedy output: 20 prompts continued for up to 24 tokens by both, token for token, with the
  largest |logit difference| at the prompts' last position.

llama-cpp-python is built once from the sdist the Makefile fetched (`make llama-cpp`) into
.venv/llama.cpp/python, minutes on a few cores. Without EXPORT arguments, the tokenizer, tokenize
and pretrain stages of recipes/llm/llama.yaml are run into bench/out/llamacpp (a few minutes;
kept, and reused by the next run).

    make bench-llamacpp
    .venv/bin/python bench/llamacpp_agreement.py [EXPORT ...]   # e.g. runs/demo/{pretrain,sft}/export
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LLAMA_CPP = Path(sys.prefix) / "llama.cpp"  # the Makefile's converter and sdist
CONVERTER = LLAMA_CPP / "convert_hf_to_gguf.py"
BINDINGS = LLAMA_CPP / "python"  # llama-cpp-python, built here from the sdist
RECIPE = ROOT / "recipes" / "llm" / "llama.yaml"
RUN_DIR = ROOT / "bench" / "out" / "llamacpp"
MAX_NEW_TOKENS = 24
# A CPU build for this machine: the llama library alone, without the multimodal one (llava) or
# llama.cpp's tools, tests and examples.
CMAKE_ARGS = (
    "-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_TESTS=OFF"
    " -DLLAMA_BUILD_EXAMPLES=OFF"
)

TEXTS = [
    "",
    "a",
    " ",
    "  ",
    "    ",
    "\t",
    "\n",
    "\n\n\n",
    "\r\n",
    "hello world",
    " hello world",
    "hello  world   again",
    "def f(x):\n    return x + 1\n",
    "class Foo(Bar):\n\tdef __init__(self):\n\t\tpass\n",
    "if __name__ == '__main__':\n    main()",
    "    # indented comment with trailing spaces   \n",
    "x = [1, 2, 3]  # list\ny = {'a': 1}\n",
    "for i in range(10):\n        print(i ** 2)",
    "import os, sys\nfrom pathlib import Path\n",
    'print(f"{name!r:>10}")',
    "lambda *args, **kwargs: None",
    "0",
    "42",
    "3.14159",
    "1234567890",
    "2024-01-31T12:34:56Z",
    "0x7fff_ffff",
    "1e-9 + 2e+10",
    "café naïve résumé",
    "Grüße aus Köln",
    "日本語のテキスト",
    "中文文本测试",
    "Привет, мир",
    "مرحبا بالعالم",
    "emoji: 🙂🚀🎉",
    "math: ∑ ∫ √ ≤ ≥ π ² ½",
    "full-width digits: １２３",
    "zero\u200bwidth and nbsp\u00a0here",
    "<s>",
    "</s>",
    "<pad> and <unk> are text",
    "<0x41> is not a byte token here",
    "a\tb\tc\n1\t2\t3\n",
    "trailing newline\n",
    "   leading spaces",
    "mixed \t \n \t whitespace",
    "SHOUTING CASE AND snake_case AND camelCase",
    "path/to/file.py:123: error: something",
    "https://docs.python.org/3/library/os.html#os.path",
    "\x00control\x07chars\x1b[0m",
]

PROMPTS = [
    "def ",
    "import ",
    "class ",
    "    return ",
    "for i in range(",
    "if __name__ == ",
    "    def __init__(self",
    "from typing import ",
    "# ",
    '"""',
    "    raise ValueError(",
    "try:\n    ",
    "with open(",
    "self.",
    "    if not ",
    "print(",
    "while True:\n",
    "elif ",
    "except ",
    "lambda x: ",
]


def main() -> None:
    """Convert, load and compare each export (default: a fresh llama.yaml pretrain export)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("exports", nargs="*", type=Path, help="HF export directories")
    args = parser.parse_args()
    if not CONVERTER.is_file():
        sys.exit(f"llama.cpp's converter is not at {CONVERTER}: run `make llama-cpp` first")
    llama_cpp = bindings()
    exports = args.exports or [pretrain_export()]
    texts = TEXTS + stdlib_snippets(10)
    for export in exports:
        gguf = RUN_DIR / f"{export.parent.parent.name}-{export.parent.name}.gguf"
        convert(export, gguf)
        compare(llama_cpp, export, gguf, texts)


def bindings() -> Any:
    """llama_cpp, built from the Makefile's llama-cpp-python sdist on the first run."""
    if not (BINDINGS / "llama_cpp").is_dir():
        sdists = sorted(LLAMA_CPP.glob("llama_cpp_python-*.tar.gz"))
        if not sdists:
            sys.exit(f"no llama-cpp-python sdist in {LLAMA_CPP}: run `make llama-cpp` first")
        print(f"building {sdists[-1].name} into {BINDINGS} (minutes) ...", flush=True)
        start = time.time()
        env = {
            **os.environ,
            "CMAKE_ARGS": CMAKE_ARGS,
            "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1),
        }
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target"]
        subprocess.run([*pip, str(BINDINGS), str(sdists[-1])], check=True, env=env)
        subprocess.run([*pip, str(BINDINGS), "diskcache"], check=True)  # llama_cpp imports it
        print(f"built in {time.time() - start:.0f}s", flush=True)
    sys.path.insert(0, str(BINDINGS))
    import llama_cpp

    return llama_cpp


def pretrain_export() -> Path:
    """The pretrain export of recipes/llm/llama.yaml under bench/out, run unless it is there."""
    export = RUN_DIR / "run" / "pretrain" / "export"
    if not export.is_dir():
        overrides = ["-o", f"run_dir={RUN_DIR / 'run'}", "--only", "tokenizer,tokenize,pretrain"]
        command = [sys.executable, "-m", "pipeline.cli", "run", str(RECIPE), *overrides]
        subprocess.run(command, check=True, cwd=ROOT)
    return export


def stdlib_snippets(count: int) -> list[str]:
    """`count` pieces of about 400 characters of stdlib source, from as many modules."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    chosen = files[:: max(1, len(files) // count)][:count]
    return [path.read_text(encoding="utf-8", errors="replace")[1000:1400] for path in chosen]


def convert(export: Path, gguf: Path) -> None:
    """llama.cpp's converter, f32 weights (the comparison is of runtimes, not of quantisation)."""
    gguf.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(CONVERTER), str(export), "--outfile", str(gguf)]
    result = subprocess.run([*command, "--outtype", "f32"], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"converting {export} failed:\n{result.stderr[-2000:]}")


def compare(llama_cpp: Any, export: Path, gguf: Path, texts: list[str]) -> None:
    """Print how many texts both tokenize alike and how many prompts both continue alike."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    n_ctx = model.config.max_position_embeddings
    # logits_all: llama-cpp-python keeps every position's logits in `scores`, the prompt's last too.
    llm = llama_cpp.Llama(
        model_path=str(gguf), n_ctx=n_ctx, n_threads=os.cpu_count(), logits_all=True, verbose=False
    )
    print(f"\n{export} ({gguf.name}, context {n_ctx})")
    same_ids = decoded = 0
    for text in texts:
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        ours = tokenizer(text)["input_ids"]
        same_ids += theirs == ours
        decoded += llm.detokenize(theirs).decode("utf-8", errors="replace") == text
        if theirs != ours:
            print(f"  differs: {text[:40]!r}: llama.cpp {theirs[:12]} transformers {ours[:12]}")
    print(f"  tokenization: {same_ids}/{len(texts)} texts id for id; "
          f"llama.cpp decodes {decoded}/{len(texts)} back to the text")  # fmt: skip
    same_output = 0
    worst = 0.0
    for prompt in PROMPTS:  # each runtime tokenizes the prompt itself, as its users do
        ids = tokenizer(prompt)["input_ids"]
        prompt_ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)
        new_tokens = min(MAX_NEW_TOKENS, n_ctx - max(len(ids), len(prompt_ids)))
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
            hf = model.generate(
                torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            )[0, len(ids):].tolist()  # fmt: skip
        llm.reset()
        cpp = []
        for token in llm.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0):
            cpp.append(token)
            if token == llm.token_eos() or len(cpp) == new_tokens:
                break
        if prompt_ids == ids:
            last = torch.tensor(llm.scores[len(ids) - 1])
            worst = max(worst, float((last - logits).abs().max()))
        same_output += cpp == hf
        if cpp != hf:
            print(f"  differs: {prompt!r}: llama.cpp {cpp} transformers {hf}")
    print(f"  greedy: {same_output}/{len(PROMPTS)} prompts continued alike (up to "
          f"{MAX_NEW_TOKENS} tokens); max |logit diff| at the last prompt token {worst:.2e} "
          f"(prompts tokenized alike)")  # fmt: skip


if __name__ == "__main__":
    main()
