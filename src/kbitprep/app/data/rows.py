"""Training data for `kbitprep finetune`: the rows of a JSONL file, read and checked (`tokenize` turns them into ids).

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
import itertools
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

from ...errors import KbitPrepError

__all__ = ["IGNORE_INDEX", "DataError", "Row", "check_one_kind", "read_jsonl"]

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


# Magic bytes of files that are not JSONL text, and what to do about each.
_NOT_TEXT = (
    (b"\x1f\x8b", "a gzip-compressed file; decompress it first (gunzip)"),
    (b"BZh", "a bzip2-compressed file; decompress it first (bunzip2)"),
    (b"\xfd7zXZ\x00", "an xz-compressed file; decompress it first (unxz)"),
    (b"\x28\xb5\x2f\xfd", "a zstd-compressed file; decompress it first (unzstd)"),
    (b"PK\x03\x04", "a zip archive; extract the .jsonl file from it"),
    (b"PAR1", "a Parquet file; convert it to JSONL, one JSON object per line"),
    (b"\xff\xfe", "UTF-16 text; save the file as UTF-8"),
    (b"\xfe\xff", "UTF-16 text; save the file as UTF-8"),
)
_UTF8_BOM = b"\xef\xbb\xbf"
# A line longer than this is no training row (a sequence of --seq-len tokens is a few MB of
# text at most); reading stops there instead of holding the whole line in memory.
MAX_LINE_BYTES = 256 * 1024 * 1024


def _open_data(path: str) -> Any:
    if os.path.isdir(path):
        raise DataError(f"{path}: is a folder; pass a .jsonl file with one JSON object per line")
    try:
        handle = open(path, "rb")  # noqa: SIM115 - returned open, closed by the caller's `with`
    except FileNotFoundError:
        raise DataError(f"{path}: no such data file") from None
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror or error})") from None
    head = handle.peek(8)[:8] if hasattr(handle, "peek") else b""
    for magic, what in _NOT_TEXT:
        if head.startswith(magic):
            handle.close()
            raise DataError(f"{path}: is {what}")
    return handle


def _raw_lines(handle: Any, path: str) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) for each line, read one at a time; a line past MAX_LINE_BYTES is an error."""
    for number in itertools.count(1):
        raw = handle.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            raise DataError(f"{path}:{number}: longer than {MAX_LINE_BYTES // 2**20} MiB; one line is one "
                            "training row: split the text into rows of at most a few --seq-len each")
        if number == 1 and raw.startswith(_UTF8_BOM):
            raw = raw[len(_UTF8_BOM):]  # the byte-order mark some editors write: not part of the JSON
        yield number, raw.rstrip(b"\r\n")


def _row_from_line(raw: bytes, number: int, path: str) -> Row | None:
    where = f"{path}:{number}"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{where}: not UTF-8 text (byte {error.start + 1} is {raw[error.start]:#04x}); "
                        "save the file as UTF-8") from None
    if not line.strip():
        return None
    try:
        value = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: not valid JSON (column {error.colno}: {error.msg})") from None
    return _row_from_object(value, number, where)


def read_jsonl(path: str | os.PathLike[str]) -> list[Row]:
    """Read and check every row of a JSONL file, one line at a time.

    Args:
        path (str | PathLike): the file.

    Returns:
        list[Row]: the rows, in file order.

    Raises:
        DataError: the file is missing, unreadable, empty, compressed or not UTF-8 text,
            or a line is not UTF-8, not JSON, absurdly long, or lacks the fields; the
            message names the file and line.
    """
    path = os.fspath(path)
    with _open_data(path) as handle:
        try:
            rows = [row for number, raw in _raw_lines(handle, path)
                    if (row := _row_from_line(raw, number, path)) is not None]
        except OSError as error:
            raise DataError(f"{path}: cannot be read ({error.strerror or error})") from None
    if not rows:
        raise DataError(f"{path}: holds no rows; add lines such as {{\"text\": \"...\"}} "
                        "or {\"prompt\": \"...\", \"completion\": \"...\"}")
    check_one_kind(rows, path)
    return rows
