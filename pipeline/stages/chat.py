"""Loss on assistant turns only, with whatever chat template the model has.

TRL finds assistant tokens through `{% generation %}` markers in the template and refuses a plain
template it cannot patch (most user templates: ChatML, Llama 3...). Here the spans are found by
rendering: the text an assistant turn adds is what the template renders for the conversation up to
that turn minus what it renders up to the turn before (with the generation prompt), so the end of
turn the template writes is trained too (not the whitespace between turns after it) and the
template itself is used as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.engine.errors import PipelineError

# Plain-text roles (our SentencePiece vocabulary has no role tokens); the assistant turn sits
# between generation markers so TRL can train on assistant tokens only.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ 'Assistant: ' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{%- else -%}"
    "{{ message['role'] | capitalize + ': ' + message['content'] + '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant: ' }}{%- endif -%}"
)


def template_problems(path: str | None, field: str) -> list[str]:
    """Why a `chat_template` file is no template the tokenizer can use, found by compiling it as
    transformers does on the first conversation (a missing file is the model checks' to name)."""
    from jinja2 import TemplateError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    if path is None:
        return []
    try:
        template = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        return [f"{field}: {path}: cannot read it ({exc}); give a UTF-8 Jinja template file"]
    try:
        _compile_jinja_template(template)
    except TemplateError as exc:
        line = f" line {exc.lineno}" if getattr(exc, "lineno", None) else ""
        return [f"{field}: {path}{line}: not a Jinja template ({exc.message}); fix the template"]
    return []


def assistant_spans(tokenizer: Any, messages: list[dict[str, Any]]) -> tuple[str, list[range]]:
    """The rendered conversation and the character ranges of its assistant turns."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for index, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = tokenizer.apply_chat_template(
            messages[:index], tokenize=False, add_generation_prompt=True
        )
        upto = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise ValueError(
                "the template does not render a conversation as a prefix of a longer one"
            )
        # The turn ends with its end-of-turn token: the newline a template writes after it
        # separates turns and is not the assistant's to learn.
        spans.append(range(len(before), max(len(before), len(upto.rstrip()))))
    return full, spans


def assistant_masked_rows(
    tokenizer: Any, rows: list[dict[str, Any]], max_length: int, where: str
) -> list[dict[str, Any]]:
    """Chat rows as TRL's pre-tokenized rows: `input_ids` and `assistant_masks` (1 on the tokens
    of assistant turns, end of turn included), cut to `max_length` tokens."""
    if not getattr(tokenizer, "is_fast", False):
        raise PipelineError(
            f"{where}: loss on assistant turns needs a fast tokenizer (tokenizer.json) to map "
            f"turns to tokens; set completion_only_loss: false, or give a model with tokenizer.json"
        )
    out = []
    for number, row in enumerate(rows, 1):
        try:
            text, spans = assistant_spans(tokenizer, row["messages"])
        except Exception as exc:  # noqa: BLE001 - a template error names the row, in one line
            first = (str(exc).splitlines() or [""])[0]
            raise PipelineError(
                f"{where}: row {number}: the chat template cannot render it ({first}); fix the "
                f"row or give chat_template: FILE"
            ) from None
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoded["input_ids"][:max_length]
        mask = [  # a token that overlaps a turn is trained (one merged across its start too)
            int(any(start < span.stop and end > span.start for span in spans))
            for start, end in encoded["offset_mapping"][: len(ids)]
        ]
        out.append({"input_ids": ids, "assistant_masks": mask})
    if not any(1 in row["assistant_masks"] for row in out):
        raise PipelineError(
            f"{where}: no row has an assistant turn within max_length={max_length} tokens; add "
            f"assistant messages or raise max_length"
        )
    return out
