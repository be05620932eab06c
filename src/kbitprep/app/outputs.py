"""The output folder of a fine-tuning run: atomic files, checkpoint markers, and run states.

A run folder is always in one of these states, so nothing ever looks finished when it
is not::

    absent / empty   nothing there yet
    incomplete       INCOMPLETE exists: a run started and has not finished (it may be
                     running, or it crashed; `--resume` continues it)
    finished         report.json exists and INCOMPLETE does not
    foreign          files that kbitprep did not write

Every final file is written under a temporary name and renamed into place (a rename
within one folder is atomic), and report.json is renamed in last, so a run killed at
any moment leaves either the INCOMPLETE marker or a whole finished run.

Checkpoints live in `checkpoints/checkpoint-<step>`. The Trainer writes one in several
files; kbitprep then writes `kbitprep-complete.json` into it. A checkpoint without that
marker was cut short (the process died while saving) and is never resumed from.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..errors import KbitPrepError

__all__ = [
    "ADAPTER_DIR",
    "CHECKPOINTS_DIR",
    "CHECKPOINT_COMPLETE",
    "INCOMPLETE",
    "LOSS_PLOT",
    "REPORT",
    "RunFolder",
    "RunFolderError",
    "atomic_directory",
    "atomic_write_bytes",
    "atomic_write_json",
    "checkpoint_step",
]

ADAPTER_DIR = "adapter"
REPORT = "report.json"
LOSS_PLOT = "loss.png"
CHECKPOINTS_DIR = "checkpoints"
INCOMPLETE = "INCOMPLETE"
BASE_MODEL_DIR = "base-model"  # the demo's generated base model
CHECKPOINT_COMPLETE = "kbitprep-complete.json"
_STAGING_PREFIX = ".kbitprep-staging-"
# Everything kbitprep may write into a run folder; --overwrite removes exactly these.
OWNED_NAMES = (ADAPTER_DIR, REPORT, LOSS_PLOT, CHECKPOINTS_DIR, INCOMPLETE, BASE_MODEL_DIR)
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class RunFolderError(KbitPrepError, RuntimeError):
    """The output folder cannot be used as asked (it holds a finished run, ...)."""


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` under a temporary name in the same folder, then rename it into place."""
    path = Path(path)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
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


def checkpoint_step(path: Path) -> int | None:
    """The step of a `checkpoint-<step>` folder, or None for any other name."""
    match = _CHECKPOINT_RE.match(path.name)
    return int(match.group(1)) if match else None


class RunFolder:
    """One run's output folder. Reads its state; changes it only through the methods that say so.

    Args:
        path (str | PathLike): the folder (it need not exist yet).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # --- reading -----------------------------------------------------------------------

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    def state(self) -> str:
        """"absent", "empty", "incomplete", "finished" or "foreign" (see the module docstring)."""
        if not self.path.exists():
            return "absent"
        if not self.path.is_dir():
            return "foreign"
        names = {entry.name for entry in self.path.iterdir()}
        if INCOMPLETE in names:
            return "incomplete"
        if REPORT in names:
            return "finished"
        if not names:
            return "empty"
        return "foreign"

    def marker(self) -> dict[str, Any]:
        """What the INCOMPLETE marker records ({} if there is none or it cannot be read)."""
        try:
            return json.loads((self.path / INCOMPLETE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def complete_checkpoints(self) -> list[Path]:
        """Checkpoint folders that were saved completely, oldest first."""
        return sorted((p for p in self._checkpoint_dirs() if (p / CHECKPOINT_COMPLETE).is_file()), key=checkpoint_step)

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        complete = self.complete_checkpoints()
        return complete[-1] if complete else None

    def _checkpoint_dirs(self) -> list[Path]:
        if not self.checkpoints_dir.is_dir():
            return []
        return [p for p in self.checkpoints_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]

    def check_claim(self, *, overwrite: bool, resume: bool) -> str:
        """Whether a run may start here; returns the state. Changes nothing.

        Raises:
            RunFolderError: the folder holds a finished run (and not `overwrite`), an
                unfinished run (and neither `resume` nor `overwrite`), other files, or is a file.
        """
        state = self.state()
        where = str(self.path)
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"{where}: is a file, not a folder; choose another --output")
        if state == "finished" and not overwrite:
            what = "resume" if resume else "write into"
            raise RunFolderError(f"{where}: holds a finished run ({REPORT}); will not {what} it. "
                                 "Pass --overwrite to replace it, or choose another --output")
        if state == "incomplete" and not (resume or overwrite):
            raise RunFolderError(f"{where}: holds an unfinished run ({INCOMPLETE}); pass --resume to continue it "
                                 "from its last checkpoint, or --overwrite to start again")
        if state == "foreign" and not overwrite:
            raise RunFolderError(f"{where}: is not empty and holds no kbitprep run; choose an empty or new "
                                 "--output (--overwrite writes beside the files there)")
        self._check_writable()
        return state

    def _check_writable(self) -> None:
        existing = next((p for p in (self.path, *self.path.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            raise RunFolderError(f"{self.path}: cannot be created, {existing} is a file; choose another --output")
        if existing is None or not os.access(existing, os.W_OK | os.X_OK):
            raise RunFolderError(f"{self.path}: cannot be written (no write permission on {existing}); "
                                 "choose another --output")

    # --- changing ----------------------------------------------------------------------

    def start(self, *, overwrite: bool, settings: Mapping[str, Any]) -> None:
        """Make the folder hold an unfinished run: clear what --overwrite replaces, write INCOMPLETE.

        Call it after `check_claim`. Without `overwrite`, existing checkpoints are kept (to resume from).
        """
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RunFolderError(f"{self.path}: cannot be created ({error.strerror or error}); "
                                 "choose another --output") from None
        marker = {
            "status": "incomplete",
            "message": "This run has not finished (it is running, or it stopped early). "
                       "`kbitprep finetune ... --resume` continues it from its last complete checkpoint; "
                       "`--overwrite` starts again. Nothing in this folder is a finished result.",
            "settings": dict(settings),
        }
        # The marker goes in first: a run killed while the old files are removed is still marked.
        atomic_write_json(self.path / INCOMPLETE, marker)
        if overwrite:
            self.clear(keep=(INCOMPLETE,))

    def clear(self, *, keep: tuple[str, ...] = ()) -> None:
        """Remove everything kbitprep writes into a run folder (and nothing else), but the names in `keep`."""
        if not self.path.is_dir():
            return
        for entry in self.path.iterdir():
            temporary = entry.name.startswith(".") and entry.name.endswith(".tmp")  # from atomic_write_bytes
            leftover = entry.name.startswith(_STAGING_PREFIX) or temporary
            if (entry.name in OWNED_NAMES or leftover) and entry.name not in keep:
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()

    def record_failure(self, error: BaseException) -> None:
        """Note in the INCOMPLETE marker why the run stopped."""
        marker = self.marker() or {"status": "incomplete"}
        marker["error"] = f"{type(error).__name__}: {error}"
        with contextlib.suppress(OSError):
            atomic_write_json(self.path / INCOMPLETE, marker)

    def mark_checkpoint_complete(self, checkpoint: Path, step: int) -> None:
        """Write the completeness marker into a checkpoint the Trainer has finished saving,
        then remove every other checkpoint (older complete ones and cut-short ones)."""
        for file in checkpoint.rglob("*"):
            if file.is_file():
                _fsync_file(file)
        atomic_write_json(checkpoint / CHECKPOINT_COMPLETE, {"step": step})
        for other in self._checkpoint_dirs():
            if other != checkpoint:
                shutil.rmtree(other, ignore_errors=True)

    def remove_incomplete_checkpoints(self) -> list[Path]:
        """Delete checkpoint folders that have no completeness marker; returns them."""
        removed = [p for p in self._checkpoint_dirs() if not (p / CHECKPOINT_COMPLETE).is_file()]
        for path in removed:
            shutil.rmtree(path, ignore_errors=True)
        return removed

    def finish(self, report: Mapping[str, Any]) -> None:
        """Write report.json (the moment the run counts as finished), then drop INCOMPLETE and checkpoints."""
        atomic_write_json(self.path / REPORT, report)
        (self.path / INCOMPLETE).unlink(missing_ok=True)
        shutil.rmtree(self.checkpoints_dir, ignore_errors=True)
