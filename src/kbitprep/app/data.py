"""Training data for `kbitprep finetune`: JSONL rows, tokenized for causal-LM training.

Each line of the file is one JSON object, in one of three forms:

    {"text": "..."}                            every token is trained
    {"prompt": "...", "completion": "..."}     only the completion is trained; the
                                               prompt's labels are -100 (ignored by the loss)
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}, ...]}
                                               rendered with the chat template; only the
                                               assistant turns are trained (see `chat`)

`text` and `prompt`/`completion` rows may share a file (both become bos + prompt +
completion + eos); `messages` rows may not be mixed with them, since the model would be
taught two formats. Blank lines are skipped. Any other line is an error that names the
file and the line, raised before anything is loaded or written.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

from ..errors import KbitPrepError

__all__ = [
    "IGNORE_INDEX",
    "CausalLMCollator",
    "DataError",
    "Row",
    "TokenizedData",
    "check_one_kind",
    "read_jsonl",
    "tokenize_rows",
]

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips


class DataError(KbitPrepError, ValueError):
    """The training data cannot be used; the message names the file and, where there is one, the line."""


@dataclasses.dataclass(frozen=True)
class Row:
    """One training example.

    Args:
        line (int): its 1-based line number in the file.
        prompt (str): text that conditions the model but is not trained ("" for a `text` row).
        completion (str): the text that is trained (the whole `text` of a `text` row).
        messages (tuple[dict, ...]): the turns of a `messages` row (each with a "role" and a
            "content" string); empty for the other kinds. Default: ()
    """

    line: int
    prompt: str = ""
    completion: str = ""
    messages: tuple[dict[str, Any], ...] = ()

    @property
    def kind(self) -> str:
        """"messages", "prompt" (prompt and completion) or "text"."""
        return "messages" if self.messages else "prompt" if self.prompt else "text"


def _messages_row(value: Any, line: int, where: str) -> Row:
    """A `messages` row: a list of turns, each a role and a content string, with an assistant turn to train."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: \"messages\" must be a non-empty list of {{\"role\": ..., \"content\": ...}} "
                        f"objects, not {type(value).__name__ if value != [] else 'an empty list'}")
    for index, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: messages[{index}] must be an object with \"role\" and \"content\", "
                            f"not {type(turn).__name__}")
        for key in ("role", "content"):
            if not isinstance(turn.get(key), str):
                found = "missing" if key not in turn else f"a {type(turn[key]).__name__}"
                raise DataError(f"{where}: messages[{index}] \"{key}\" must be a string ({found})")
    if not any(turn["role"] == "assistant" and turn["content"] for turn in value):
        roles = ", ".join(turn["role"] for turn in value)
        raise DataError(f"{where}: no \"assistant\" turn with content (roles: {roles}), so the row has "
                        "nothing to train")
    return Row(line, messages=tuple(value))


def _row_from_object(value: Any, line: int, where: str) -> Row:
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a JSON object such as {{\"text\": ...}}, got {type(value).__name__}")
    if "messages" in value:
        return _messages_row(value["messages"], line, where)
    if "text" in value:
        text = value["text"]
        if not isinstance(text, str):
            raise DataError(f"{where}: \"text\" must be a string, not {type(text).__name__}")
        if not text:
            raise DataError(f"{where}: \"text\" is empty")
        return Row(line, "", text)
    if "prompt" in value or "completion" in value:
        missing = [key for key in ("prompt", "completion") if key not in value]
        if missing:
            raise DataError(f"{where}: has \"{'prompt' if missing == ['completion'] else 'completion'}\" "
                            f"but no \"{missing[0]}\"; a row needs both, or a \"text\" field")
        for key in ("prompt", "completion"):
            if not isinstance(value[key], str):
                raise DataError(f"{where}: \"{key}\" must be a string, not {type(value[key]).__name__}")
        if not value["completion"]:
            raise DataError(f"{where}: \"completion\" is empty, so the row has nothing to train")
        return Row(line, value["prompt"], value["completion"])
    keys = ", ".join(sorted(map(str, value))) or "none"
    raise DataError(f"{where}: a row needs a \"text\" field, \"prompt\" and \"completion\" fields, "
                    f"or a \"messages\" list (found: {keys})")


def check_one_kind(rows: Sequence[Row], path: str) -> None:
    """Refuse a file that mixes `messages` rows with `text` or `prompt`/`completion` rows, naming the line.

    Raises:
        DataError: the first row whose kind differs from the first row's.
    """
    chat = rows[0].kind == "messages" if rows else False
    for row in rows:
        if (row.kind == "messages") != chat:
            raise DataError(f"{path}:{row.line}: a \"{row.kind}\" row, but line {rows[0].line} is a "
                            f"\"{rows[0].kind}\" row; one file holds either \"messages\" rows or "
                            "\"text\"/\"prompt\" rows. Split it into two files")


def read_jsonl(path: str | os.PathLike[str]) -> list[Row]:
    """Read and check every row of a JSONL file.

    Args:
        path (str | PathLike): the file.

    Returns:
        list[Row]: the rows, in file order.

    Raises:
        DataError: the file is missing, unreadable or empty, or a line is not UTF-8, not
            JSON, or lacks the fields; the message names the file and line.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise DataError(f"{path}: is a folder; pass a .jsonl file with one JSON object per line")
    try:
        with open(path, "rb") as handle:
            raw_lines = handle.read().splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: no such data file") from None
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror or error})") from None

    rows = []
    for number, raw in enumerate(raw_lines, start=1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DataError(f"{where}: not UTF-8 text (byte {error.start + 1} is {raw[error.start]:#04x}); "
                            "save the file as UTF-8") from None
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON (column {error.colno}: {error.msg})") from None
        rows.append(_row_from_object(value, number, where))
    if not rows:
        raise DataError(f"{path}: holds no rows; add lines such as {{\"text\": \"...\"}} "
                        "or {\"prompt\": \"...\", \"completion\": \"...\"}")
    check_one_kind(rows, path)
    return rows


@dataclasses.dataclass(frozen=True)
class TokenizedData:
    """Rows turned into token ids and labels.

    Args:
        examples (list[dict]): `input_ids` and `labels` lists, one dict per kept row.
        truncated (int): rows longer than the sequence length, cut at its end.
        dropped (tuple[int, ...]): line numbers of rows with no trained token left after
            truncation (a prompt that fills the whole sequence).
    """

    examples: list[dict[str, list[int]]]
    truncated: int
    dropped: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]


def _special_id(tokenizer: Any, name: str) -> list[int]:
    value = getattr(tokenizer, f"{name}_token_id", None)
    return [] if value is None else [int(value)]


def _plain_tokens(row: Row, tokenizer: Any, bos: list[int], eos: list[int]) -> tuple[list[int], list[int]]:
    """`bos + prompt + completion + eos`, the prompt's labels -100."""
    prompt = bos + (tokenizer(row.prompt, add_special_tokens=False)["input_ids"] if row.prompt else [])
    completion = tokenizer(row.completion, add_special_tokens=False)["input_ids"] + eos
    return prompt + completion, [IGNORE_INDEX] * len(prompt) + completion


def tokenize_rows(rows: Sequence[Row], tokenizer: Any, seq_len: int, *, source: str = "data") -> TokenizedData:
    """Token ids and labels for each row, cut at `seq_len`.

    `text` and `prompt`/`completion` rows become `bos + prompt + completion + eos`: the
    tokenizer's beginning- and end-of-sequence tokens are added here (where it has them),
    the same way for every tokenizer, instead of relying on each tokenizer's own
    `add_special_tokens` habits; prompt positions get label -100. `messages` rows are
    rendered with the tokenizer's chat template and trained on the assistant turns only
    (`kbitprep.app.chat`).

    Raises:
        DataError: no row has a trained token left, or a chat row cannot be rendered.
    """
    from .chat import check_chat_template, tokenize_conversation

    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, not {seq_len}")
    if any(row.kind == "messages" for row in rows):
        check_chat_template(tokenizer, str(getattr(tokenizer, "name_or_path", "") or "the model"))
    bos, eos = _special_id(tokenizer, "bos"), _special_id(tokenizer, "eos")
    examples, truncated, dropped = [], 0, []
    for row in rows:
        if row.kind == "messages":
            ids, labels = tokenize_conversation(row.messages, tokenizer, f"{source}:{row.line}")
        else:
            ids, labels = _plain_tokens(row, tokenizer, bos, eos)
        truncated += len(ids) > seq_len
        ids, labels = ids[:seq_len], labels[:seq_len]
        # The first position is never a target (nothing comes before it), so it does not count.
        if all(label == IGNORE_INDEX for label in labels[1:]):
            dropped.append(row.line)
            continue
        examples.append({"input_ids": ids, "labels": labels})
    if not examples:
        what = "an assistant token" if rows and rows[0].kind == "messages" else "a completion token"
        raise DataError(f"{source}: no row has {what} within --seq-len {seq_len}; "
                        "raise --seq-len or shorten the prompts")
    return TokenizedData(examples, truncated, tuple(dropped))


class CausalLMCollator:
    """Pads a list of examples on the right into `input_ids`, `attention_mask` and `labels` tensors.

    Packed examples (with `position_ids`, from `kbitprep.app.packing`) get `position_ids`
    instead of an `attention_mask`, and `use_cache=False`: that is how transformers is told
    to keep the packed rows apart (see `kbitprep.app.packing`). Their padding continues as
    one more short row of its own.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: Iterable[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        examples = list(examples)
        width = max(len(example["input_ids"]) for example in examples)
        pad = [width - len(example["input_ids"]) for example in examples]
        batch: dict[str, Any] = {
            "input_ids": torch.tensor([e["input_ids"] + [self.pad_token_id] * n for e, n in zip(examples, pad)]),
            "labels": torch.tensor([e["labels"] + [IGNORE_INDEX] * n for e, n in zip(examples, pad)]),
        }
        if "position_ids" in examples[0]:
            batch["position_ids"] = torch.tensor([e["position_ids"] + list(range(n)) for e, n in zip(examples, pad)])
            batch["use_cache"] = False
        else:
            batch["attention_mask"] = torch.tensor([[1] * len(e["input_ids"]) + [0] * n for e, n in zip(examples, pad)])
        return batch
