"""The run folder's guarantees, without a model: kbitprep deletes only what it wrote, one run
holds a folder at a time (and a killed run's hold is taken over), a damaged record is an
error, and leftovers of a run killed while writing are cleaned up by the next one."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kbitprep.app.runs.folder import (
    BASE_MODEL_DIR,
    INCOMPLETE,
    LOCK,
    MANIFEST,
    OWNER,
    RUN_NAMES,
    RunFolder,
    RunFolderError,
    RunLockedError,
    atomic_directory,
    atomic_write_bytes,
    file_fingerprint,
)
from kbitprep.errors import KbitPrepError


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def finished_run(path: Path, writes: tuple[str, ...] = RUN_NAMES) -> RunFolder:
    """A run folder as a finished run leaves it, written through the RunFolder methods."""
    run = RunFolder(path)
    with run.locked():
        run.check_claim(overwrite=False, resume=False)
        run.start(overwrite=False, settings={"lr": 0.1}, writes=writes)
        (run.path / "adapter").mkdir()
        (run.path / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
        atomic_write_bytes(run.path / "loss.png", b"png")
        run.finish({"status": "finished"})
    return run


# --- only what kbitprep wrote ----------------------------------------------------------------


def test_a_finished_run_records_what_it_wrote_and_holds_no_lock(tmp_path: Path) -> None:
    run = finished_run(tmp_path / "run")
    assert sorted(p.name for p in run.path.iterdir()) == [MANIFEST, "adapter", "loss.png", "report.json"]
    assert run.recorded() == set(RUN_NAMES) and run.state() == "finished"
    assert isinstance(RunFolderError("x"), KbitPrepError)


def test_overwrite_removes_only_recorded_names(tmp_path: Path) -> None:
    run = finished_run(tmp_path / "run")
    (run.path / "notes.txt").write_text("mine")
    (run.path / "my-model").mkdir()
    (run.path / "my-model" / "config.json").write_text("{}")
    with run.locked():
        assert run.check_claim(overwrite=True, resume=False) == "finished"
        run.start(overwrite=True, settings={})
    assert sorted(p.name for p in run.path.iterdir()) == [MANIFEST, INCOMPLETE, "my-model", "notes.txt"]
    assert (run.path / "my-model" / "config.json").read_text() == "{}"


def test_overwrite_refuses_to_replace_a_users_own_adapter_before_touching_anything(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"the user's adapter")
    (folder / "report.json").write_text('{"mine": true}')  # looks like a finished run, is not kbitprep's
    before = tree(folder)
    run = RunFolder(folder)
    with run.locked(), pytest.raises(RunFolderError, match=r"would replace adapter, report.json, which kbitprep "
                                                           r"did not write.*move them out"):
        run.check_claim(overwrite=True, resume=False)
    assert tree(folder) == before


def test_overwrite_refuses_when_a_recorded_name_holds_the_model_the_run_reads(tmp_path: Path) -> None:
    """The demo's layout: base-model/ inside the run folder, recorded as kbitprep's. A
    finetune of that model with --output on the same folder must not delete it."""
    run = finished_run(tmp_path / "demo", writes=(*RUN_NAMES, BASE_MODEL_DIR))
    (run.path / BASE_MODEL_DIR).mkdir()
    (run.path / BASE_MODEL_DIR / "config.json").write_text("{}")
    before = tree(run.path)
    with run.locked(), pytest.raises(RunFolderError, match=r"base-model: holds .*base-model, which this run reads; "
                                                           r"--overwrite would delete it"):
        run.check_claim(overwrite=True, resume=False, inputs=[run.path / BASE_MODEL_DIR, tmp_path / "d.jsonl"])
    assert tree(run.path) == before
    # A user's own model folder of that name (not recorded) is no obstacle: it is kept.
    (run.path / MANIFEST).write_text(json.dumps({"format": 1, "written": sorted(RUN_NAMES)}))
    with run.locked():
        run.check_claim(overwrite=True, resume=False, inputs=[run.path / BASE_MODEL_DIR])
        run.start(overwrite=True, settings={})
    assert (run.path / BASE_MODEL_DIR / "config.json").read_text() == "{}"


def test_a_damaged_manifest_deletes_nothing(tmp_path: Path) -> None:
    run = finished_run(tmp_path / "run")
    (run.path / MANIFEST).write_text('{"written": "adapter"')
    before = tree(run.path)
    with run.locked(), pytest.raises(RunFolderError, match=r"\.kbitprep-manifest\.json: damaged .*removes none"):
        run.check_claim(overwrite=True, resume=False)
    assert tree(run.path) == before


def test_a_failed_first_run_removes_what_it_wrote_and_the_folder_it_made(tmp_path: Path) -> None:
    run = RunFolder(tmp_path / "new" / "run")
    with run.locked():
        state = run.check_claim(overwrite=False, resume=False)
        run.start(overwrite=False, settings={})
        (run.checkpoints_dir / "checkpoint-5").mkdir(parents=True)  # cut short: no completeness marker
        run.abandon(RuntimeError("boom"), state)
    assert not run.path.exists() and (tmp_path / "new").is_dir()


def test_a_failed_overwrite_of_a_foreign_folder_keeps_the_users_files(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    run = RunFolder(folder)
    with run.locked():
        state = run.check_claim(overwrite=True, resume=False)
        run.start(overwrite=True, settings={})
        run.abandon(RuntimeError("boom"), state)
    assert tree(folder) == {"notes.txt": b"mine"}


# --- damaged markers and leftovers -------------------------------------------------------------


@pytest.mark.parametrize("content", ["", "{\"status\": \"incompl", "[]", '{"status": "incomplete"}'])
def test_a_damaged_incomplete_marker_is_an_error_not_a_fresh_start(tmp_path: Path, content: str) -> None:
    run = RunFolder(tmp_path / "run")
    with run.locked():
        run.start(overwrite=False, settings={"lr": 0.1})
    (run.path / INCOMPLETE).write_text(content)
    with run.locked():
        with pytest.raises(RunFolderError, match=r"INCOMPLETE: damaged .*will not resume it. Pass --overwrite"):
            run.check_claim(overwrite=False, resume=True)
        assert run.check_claim(overwrite=True, resume=False) == "incomplete"


def test_leftovers_of_a_killed_write_are_removed_by_the_next_start(tmp_path: Path) -> None:
    run = RunFolder(tmp_path / "run")
    with run.locked():
        run.start(overwrite=False, settings={})
    # What a kill inside atomic_write_bytes and atomic_directory leaves behind.
    (run.path / ".kbitprep-tmp-report.json-x1y2").write_bytes(b"")
    (run.path / ".kbitprep-staging-adapter-abc").mkdir()
    (run.path / ".kbitprep-staging-adapter-abc" / "adapter_model.safetensors").write_bytes(b"half")
    assert run.state() == "incomplete"
    with run.locked():
        run.check_claim(overwrite=False, resume=True)
        run.start(overwrite=False, settings={})
    assert sorted(p.name for p in run.path.iterdir()) == [MANIFEST, INCOMPLETE]


def test_atomic_writes_leave_no_temporary_name_when_they_fail(tmp_path: Path, monkeypatch) -> None:
    from kbitprep.app.runs import atomic as outputs

    def disk_full(handle, data):
        handle.write(data[:3])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs, "_write_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        atomic_write_bytes(tmp_path / "report.json", b"{}\n{}\n")
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "adapter") as staging:
        (staging / "w").write_bytes(b"half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_file_fingerprint_is_the_content_hash(tmp_path: Path) -> None:
    import hashlib

    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a"}\n' * 100_000)
    assert file_fingerprint(path) == hashlib.sha256(path.read_bytes()).hexdigest()


# --- one run per folder ----------------------------------------------------------------------


def test_a_second_run_on_a_live_folder_fails_at_once_naming_the_live_run(tmp_path: Path) -> None:
    live, second = RunFolder(tmp_path / "run"), RunFolder(tmp_path / "run")
    with live.locked():
        live.start(overwrite=False, settings={})
        owner = json.loads((live.path / OWNER).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        before = tree(live.path)
        for attempt in range(2):  # the refusal itself changes nothing, however often it happens
            with pytest.raises(RunLockedError, match=rf"another kbitprep run is live in this folder \(pid "
                                                     rf"{os.getpid()} on .*, started .* UTC"):
                second.lock()
        assert tree(live.path) == before
    assert not (live.path / LOCK).exists() and not (live.path / OWNER).exists()
    with second.locked() as previous:
        assert previous is None  # released cleanly: nothing to take over


LOCK_AND_SLEEP = textwrap.dedent("""
    import sys, time
    from kbitprep.app.runs.folder import RunFolder
    folder = RunFolder(sys.argv[1])
    folder.lock()
    print("locked", flush=True)
    time.sleep(60)
""")


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen([sys.executable, "-c", LOCK_AND_SLEEP, str(folder)], stdout=subprocess.PIPE,
                               text=True, env=env)
    try:
        assert process.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=rf"pid {process.pid} on "):
            RunFolder(folder).lock()
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stdout.close()
    assert (folder / OWNER).exists()  # the killed run could not clean up
    run = RunFolder(folder)
    with run.locked() as previous:
        assert previous is not None and previous["pid"] == process.pid
        assert json.loads((folder / OWNER).read_text())["pid"] == os.getpid()


def test_a_lock_still_held_after_its_run_died_says_so(tmp_path: Path) -> None:
    """The recorded run is gone but something (a process it started) still holds the lock."""
    holder = RunFolder(tmp_path / "run")
    with holder.locked():
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                              check=True)
        record = json.loads((holder.path / OWNER).read_text())
        (holder.path / OWNER).write_text(json.dumps({**record, "pid": int(dead.stdout)}))
        with pytest.raises(RunLockedError, match=r"has ended, but a process it started still holds"):
            RunFolder(holder.path).lock()


def test_lock_on_an_unwritable_path_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunFolderError, match=r"cannot be created, .*file is a file"):
        RunFolder(tmp_path / "file" / "run").lock()
    with pytest.raises(RunFolderError, match="is a file, not a folder"):
        RunFolder(tmp_path / "file").lock()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
