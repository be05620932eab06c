"""Chat rows: conversations rendered with the tokenizer's chat template, trained on the assistant only.

A `{"messages": [{"role": ..., "content": ...}, ...]}` row is rendered with the chat
template (the tokenizer's own, or a Jinja file given by `--chat-template`). The loss
covers each assistant turn: its content and the end-of-turn text the template writes
after it (ChatML's `<|im_end|>`, Llama-2's `</s>`), so the model learns to stop. System,
user and tool turns, and the template's headers, are masked (label -100).

Where the assistant turns lie is found by rendering the conversation incrementally and
comparing the texts, which works for any template::

    before  = render(messages[:k], add_generation_prompt=True)   # ... <|im_start|>assistant\\n
    after   = render(messages[:k + 1])                           # ... <|im_start|>assistant\\nHi<|im_end|>\\n
    trained = after[len(before):].rstrip()                       # Hi<|im_end|>

and then mapping those character spans onto the tokens of the whole rendered text with the
tokenizer's offsets. The template's generation markers and `return_assistant_tokens_mask`
are not used: templates without markers give an empty mask, and markers placed around
the content alone drop the end-of-turn token (trl#4147). A template that does not render
conversations incrementally (rendering the first k messages is not a prefix of rendering
them all) is refused with a message, never trained with a guessed mask.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ...errors import ArgumentTypeError
from .rows import IGNORE_INDEX, DataError

__all__ = [
    "ChatTemplateError",
    "assistant_spans",
    "check_chat_template",
    "read_chat_template",
    "tokenize_conversation",
]


class ChatTemplateError(DataError):
    """Chat rows cannot be rendered: no chat template, or one that fails or is not incremental."""


def read_chat_template(path: str | os.PathLike[str]) -> str:
    """The text of a `--chat-template` file (a Jinja template), checked to be non-empty.

    Raises:
        ChatTemplateError: the file is missing, unreadable, not UTF-8, or empty.
    """
    path = Path(path)
    try:
        template = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ChatTemplateError(f"{path}: no such --chat-template file; pass a Jinja chat template "
                                "(the `chat_template` of a tokenizer_config.json, saved as a file)") from None
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or error
        raise ChatTemplateError(f"{path}: --chat-template cannot be read ({reason})") from None
    if not template.strip():
        raise ChatTemplateError(f"{path}: --chat-template is empty; it must hold a Jinja chat template")
    return template


_PROBE = ({"role": "system", "content": "s"}, {"role": "user", "content": "u"},
          {"role": "assistant", "content": "a"})


def check_chat_template(tokenizer: Any, model_dir: str, template_file: str | None = None) -> None:
    """Fail early when chat rows cannot be rendered: the tokenizer has no template, or it does not render.

    Raises:
        ChatTemplateError: naming the fix (`--chat-template FILE`).
    """
    where = template_file or f"{model_dir}'s tokenizer chat template"
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(f"{model_dir}: the tokenizer has no chat template, so \"messages\" rows cannot be "
                                "rendered; pass --chat-template FILE (a Jinja template, e.g. ChatML's)")
    for probe in (_PROBE, _PROBE[1:]):  # some templates refuse a system turn, none should refuse both
        try:
            _render(tokenizer, list(probe), generation_prompt=False)
            return
        except Exception as error:  # noqa: BLE001 - Jinja and template code raise anything; each means "broken"
            failure = error
    raise ChatTemplateError(f"{where}: the chat template fails on a plain conversation "
                            f"({type(failure).__name__}: {failure}); fix it or pass another --chat-template FILE")


def _render(tokenizer: Any, messages: list[Mapping[str, Any]], *, generation_prompt: bool) -> str:
    if not messages and not generation_prompt:
        return ""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    if not isinstance(text, str):
        raise ArgumentTypeError(f"the chat template rendered {type(text).__name__}, not text")
    return text


def assistant_spans(messages: Sequence[Mapping[str, Any]], tokenizer: Any, where: str,
                    context_turns: int = 0) -> tuple[str, list[range]]:
    """The rendered conversation and the character ranges of each assistant turn (content + end of turn)
    after the first `context_turns` messages (a preference row's prompt: context, never trained).

    Raises:
        DataError: the template fails on the row, or does not render it incrementally.
    """
    messages = list(messages)
    try:
        full = _render(tokenizer, messages, generation_prompt=False)
        spans = []
        for k, message in enumerate(messages):
            if message["role"] != "assistant" or k < context_turns:
                continue
            before = _render(tokenizer, messages[:k], generation_prompt=True)
            after = _render(tokenizer, messages[:k + 1], generation_prompt=False)
            if not (full.startswith(after) and after.startswith(before)):
                raise ChatTemplateError(
                    f"{where}: the chat template does not render this conversation incrementally (the text of "
                    f"its first {k + 1} messages is not where the whole conversation starts), so the assistant "
                    "turns cannot be located; pass --chat-template FILE with a template that renders past "
                    "turns unchanged")
            end = len(after.rstrip())  # the template's separator after the end-of-turn token is not trained
            spans.append(range(len(before), max(end, len(before))))
    except DataError:
        raise
    except Exception as error:  # noqa: BLE001 - a template raises whatever its author chose
        raise DataError(f"{where}: the chat template cannot render this conversation ({type(error).__name__}: "
                        f"{error})") from None
    return full, spans


def _token_pieces(text: str, spans: list[range], tokenizer: Any) -> tuple[list[int], list[bool]]:
    """Token ids of `text` and, per token, whether it starts inside an assistant span."""
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        starts = [start for start, _ in encoded["offset_mapping"]]
        return list(encoded["input_ids"]), [any(start in span for span in spans) for start in starts]
    # A slow tokenizer has no offsets: tokenize the text piece by piece at the span boundaries.
    cuts = sorted({0, len(text), *(b for span in spans for b in (span.start, span.stop))})
    ids: list[int] = []
    trained: list[bool] = []
    for start, stop in itertools.pairwise(cuts):
        piece = tokenizer(text[start:stop], add_special_tokens=False)["input_ids"]
        ids += piece
        trained += [any(start in span for span in spans)] * len(piece)
    return ids, trained


def tokenize_conversation(messages: Sequence[Mapping[str, Any]], tokenizer: Any, where: str,
                          context_turns: int = 0) -> tuple[list[int], list[int]]:
    """Token ids and labels of one conversation: labels are the ids on assistant turns (after the first
    `context_turns` messages), -100 elsewhere.

    The template writes any beginning-of-sequence token itself, so none is added here.
    """
    text, spans = assistant_spans(messages, tokenizer, where, context_turns)
    ids, trained = _token_pieces(text, spans, tokenizer)
    return ids, [token if keep else IGNORE_INDEX for token, keep in zip(ids, trained, strict=True)]
