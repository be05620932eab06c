"""The row formats `kbitprep finetune` reads, one row of `FORMATS` each, and how each becomes a `Row`.

A row's format is recognised from its keys, first match wins, in this order::

    preference          {"prompt", "chosen", "rejected"}              -> a preference row (DPO, ORPO)
    messages            {"messages": [{"role", "content"}, ...]}      -> a messages row (chat template)
    sharegpt            {"conversations": [{"from", "value"}, ...]}   -> a messages row
    alpaca              {"instruction", "input"?, "output"}           -> a prompt/completion row
    text                {"text"}                                      -> a text row
    prompt-completion   {"prompt", "completion"}                      -> a prompt/completion row

Alpaca comes before text because Alpaca files often carry a "text" column holding the
whole rendered example; training on it would train the instruction too. An Alpaca row
becomes the prompt `instruction`, or `ALPACA_TEMPLATE` ("{instruction}\\n\\n{input}") when
it has a non-empty input, and the completion `output`, so only the output is trained.
ShareGPT turns are mapped to chat messages with `SHAREGPT_ROLES` (human/user -> user,
gpt/assistant/chatgpt/bard/model -> assistant, system -> system) and rendered with the
chat template like any messages row: the assistant turns are trained.

A preference row holds text (prompt, chosen and rejected strings) or, in the conversational
form TRL reads, chat messages: the prompt a list of turns, chosen and rejected each a list
holding the assistant's answer. Its chosen and rejected sides become two rows sharing the
prompt (`Row.rejected`); in the conversational form the prompt's turns are context only
(`Row.context_turns`), so only the answer is scored. It comes first: no other format has
"chosen" or "rejected", and a preference file often carries other columns.

`--data-format NAME` skips the recognition: every row must then have that format's keys.
A row that matches no format (or not the one asked for) is an error naming its keys and
the formats accepted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from .rows import DataError, Row, messages_row

__all__ = [
    "ALPACA_TEMPLATE",
    "DATA_FORMAT_CHOICES",
    "FORMATS",
    "SHAREGPT_ROLES",
    "DataFormat",
    "row_from_record",
]

# The prompt of an Alpaca row with an input; without one (absent or empty) the prompt is the instruction.
ALPACA_TEMPLATE = "{instruction}\n\n{input}"
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "model": "assistant", "system": "system"}


@dataclasses.dataclass(frozen=True)
class DataFormat:
    """One row format.

    Args:
        name (str): the `--data-format` value.
        keys (tuple[str, ...]): the keys that identify it, as the docs and messages name them.
        recognise (Callable[[Mapping], bool]): True for a row of this format.
        build (Callable[[Mapping, int, str], Row]): the `Row` of a recognised row (its record,
            its line or row number, and where it is, for messages).
    """

    name: str
    keys: tuple[str, ...]
    recognise: Callable[[Mapping[str, Any]], bool]
    build: Callable[[Mapping[str, Any], int, str], Row]


def _string(record: Mapping[str, Any], key: str, where: str, *, optional: bool = False) -> str:
    value = record.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        found = "missing" if key not in record or value is None else f"a {type(value).__name__}"
        raise DataError(f"{where}: \"{key}\" must be a string ({found})")
    return value


def _text_row(record: Mapping[str, Any], line: int, where: str) -> Row:
    text = record["text"]
    if not isinstance(text, str):
        raise DataError(f"{where}: \"text\" must be a string, not {type(text).__name__}")
    if not text:
        raise DataError(f"{where}: \"text\" is empty")
    return Row(line, "", text)


def _prompt_completion_row(record: Mapping[str, Any], line: int, where: str) -> Row:
    missing = [key for key in ("prompt", "completion") if key not in record]
    if missing:
        raise DataError(f"{where}: has \"{'prompt' if missing == ['completion'] else 'completion'}\" "
                        f"but no \"{missing[0]}\"; a row needs both, or a \"text\" field")
    for key in ("prompt", "completion"):
        if not isinstance(record[key], str):
            raise DataError(f"{where}: \"{key}\" must be a string, not {type(record[key]).__name__}")
    if not record["completion"]:
        raise DataError(f"{where}: \"completion\" is empty, so the row has nothing to train")
    return Row(line, record["prompt"], record["completion"])


def _alpaca_row(record: Mapping[str, Any], line: int, where: str) -> Row:
    instruction = _string(record, "instruction", where)
    extra = _string(record, "input", where, optional=True)
    output = _string(record, "output", where)
    if not output:
        raise DataError(f"{where}: \"output\" is empty, so the row has nothing to train")
    prompt = ALPACA_TEMPLATE.format(instruction=instruction, input=extra) if extra else instruction
    return Row(line, prompt, output)


def _sharegpt_row(record: Mapping[str, Any], line: int, where: str) -> Row:
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: \"conversations\" must be a non-empty list of {{\"from\": ..., \"value\": ...}} "
                        "objects")
    messages = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise DataError(f"{where}: conversations[{index}] must be an object with \"from\" and \"value\", "
                            f"not {type(turn).__name__}")
        speaker = _string(turn, "from", f"{where}: conversations[{index}]")
        role = SHAREGPT_ROLES.get(speaker.lower())
        if role is None:
            raise DataError(f"{where}: conversations[{index}] \"from\" is {speaker!r}, which is no ShareGPT role "
                            f"kbitprep knows; use one of {', '.join(SHAREGPT_ROLES)}")
        messages.append({"role": role, "content": _string(turn, "value", f"{where}: conversations[{index}]")})
    return messages_row(messages, line, where)


_PREFERENCE_KEYS = ("prompt", "chosen", "rejected")


def _turns(value: Any, key: str, where: str) -> tuple[dict[str, Any], ...]:
    """A preference row's list of chat turns, each a role and a content string."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: \"{key}\" must be a string or a non-empty list of {{\"role\": ..., "
                        f"\"content\": ...}} turns, not {type(value).__name__ if value != [] else 'an empty list'}")
    for index, turn in enumerate(value):
        if not isinstance(turn, Mapping):
            raise DataError(f"{where}: {key}[{index}] must be an object with \"role\" and \"content\", "
                            f"not {type(turn).__name__}")
        for field in ("role", "content"):
            _string(turn, field, f"{where}: {key}[{index}]")
    return tuple(dict(turn) for turn in value)


def _preference_row(record: Mapping[str, Any], line: int, where: str) -> Row:
    missing = [key for key in _PREFERENCE_KEYS if key not in record]
    if missing:
        keys = ", ".join(sorted(map(str, record)))
        raise DataError(f"{where}: a preference row needs the keys prompt, chosen and rejected, but has: {keys} "
                        f"(missing: {', '.join(missing)}); add them, or use another format's keys")
    values = {key: record[key] for key in _PREFERENCE_KEYS}
    if all(isinstance(value, str) for value in values.values()):
        for key in ("chosen", "rejected"):
            if not values[key]:
                raise DataError(f"{where}: \"{key}\" is empty, so the pair has nothing to compare")
        return Row(line, values["prompt"], values["chosen"],
                   rejected=Row(line, values["prompt"], values["rejected"]))
    if any(isinstance(value, str) for value in values.values()):
        kinds = ", ".join(f"{key}: {'text' if isinstance(value, str) else type(value).__name__}"
                          for key, value in values.items())
        raise DataError(f"{where}: prompt, chosen and rejected must be all text or all lists of chat turns "
                        f"({kinds})")
    prompt = _turns(values["prompt"], "prompt", where)
    sides = []
    for key in ("chosen", "rejected"):
        turns = _turns(values[key], key, where)
        if not any(turn["role"] == "assistant" and turn["content"] for turn in turns):
            raise DataError(f"{where}: \"{key}\" has no \"assistant\" turn with content, so the pair has "
                            "nothing to compare")
        sides.append(Row(line, messages=prompt + turns, context_turns=len(prompt)))
    return dataclasses.replace(sides[0], rejected=sides[1])


def _has(*keys: str) -> Callable[[Mapping[str, Any]], bool]:
    return lambda record: all(key in record for key in keys)


# First match wins; see the module docstring for why the order is this one.
FORMATS: tuple[DataFormat, ...] = (
    DataFormat("preference", _PREFERENCE_KEYS, lambda record: "chosen" in record or "rejected" in record,
               _preference_row),
    DataFormat("messages", ("messages",), _has("messages"),
               lambda record, line, where: messages_row(record["messages"], line, where)),
    DataFormat("sharegpt", ("conversations",), _has("conversations"), _sharegpt_row),
    DataFormat("alpaca", ("instruction", "output"), _has("instruction", "output"), _alpaca_row),
    DataFormat("text", ("text",), _has("text"), _text_row),
    DataFormat("prompt-completion", ("prompt", "completion"),
               lambda record: "prompt" in record or "completion" in record, _prompt_completion_row),
)
DATA_FORMAT_CHOICES = ("auto", *(f.name for f in FORMATS))
_BY_NAME = {f.name: f for f in FORMATS}


def _accepted() -> str:
    return "; ".join(f"{f.name} ({', '.join(f.keys)})" for f in FORMATS)


def row_from_record(record: Any, line: int, where: str, data_format: str = "auto") -> Row:
    """The `Row` of one record (a JSON object, a table row) in the format asked for, or recognised.

    Args:
        record (Any): the row as read; must be a mapping.
        line (int): its line (JSONL) or row number (other files), from 1.
        where (str): where it is, for messages ("data.jsonl:4").
        data_format (str): a `DATA_FORMAT_CHOICES` value; "auto" recognises it. Default: "auto"

    Raises:
        DataError: the record is not an object, matches no format (or not the one asked for),
            or has the format's keys with values that cannot be used.
    """
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected a JSON object such as {{\"text\": ...}}, got {type(record).__name__}")
    return _valid_text(_row_of_format(record, line, where, data_format), where)


def _texts(row: Row) -> list[tuple[str, str]]:
    """Each text of a row (a preference row's rejected side too), by the name a message gives it."""
    texts = [("prompt", row.prompt), ("completion", row.completion),
             *((f"messages[{index}] content", turn["content"]) for index, turn in enumerate(row.messages))]
    return texts + [(f"rejected side's {name}", text) for name, text in _texts(row.rejected)] if row.rejected \
        else texts


def _valid_text(row: Row, where: str) -> Row:
    """Refuse a row whose text cannot be encoded (a lone surrogate from a JSON `"\\ud800"` escape).

    Python's JSON reader accepts unpaired `\\uD800`-`\\uDFFF` escapes; the tokenizer then fails
    deep inside its Rust code with no row number, so the row is named here.
    """
    for name, text in _texts(row):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            code = ord(text[error.start])
            name = "text" if name == "completion" and row.kind == "text" else name
            raise DataError(f"{where}: invalid Unicode in the row's {name} (a lone surrogate \\u{code:04x} at "
                            f"character {error.start + 1}, which no text can hold); a \\uD800-\\uDFFF escape must "
                            "be one of a pair: fix or remove it") from None
    return row


def _row_of_format(record: Mapping[str, Any], line: int, where: str, data_format: str) -> Row:
    keys = ", ".join(sorted(map(str, record))) or "none"
    if data_format != "auto":
        chosen = _BY_NAME[data_format]
        if not chosen.recognise(record):
            guessed = next((f.name for f in FORMATS if f.recognise(record)), None)
            hint = f" (its keys are those of {guessed}: pass --data-format {guessed} or auto)" if guessed else ""
            raise DataError(f"{where}: --data-format {data_format} needs the keys {', '.join(chosen.keys)}, but the "
                            f"row has: {keys}{hint}")
        return chosen.build(record, line, where)
    for candidate in FORMATS:
        if candidate.recognise(record):
            return candidate.build(record, line, where)
    raise DataError(f"{where}: the row matches no data format (its keys: {keys}); kbitprep reads {_accepted()}")
