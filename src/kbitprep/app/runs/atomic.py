"""Files written so that nothing half-written ever looks whole: a temporary name, then a rename.

Every final file of a run folder is written under a `.kbitprep-tmp-*` name in the same
folder and renamed into place (a rename within one folder is atomic); a folder is built
in a `.kbitprep-staging-*` folder and renamed. `kbitprep.app.runs.folder` removes
leftovers of these names that a killed run left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_directory", "atomic_write_bytes", "atomic_write_json", "file_fingerprint"]

_TMP_PREFIX = ".kbitprep-tmp-"
_STAGING_PREFIX = ".kbitprep-staging-"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_file(handle: Any, data: bytes) -> None:
    """The one place the bytes of a kbitprep file are written (the fault-injection tests patch it)."""
    handle.write(data)
    handle.flush()
    os.fsync(handle.fileno())


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` under a temporary name in the same folder, then rename it into place.

    Args:
        path (str | PathLike): the final file.
        data (bytes): its content.

    Raises:
        OSError: the file cannot be written (the temporary file is removed).
    """
    path = Path(path)
    # Kept past the `with` (delete=False): renamed into place, or removed on failure.
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f"{_TMP_PREFIX}{path.name}-",  # noqa: SIM115
                                         delete=False)
    try:
        with handle:
            _write_file(handle, data)
        os.chmod(handle.name, 0o666 & ~_umask())  # the mode a plain open() would give, not tempfile's 0600
        os.replace(handle.name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(handle.name)
        raise


def atomic_write_json(path: str | os.PathLike[str], value: Any) -> None:
    """`atomic_write_bytes` of `value` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=False) + "\n").encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a staging folder beside `path`; on success it replaces `path`, on failure it is removed.

    Example:
        >>> with atomic_directory(run / "adapter") as staging:
        ...     model.save_pretrained(staging)
    """
    path = Path(path)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{_STAGING_PREFIX}{path.name}-"))
    os.chmod(staging, 0o777 & ~_umask())  # the mode a plain mkdir would give, not mkdtemp's 0700
    try:
        yield staging
        for file in staging.rglob("*"):
            if file.is_file():
                _fsync_file(file)
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def file_fingerprint(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's content, read in blocks: what a resumed run compares to know its data is the same."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
