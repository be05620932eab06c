"""Training rows for `kbitprep finetune`: the `Row` kinds, and the checks every row and file of them passes.

Every row becomes one of three kinds:

    text                every token is trained
    prompt/completion   only the completion is trained; the prompt's labels are -100
                        (ignored by the loss)
    messages            rendered with the chat template; only the assistant turns are
                        trained (see `chat`)

Which keys of a record make which kind (text, prompt/completion, messages, Alpaca,
ShareGPT) is the table in `formats`; the files they come in (JSONL, a JSON array,
Parquet, CSV, a `datasets` folder) are read by `files`, JSONL by `jsonl`; `tokenize`
turns rows into token ids.

`text` and `prompt`/`completion` rows may share a file (both become bos + prompt +
completion + eos); `messages` rows may not be mixed with them, since the model would be
taught two formats.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from ...errors import KbitPrepError

__all__ = ["IGNORE_INDEX", "DataError", "Row", "check_one_kind", "messages_row"]

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips


class DataError(KbitPrepError, ValueError):
    """The training data cannot be used; the message names the file and, where there is one, the line."""


@dataclasses.dataclass(frozen=True)
class Row:
    """One training example.

    Args:
        line (int): its 1-based line number in a JSONL file, or its row number (from 1) in
            another container (a JSON array, Parquet, CSV, a `datasets` folder).
        prompt (str): text that conditions the model but is not trained ("" for a `text` row).
        completion (str): the text that is trained (the whole `text` of a `text` row).
        messages (tuple[dict, ...]): the turns of a `messages` row (each with a "role" and a
            "content" string); empty for the other kinds. Default: ()
        context_turns (int): leading `messages` that are context only: none of their assistant
            turns is trained (a preference row's prompt). Default: 0
        rejected (Row | None): a preference row: this row is its prompt with the chosen
            completion, `rejected` the same prompt with the rejected one. Default: None
    """

    line: int
    prompt: str = ""
    completion: str = ""
    messages: tuple[dict[str, Any], ...] = ()
    context_turns: int = 0
    rejected: Row | None = None

    @property
    def kind(self) -> str:
        """"messages", "prompt" (prompt and completion) or "text"; a preference row's is its chosen side's."""
        return "messages" if self.messages else "prompt" if self.prompt else "text"

    @property
    def preference(self) -> bool:
        """A pair of completions to prefer one of (DPO, ORPO), not one to imitate."""
        return self.rejected is not None


def messages_row(value: Any, line: int, where: str) -> Row:
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
        if row.preference != rows[0].preference:
            which = {True: "a preference (prompt/chosen/rejected)", False: "a demonstration"}
            raise DataError(f"{path}:{row.line}: {which[row.preference]} row, but line {rows[0].line} is "
                            f"{which[rows[0].preference]} row; one file holds one or the other. Split it into two "
                            "files")
