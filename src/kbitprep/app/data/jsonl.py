"""JSONL data files, read one line at a time so that every problem names its line.

Blank lines are skipped; a line that is not a row (not UTF-8, not JSON, no format's keys)
is an error naming the file and the line, raised before anything is loaded or written.
A compressed file, an archive or UTF-16 text is refused by its first bytes, naming the
fix; a line too long to be a training row stops the reading instead of filling memory.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from typing import Any

from .formats import row_from_record
from .rows import DataError, Row, check_one_kind

__all__ = ["MAX_LINE_BYTES", "read_jsonl", "refuse_non_text"]


# Magic bytes of files that are not JSONL text, and what to do about each.
_NOT_TEXT = (
    (b"\x1f\x8b", "a gzip-compressed file; decompress it first (gunzip)"),
    (b"BZh", "a bzip2-compressed file; decompress it first (bunzip2)"),
    (b"\xfd7zXZ\x00", "an xz-compressed file; decompress it first (unxz)"),
    (b"\x28\xb5\x2f\xfd", "a zstd-compressed file; decompress it first (unzstd)"),
    (b"PK\x03\x04", "a zip archive; extract the .jsonl file from it"),
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
    try:
        refuse_non_text(path, head)
    except DataError:
        handle.close()
        raise
    return handle


def refuse_non_text(path: str | os.PathLike[str], head: bytes) -> None:
    """Refuse a file whose first bytes show a compressed file, an archive or UTF-16 text, naming the fix.

    Raises:
        DataError: "DATA: is a gzip-compressed file; decompress it first (gunzip)", ...
    """
    for magic, what in _NOT_TEXT:
        if head.startswith(magic):
            raise DataError(f"{path}: is {what}")


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


def _row_from_line(raw: bytes, number: int, path: str, data_format: str) -> Row | None:
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
    return row_from_record(value, number, where, data_format)


def read_jsonl(path: str | os.PathLike[str], data_format: str = "auto") -> list[Row]:
    """Read and check every row of a JSONL file, one line at a time.

    Other containers (a JSON array, Parquet, CSV, a `datasets` folder) are read by
    `kbitprep.app.data.files.read_data`, which comes here for JSONL.

    Args:
        path (str | PathLike): the file.
        data_format (str): the rows' format (`kbitprep.app.data.formats`); "auto" recognises
            each row's. Default: "auto"

    Returns:
        list[Row]: the rows, in file order.

    Raises:
        DataError: the file is missing, unreadable, empty, compressed or not UTF-8 text,
            or a line is not UTF-8, not JSON, absurdly long, or matches no data format; the
            message names the file and line.
    """
    path = os.fspath(path)
    with _open_data(path) as handle:
        try:
            rows = [row for number, raw in _raw_lines(handle, path)
                    if (row := _row_from_line(raw, number, path, data_format)) is not None]
        except OSError as error:
            raise DataError(f"{path}: cannot be read ({error.strerror or error})") from None
    if not rows:
        raise DataError(f"{path}: holds no rows; add lines such as {{\"text\": \"...\"}} "
                        "or {\"prompt\": \"...\", \"completion\": \"...\"}")
    check_one_kind(rows, path)
    return rows
