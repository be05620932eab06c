"""The output folder of a fine-tuning run: one run at a time, atomic files, a record of what kbitprep wrote.

A run folder is always in one of these states, so nothing ever looks finished when it
is not::

    absent / empty   nothing there yet
    incomplete       INCOMPLETE exists: a run started and has not finished (it may be
                     running, or it stopped; `--resume` continues it)
    finished         report.json exists and INCOMPLETE does not
    foreign          files that kbitprep did not write

Three rules keep a user's files safe:

- **One run per folder.** A run holds `.kbitprep.lock` (an OS file lock, released by the
  kernel when the process dies, so a killed run's lock is taken over by the next run)
  beside `.kbitprep-owner.json`, which names the live run: a second run fails at once and
  names it.
- **kbitprep deletes only what it wrote.** `.kbitprep-manifest.json` lists every name
  kbitprep put into the folder, recorded *before* the name is created. `--overwrite`
  removes only those names, and refuses, before touching anything, a folder where it
  would have to replace a file kbitprep did not write, or where a name it would remove
  holds the model or the data the run reads.
- **Nothing half-written looks whole.** Every final file is written under a temporary
  `.kbitprep-tmp-*` name and renamed into place (a rename within one folder is atomic), a
  folder is built in a `.kbitprep-staging-*` folder and renamed, and report.json goes in
  last. Leftover temporary names from a killed run are removed when the next run starts.

Checkpoints live in `checkpoints/checkpoint-<step>`. The Trainer writes one in several
files; kbitprep then writes `kbitprep-complete.json` into it. A checkpoint without that
marker was cut short (the process died while saving) and is never resumed from.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import re
import shutil
import socket
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ...errors import KbitPrepError
from .atomic import (
    _STAGING_PREFIX,
    _TMP_PREFIX,
    _fsync_file,
    atomic_directory,
    atomic_write_bytes,
    atomic_write_json,
    file_fingerprint,
)

__all__ = [
    "ADAPTER_DIR",
    "BASE_MODEL_DIR",
    "CHECKPOINTS_DIR",
    "CHECKPOINT_COMPLETE",
    "INCOMPLETE",
    "LOCK",
    "LOSS_PLOT",
    "MANIFEST",
    "OWNER",
    "REPORT",
    "RUN_FILE",
    "RUN_NAMES",
    "TENSORBOARD_DIR",
    "RunFolder",
    "RunFolderError",
    "RunLockedError",
    "atomic_directory",
    "atomic_write_bytes",
    "atomic_write_json",
    "checkpoint_step",
    "describe_owner",
    "explain_write_failure",
    "file_fingerprint",
]

ADAPTER_DIR = "adapter"
REPORT = "report.json"
LOSS_PLOT = "loss.png"
CHECKPOINTS_DIR = "checkpoints"
INCOMPLETE = "INCOMPLETE"
BASE_MODEL_DIR = "base-model"  # the demo's generated base model
RUN_FILE = "run.yaml"  # the run's resolved settings: `kbitprep finetune --config DIR/run.yaml` repeats it
TENSORBOARD_DIR = "tensorboard"  # --report-to tensorboard
CHECKPOINT_COMPLETE = "kbitprep-complete.json"
MANIFEST = ".kbitprep-manifest.json"
LOCK = ".kbitprep.lock"
OWNER = ".kbitprep-owner.json"
# The names every run writes (the demo adds its base model).
RUN_NAMES = (INCOMPLETE, RUN_FILE, CHECKPOINTS_DIR, TENSORBOARD_DIR, ADAPTER_DIR, LOSS_PLOT, REPORT)
_BOOKKEEPING = (MANIFEST, LOCK, OWNER)  # about the folder, not part of a run's result
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_MANIFEST_FORMAT = 1


class RunFolderError(KbitPrepError, RuntimeError):
    """The output folder cannot be used as asked (it holds a finished run, ...); the message says what to do."""


class RunLockedError(RunFolderError):
    """Another run is live in the output folder; the message names it (process id, host, start time)."""


def _is_leftover(name: str) -> bool:
    """A temporary or staging name kbitprep uses while writing; one still there was cut short."""
    return name.startswith((_TMP_PREFIX, _STAGING_PREFIX))


def checkpoint_step(path: Path) -> int | None:
    """The step of a `checkpoint-<step>` folder, or None for any other name."""
    match = _CHECKPOINT_RE.match(path.name)
    return int(match.group(1)) if match else None


def _inside(path: str | os.PathLike[str], folder: Path) -> bool:
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))


# --- the lock ------------------------------------------------------------------------------


def _owner_record() -> dict[str, Any]:
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python"
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": started, "command": command[:300]}


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, run by another user
        return True
    return True


def describe_owner(owner: Mapping[str, Any]) -> str:
    """"pid 123 on host, started 2026-01-01 10:00:00 UTC: kbitprep finetune ..." from an owner record."""
    text = f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}, started {owner.get('started', '?')}"
    return f"{text}: `{owner['command']}`" if owner.get("command") else text


class _Lock:
    """The OS file lock of one run folder, with the record naming its holder."""

    def __init__(self, folder: Path) -> None:
        from filelock import FileLock

        self.folder = folder
        self._lock = FileLock(folder / LOCK, timeout=0, thread_local=False)

    def acquire(self) -> dict[str, Any] | None:
        """Take the lock and record this process as its holder.

        Returns:
            dict | None: the record of a run that held the lock and ended without releasing
            it (killed), whose lock this run has taken over; None if there was none.

        Raises:
            RunLockedError: another live process holds it.
        """
        from filelock import Timeout

        try:
            self._lock.acquire()
        except Timeout:
            raise RunLockedError(self._held_message()) from None
        previous = self._read_owner()
        try:
            atomic_write_json(self.folder / OWNER, _owner_record())
        except BaseException:
            self.release()
            raise
        return previous

    def release(self) -> None:
        """Remove the holder record and the lock file, then let go (the order keeps waiters on one inode)."""
        if not self._lock.is_locked:
            return
        with contextlib.suppress(FileNotFoundError):
            (self.folder / OWNER).unlink()
        with contextlib.suppress(FileNotFoundError):
            (self.folder / LOCK).unlink()
        self._lock.release(force=True)

    def _read_owner(self) -> dict[str, Any] | None:
        try:
            owner = json.loads((self.folder / OWNER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return owner if isinstance(owner, dict) else None

    def _held_message(self) -> str:
        owner = self._read_owner()
        where = str(self.folder)
        if owner is None:
            return (f"{where}: another process holds the run folder's lock ({LOCK}) and is writing there; "
                    "wait for it to end, or choose another --output")
        if owner.get("host") == socket.gethostname() and not _process_alive(int(owner.get("pid", 0))):
            return (f"{where}: the run that took this folder ({describe_owner(owner)}) has ended, but a process it "
                    f"started still holds the folder's lock ({LOCK}); stop that process, then run again")
        return (f"{where}: another kbitprep run is live in this folder ({describe_owner(owner)}); wait for it "
                "to end or stop it, or choose another --output")


# --- the folder ----------------------------------------------------------------------------


class RunFolder:
    """One run's output folder. Reads its state; changes it only through the methods that say so.

    A run calls, in order: `lock`, `check_claim`, `start`; then `mark_checkpoint_complete`
    as checkpoints are saved; then `finish` (or `abandon` after a failure); then `unlock`.

    Args:
        path (str | PathLike): the folder (it need not exist yet).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock: _Lock | None = None
        self._created = False  # this run made the folder: it may remove it again if it leaves it empty

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # --- reading -----------------------------------------------------------------------

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    def _names(self) -> set[str]:
        """The entries that make up the folder's content: not the bookkeeping files, not leftovers."""
        return {entry.name for entry in self.path.iterdir()
                if entry.name not in _BOOKKEEPING and not _is_leftover(entry.name)}

    def state(self) -> str:
        """"absent", "empty", "incomplete", "finished" or "foreign" (see the module docstring)."""
        if not self.path.exists():
            return "absent"
        if not self.path.is_dir():
            return "foreign"
        names = self._names()
        if INCOMPLETE in names:
            return "incomplete"
        if REPORT in names:
            return "finished"
        return "foreign" if names else "empty"

    def marker(self) -> dict[str, Any]:
        """What the INCOMPLETE marker records ({} if there is none).

        Raises:
            RunFolderError: the marker exists but is damaged (not the JSON object kbitprep writes).
        """
        path = self.path / INCOMPLETE
        if not path.exists():
            return {}
        try:
            marker = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            marker, problem = None, f"{type(error).__name__}: {error}"
        else:
            problem = "not the JSON object kbitprep writes"
        if not isinstance(marker, dict) or not isinstance(marker.get("settings"), dict):
            raise RunFolderError(f"{path}: damaged ({problem}); without it kbitprep cannot tell which settings "
                                 "the run used, so it will not resume it. Pass --overwrite to start again")
        return marker

    def recorded(self) -> set[str]:
        """The names kbitprep recorded writing into this folder (its manifest).

        Raises:
            RunFolderError: the manifest is damaged, so kbitprep cannot tell its files from others.
        """
        path = self.path / MANIFEST
        if not path.exists():
            return set()
        names: object = None
        try:
            names = json.loads(path.read_text(encoding="utf-8"))["written"]
            problem = "'written' is not a list of names"
        except (OSError, ValueError, KeyError, TypeError) as error:
            problem = f"{type(error).__name__}: {error}"
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise RunFolderError(f"{path}: damaged ({problem}); kbitprep cannot tell the "
                                 "files it wrote from yours, so it removes none: clear the folder yourself, or "
                                 "choose another --output")
        return set(names)

    def complete_checkpoints(self) -> list[Path]:
        """Checkpoint folders that were saved completely, oldest first."""
        return sorted((p for p in self._checkpoint_dirs() if (p / CHECKPOINT_COMPLETE).is_file()),
                      key=lambda p: checkpoint_step(p) or 0)

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        complete = self.complete_checkpoints()
        return complete[-1] if complete else None

    def _checkpoint_dirs(self) -> list[Path]:
        if not self.checkpoints_dir.is_dir():
            return []
        return [p for p in self.checkpoints_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]

    # --- claiming ----------------------------------------------------------------------

    def check_claim(self, *, overwrite: bool, resume: bool, inputs: Iterable[str | os.PathLike[str]] = (),
                    writes: Iterable[str] = RUN_NAMES) -> str:
        """Whether a run may start here; returns the state. Changes nothing.

        Args:
            overwrite (bool): the run replaces what a previous run wrote.
            resume (bool): the run continues the unfinished run here.
            inputs (Iterable[str | PathLike]): files and folders the run reads (model, data).
                Default: ()
            writes (Iterable[str]): the names the run writes into the folder. Default: RUN_NAMES

        Raises:
            RunFolderError: the folder holds a finished run (and not `overwrite`), an
                unfinished run (and neither `resume` nor `overwrite`), other files (and not
                `overwrite`), is a file, cannot be written; or `overwrite` would replace a
                file kbitprep did not write, or remove one the run reads.
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
        if resume and state == "incomplete":
            self.marker()  # a damaged marker is an error, never a fresh start
        if overwrite and self.path.is_dir():
            self._check_overwrite(inputs, writes)
        self._check_writable()
        return state

    def _check_overwrite(self, inputs: Iterable[str | os.PathLike[str]], writes: Iterable[str]) -> None:
        present = self._names()
        recorded = self.recorded() & present
        foreign = sorted((present - recorded) & set(writes))
        if foreign:
            raise RunFolderError(f"{self.path}: --overwrite would replace {', '.join(foreign)}, which kbitprep did "
                                 "not write (its manifest does not list them); move them out of the folder, or "
                                 "choose another --output")
        for item in inputs:
            for name in sorted(recorded):
                if _inside(item, self.path / name):
                    raise RunFolderError(f"{self.path / name}: holds {item}, which this run reads; --overwrite "
                                         "would delete it. Move it out of the run folder, or choose another --output")

    def _check_writable(self) -> None:
        existing = next((p for p in (self.path, *self.path.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            raise RunFolderError(f"{self.path}: cannot be created, {existing} is a file; choose another --output")
        if existing is None or not os.access(existing, os.W_OK | os.X_OK):
            raise RunFolderError(f"{self.path}: cannot be written (no write permission on {existing}); "
                                 "choose another --output")

    # --- the lock ----------------------------------------------------------------------

    def lock(self) -> dict[str, Any] | None:
        """Take the folder for this run (creating it if needed); `unlock` gives it back.

        Returns:
            dict | None: the holder record of a run that was killed while it held the
            folder (its lock is taken over), or None.

        Raises:
            RunLockedError: another run is live in the folder; the message names it.
            RunFolderError: the folder cannot be created or written.
        """
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"{self.path}: is a file, not a folder; choose another --output")
        self._check_writable()
        try:
            self._created = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RunFolderError(f"{self.path}: cannot be created ({error.strerror or error}); "
                                 "choose another --output") from None
        lock = _Lock(self.path)
        try:
            previous = lock.acquire()
        except BaseException:
            self._remove_if_made_and_empty()
            raise
        self._lock = lock
        return previous

    def unlock(self) -> None:
        """Give the folder back; a folder this run created and left empty is removed."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        self._remove_if_made_and_empty()

    def _remove_if_made_and_empty(self) -> None:
        if self._created:
            with contextlib.suppress(OSError):  # not empty, or already gone: leave it
                self.path.rmdir()

    @contextlib.contextmanager
    def locked(self) -> Iterator[dict[str, Any] | None]:
        """`lock`, then `unlock` whatever happens; yields what `lock` returns."""
        previous = self.lock()
        try:
            yield previous
        finally:
            self.unlock()

    # --- changing ----------------------------------------------------------------------

    def record(self, names: Iterable[str]) -> None:
        """Add names to the manifest, before they are created (a kill between leaves a record, not a stray file)."""
        recorded = self.recorded()
        new = set(names) - recorded
        if new:
            atomic_write_json(self.path / MANIFEST, {"format": _MANIFEST_FORMAT, "tool": "kbitprep",
                                                      "written": sorted(recorded | new)})

    def start(self, *, overwrite: bool, settings: Mapping[str, Any], writes: Iterable[str] = RUN_NAMES) -> None:
        """Make the folder hold an unfinished run: record what it writes, write INCOMPLETE, clear leftovers
        (and, with `overwrite`, what the previous run wrote).

        Call it after `lock` and `check_claim`. Without `overwrite`, existing checkpoints are kept (to resume from).
        """
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RunFolderError(f"{self.path}: cannot be created ({error.strerror or error}); "
                                 "choose another --output") from None
        self.record(writes)
        marker = {
            "status": "incomplete",
            "message": "This run has not finished (it is running, or it stopped early). "
                       "`kbitprep finetune ... --resume` continues it from its last complete checkpoint; "
                       "`--overwrite` starts again. Nothing in this folder is a finished result.",
            "settings": dict(settings),
        }
        # The marker goes in first: a run killed while the old files are removed is still marked.
        atomic_write_json(self.path / INCOMPLETE, marker)
        self.remove_leftovers()
        if overwrite:
            self.clear(keep=(INCOMPLETE,))

    def clear(self, *, keep: Iterable[str] = ()) -> None:
        """Remove what kbitprep recorded writing here (and nothing else), but the names in `keep`."""
        if not self.path.is_dir():
            return
        keep = set(keep)
        for name in sorted(self.recorded() - keep):
            _remove(self.path / name)
        self.remove_leftovers()

    def remove_leftovers(self) -> list[str]:
        """Delete temporary and staging names left by a run killed while writing; returns their names."""
        removed = []
        for entry in self.path.iterdir() if self.path.is_dir() else ():
            if _is_leftover(entry.name):
                _remove(entry)
                removed.append(entry.name)
        return removed

    def record_failure(self, error: BaseException) -> None:
        """Note in the INCOMPLETE marker why the run stopped."""
        try:
            marker = self.marker() or {"status": "incomplete", "settings": {}}
        except RunFolderError:
            return
        marker["error"] = f"{type(error).__name__}: {error}"
        with contextlib.suppress(OSError):
            atomic_write_json(self.path / INCOMPLETE, marker)

    def abandon(self, error: BaseException, state_before: str) -> None:
        """After a failure: keep a marked INCOMPLETE run if it holds something worth resuming,
        else remove what this run wrote (and the folder, if this run created it and it is empty)."""
        self.remove_incomplete_checkpoints()  # a checkpoint cut short (a full disk) only takes space
        self.remove_leftovers()
        if self.latest_checkpoint() is not None or state_before == "incomplete":
            self.record_failure(error)
            return
        self.clear()
        with contextlib.suppress(FileNotFoundError):
            (self.path / MANIFEST).unlink()  # the folder holds nothing of kbitprep's any more

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
        self.remove_leftovers()


_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_WORDS = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")
_WRITE_FAILED_WORDS = ("file write failed", "inline_container")  # torch's zip writer, which names no cause
_NEARLY_FULL_BYTES = 1 << 20


def _disk_full(error: BaseException, path: Path) -> bool:
    """Whether `error` means the disk holding `path` is full.

    Python, safetensors and torch each report a full disk differently: an OSError with
    ENOSPC, a SafetensorError quoting "os error 28", and a RuntimeError from torch's zip
    writer that only says a write failed; that last one counts when the disk has
    (almost) no room left.
    """
    chain: list[BaseException] = []
    link: BaseException | None = error
    while link is not None and link not in chain:
        chain.append(link)
        link = link.__cause__ or link.__context__
    if any(getattr(e, "errno", None) in _DISK_FULL_ERRNOS for e in chain):
        return True
    text = " ".join(str(e) for e in chain)
    if any(word in text for word in _DISK_FULL_WORDS):
        return True
    if not any(word in text for word in _WRITE_FAILED_WORDS):
        return False
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    try:
        stats = os.statvfs(existing)
    except OSError:  # cannot tell: the original error stands
        return False
    return stats.f_bavail * stats.f_frsize < _NEARLY_FULL_BYTES


def explain_write_failure(error: BaseException, folder: RunFolder) -> BaseException:
    """`error` itself, or, when it means the disk is full, a `RunFolderError` saying so and what to do.

    Call it after `RunFolder.abandon`, so the checkpoint it names is the one a resume continues from.
    """
    if isinstance(error, KbitPrepError) or not isinstance(error, Exception) or not _disk_full(error, folder.path):
        return error
    latest = folder.latest_checkpoint()
    resume = (f"then `--resume` continues from {latest.name}" if latest is not None
              else "then run again (no checkpoint was complete yet)")
    return RunFolderError(f"{folder.path}: the disk is full (no space left while writing the run's files); "
                          f"free some space on it, or choose an --output on another disk; {resume}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
