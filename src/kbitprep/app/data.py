"""Training data for `kbitprep finetune`: JSONL rows, tokenized for causal-LM training.

Each line of the file is one JSON object, in one of two forms:

    {"text": "..."}                            every token is trained
    {"prompt": "...", "completion": "..."}     only the completion is trained; the
                                               prompt's labels are -100 (ignored by the loss)

Blank lines are skipped. Any other line is an error that names the file and the line,
raised before anything is loaded or written.
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
    """

    line: int
    prompt: str
    completion: str


def _row_from_object(value: Any, line: int, where: str) -> Row:
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a JSON object such as {{\"text\": ...}}, got {type(value).__name__}")
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
    raise DataError(f"{where}: a row needs a \"text\" field or \"prompt\" and \"completion\" fields "
                    f"(found: {keys})")


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


def tokenize_rows(rows: Sequence[Row], tokenizer: Any, seq_len: int, *, source: str = "data") -> TokenizedData:
    """Token ids and labels for each row: `bos + prompt + completion + eos`, cut at `seq_len`.

    The tokenizer's beginning- and end-of-sequence tokens are added here (where it has
    them), the same way for every tokenizer, instead of relying on each tokenizer's own
    `add_special_tokens` habits. Prompt positions get label -100.

    Raises:
        DataError: no row has a trained token left.
    """
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, not {seq_len}")
    bos, eos = _special_id(tokenizer, "bos"), _special_id(tokenizer, "eos")
    examples, truncated, dropped = [], 0, []
    for row in rows:
        prompt = bos + (tokenizer(row.prompt, add_special_tokens=False)["input_ids"] if row.prompt else [])
        completion = tokenizer(row.completion, add_special_tokens=False)["input_ids"] + eos
        ids = (prompt + completion)[:seq_len]
        labels = ([IGNORE_INDEX] * len(prompt) + completion)[:seq_len]
        truncated += len(prompt) + len(completion) > seq_len
        # The first position is never a target (nothing comes before it), so it does not count.
        if all(label == IGNORE_INDEX for label in labels[1:]):
            dropped.append(row.line)
            continue
        examples.append({"input_ids": ids, "labels": labels})
    if not examples:
        raise DataError(f"{source}: no row has a completion token within --seq-len {seq_len}; "
                        "raise --seq-len or shorten the prompts")
    return TokenizedData(examples, truncated, tuple(dropped))


class CausalLMCollator:
    """Pads a list of examples on the right into `input_ids`, `attention_mask` and `labels` tensors."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: Iterable[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        examples = list(examples)
        width = max(len(example["input_ids"]) for example in examples)
        pad = [width - len(example["input_ids"]) for example in examples]
        return {
            "input_ids": torch.tensor([e["input_ids"] + [self.pad_token_id] * n for e, n in zip(examples, pad)]),
            "attention_mask": torch.tensor([[1] * len(e["input_ids"]) + [0] * n for e, n in zip(examples, pad)]),
            "labels": torch.tensor([e["labels"] + [IGNORE_INDEX] * n for e, n in zip(examples, pad)]),
        }
