"""The files training data comes in, one row of `CONTAINERS` each, read into `Row`s.

    a folder                    written by `datasets.Dataset.save_to_disk`   datasets.load_from_disk
    *.parquet, or PAR1 bytes    Parquet                                      load_dataset("parquet")
    *.csv                       CSV with a header line, every cell text      load_dataset("csv")
    starts with "["             a JSON array of objects                      load_dataset("json")
    anything else               JSON Lines                                   `jsonl.read_jsonl`

The first match wins. JSON Lines keep kbitprep's own line-by-line reader, which names the
line of every problem, refuses compressed and UTF-16 files, and reads a huge line without
holding the file; every other container is read with the `datasets` library, keeping the
whole table in memory and its cache in a temporary folder that is removed afterwards
(nothing is written beside the data or under ~/.cache). A table's row number (from 1,
the header line of a CSV not counted) stands where a JSONL file's line number would.

Empty cells and missing keys (null in a table whose other rows have the column) count as
absent, so a JSON array may mix `text` and `prompt`/`completion` rows as a JSONL file may.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..runs.folder import file_fingerprint
from .formats import row_from_record
from .jsonl import read_jsonl, refuse_non_text
from .rows import DataError, Row, check_one_kind

__all__ = ["CONTAINERS", "Container", "data_fingerprint", "read_data"]

_SNIFF_BYTES = 4096
_UTF8_BOM = b"\xef\xbb\xbf"


@dataclasses.dataclass(frozen=True)
class Container:
    """One kind of data file.

    Args:
        name (str): how messages name it ("a Parquet file").
        recognise (Callable[[Path, bytes], bool]): True for a path of this kind, given the
            path and its first bytes (empty for a folder).
        records (Callable[[Path], list[dict]] | None): the rows as dicts, read with `datasets`;
            None: the JSONL reader reads the file itself.
        text (bool): a text file, so a compressed or UTF-16 one is refused with the fix. Default: True
    """

    name: str
    recognise: Callable[[Path, bytes], bool]
    records: Callable[[Path], list[dict[str, Any]]] | None
    text: bool = True


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[Any]:
    """`datasets`, with its progress bars and log lines off for the block (restored after)."""
    import datasets
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from datasets.utils import logging as datasets_logging

    verbosity = datasets_logging.get_verbosity()
    bars_were_off = are_progress_bars_disabled()
    datasets_logging.set_verbosity(datasets_logging.CRITICAL)  # its parquet reader logs, then raises, each failure
    disable_progress_bars()
    try:
        yield datasets
    finally:
        datasets_logging.set_verbosity(verbosity)
        if not bars_were_off:
            enable_progress_bars()


def _load(builder: str, path: Path, **options: Any) -> list[dict[str, Any]]:
    """`load_dataset(builder)` on one file, in memory, its cache in a temporary folder."""
    with _quiet_datasets() as datasets, tempfile.TemporaryDirectory(prefix="kbitprep-data-") as cache:
        table = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache,
                                      keep_in_memory=True, **options)
        return table.to_list()


def _csv_records(path: Path) -> list[dict[str, Any]]:
    """A CSV file's rows: every column read as text (a CSV has no types; "007" stays "007")."""
    with open(path, encoding="utf-8-sig", newline="") as handle:
        header = next(csv.reader(handle), None)
    if not header:
        return []
    from datasets import Features, Value

    features = Features({name: Value("string") for name in header})
    return _load("csv", path, features=features, na_filter=False)


def _folder_records(path: Path) -> list[dict[str, Any]]:
    with _quiet_datasets() as datasets:
        try:
            table = datasets.load_from_disk(str(path), keep_in_memory=True)
        except FileNotFoundError:
            raise DataError(f"{path}: is a folder, but not one `datasets` saved (no dataset_info.json and "
                            "state.json); pass a data file, or a folder written by Dataset.save_to_disk") from None
        if isinstance(table, datasets.DatasetDict):
            splits = list(table)
            if "train" not in table and len(splits) != 1:
                raise DataError(f"{path}: holds the splits {', '.join(splits)} and none is \"train\"; save the split "
                                "to train on by itself (dataset[\"name\"].save_to_disk(...))")
            table = table["train" if "train" in table else splits[0]]
        return table.to_list()


def _starts_with_bracket(path: Path, head: bytes) -> bool:
    return head.removeprefix(_UTF8_BOM).lstrip().startswith(b"[")


CONTAINERS: tuple[Container, ...] = (
    Container("a datasets folder", lambda path, head: path.is_dir(), _folder_records, text=False),
    Container("a Parquet file", lambda path, head: path.suffix.lower() == ".parquet" or head.startswith(b"PAR1"),
              lambda path: _load("parquet", path), text=False),
    Container("a CSV file", lambda path, head: path.suffix.lower() == ".csv", _csv_records),
    Container("a JSON array", _starts_with_bracket, lambda path: _load("json", path)),
    Container("a JSON Lines file", lambda path, head: True, None),
)


def _head(path: Path) -> bytes:
    if path.is_dir():
        return b""
    try:
        with open(path, "rb") as handle:
            return handle.read(_SNIFF_BYTES)
    except FileNotFoundError:
        raise DataError(f"{path}: no such data file") from None
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror or error})") from None


def _without_nulls(value: Any) -> Any:
    """A table's record with its null cells left out: a column other rows have is absent from this one."""
    if isinstance(value, dict):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value


def _failure(error: BaseException) -> str:
    # datasets' DatasetGenerationError says only "An error occurred": the reason is its cause.
    cause = (error.__cause__ or error.__context__) if type(error).__name__ == "DatasetGenerationError" else None
    shown = cause or error
    text = str(shown).strip().splitlines()[0] if str(shown).strip() else ""
    return f"{type(shown).__name__}: {text}" if text else type(shown).__name__


def _read_failures() -> tuple[type[BaseException], ...]:
    """What `datasets`, pyarrow and pandas raise for a file they cannot read (a bug in kbitprep is none of these)."""
    from datasets.exceptions import DatasetsError
    from pyarrow import ArrowException

    return (ValueError, OSError, UnicodeDecodeError, DatasetsError, ArrowException)


def read_data(path: str | os.PathLike[str], data_format: str = "auto") -> list[Row]:
    """Read and check every row of a data file or a `datasets` folder.

    Args:
        path (str | PathLike): the file or folder (see `CONTAINERS`).
        data_format (str): the rows' format (`kbitprep.app.data.formats.DATA_FORMAT_CHOICES`);
            "auto" recognises each row's from its keys. Default: "auto"

    Returns:
        list[Row]: the rows, in file order.

    Raises:
        DataError: the file is missing, unreadable, empty, or a row matches no format; the
            message names the file and the line or row.
    """
    path = Path(os.fspath(path))
    head = _head(path)
    container = next(c for c in CONTAINERS if c.recognise(path, head))
    if container.records is None:
        return read_jsonl(path, data_format)
    if container.text:
        refuse_non_text(path, head)
    try:
        records = container.records(path)
    except DataError:
        raise
    except _read_failures() as error:
        raise DataError(f"{path}: cannot be read as {container.name} ({_failure(error)}); check the file, or "
                        "convert it to JSONL, one JSON object per line") from None
    rows = [row_from_record(_without_nulls(record), number, f"{path}: row {number}", data_format)
            for number, record in enumerate(records, start=1)]
    if not rows:
        raise DataError(f"{path}: holds no rows ({container.name} without data)")
    check_one_kind(rows, str(path))
    return rows


def data_fingerprint(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a data file's content, or of a folder's files (names and contents): what --resume compares."""
    path = Path(path)
    if not path.is_dir():
        return file_fingerprint(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{file_fingerprint(file)}\0".encode())
    return digest.hexdigest()
