"""Runs `kbitprep` with a fault injected at a chosen write: the process kills itself (SIGKILL)
halfway through writing a file, or the write fails as on a full disk, or the run pauses there.

Used by tests/test_faults.py as `python fault_driver.py JOBS.json`. The heavy modules are
imported once, then each job runs in a forked child (no torch computation happens before
the fork, so the child starts clean), which keeps a dozen faulted runs within seconds.

Each job is a JSON object:
    name     a label; the child's output goes to `<log_dir>/<name>.log`
    argv     the `kbitprep` arguments
    fault    "kill", "disk-full" or "pause"
    kind     the write to fault: "write" (kbitprep's own files), "safetensors" (weights,
             adapters), "torch-save" (optimizer, scheduler, RNG states)
    match    a regular expression the written file's path must match
    pause    for "pause": the file to create when paused; the run goes on once
             `<pause>.go` exists

The driver prints one JSON line per job as it ends: {"name", "signal": int | null, "code": int | null}.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import sys
import time

import safetensors
import safetensors.torch
import torch

ORIGINAL_SAVE_FILE = safetensors.torch.save_file
ORIGINAL_TORCH_SAVE = torch.save
FAULT: dict = {}


def _matches(kind: str, path: object) -> bool:
    return bool(FAULT) and FAULT["kind"] == kind and re.search(FAULT["match"], os.fspath(path)) is not None


def _fault(path: str, data: bytes, write) -> None:
    """Half the bytes reach the disk, then the fault."""
    if FAULT["fault"] == "pause":
        FAULT.clear()  # once
        open(PAUSE, "w").close()
        while not os.path.exists(PAUSE + ".go"):
            time.sleep(0.02)
        return
    write(data[: len(data) // 2])
    if FAULT["fault"] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    FAULT.clear()
    if FAULT_KIND == "safetensors":  # what safetensors raises when the disk is full
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    raise OSError(28, "No space left on device", path)


def _write_to(path: str):
    def write(data: bytes) -> None:
        with open(path, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    return write


def save_file(tensors, filename, metadata=None):
    if _matches("safetensors", filename):
        _fault(os.fspath(filename), safetensors.torch.save(tensors, metadata=metadata), _write_to(os.fspath(filename)))
    return ORIGINAL_SAVE_FILE(tensors, filename, metadata=metadata)


def torch_save(obj, f, *args, **kwargs):
    if isinstance(f, (str, os.PathLike)) and _matches("torch-save", f):
        buffer = io.BytesIO()
        ORIGINAL_TORCH_SAVE(obj, buffer)
        _fault(os.fspath(f), buffer.getvalue(), _write_to(os.fspath(f)))
    return ORIGINAL_TORCH_SAVE(obj, f, *args, **kwargs)


# Installed before transformers and peft import them by name.
safetensors.torch.save_file = save_file
torch.save = torch_save

import bitsandbytes  # noqa: F401 - imported once, before the forks
import matplotlib.backends.backend_agg  # noqa: F401
import peft  # noqa: F401
import transformers
from transformers import Trainer  # noqa: F401

from kbitprep.app.runs import atomic as outputs
from kbitprep.cli import main

ORIGINAL_WRITE_FILE = outputs._write_file
PAUSE = ""
FAULT_KIND = ""


def write_file(handle, data: bytes) -> None:
    if _matches("write", handle.name):
        def write(part: bytes) -> None:
            ORIGINAL_WRITE_FILE(handle, part)
        _fault(handle.name, data, write)
    ORIGINAL_WRITE_FILE(handle, data)


outputs._write_file = write_file


def run_child(job: dict, log_dir: str) -> None:
    global PAUSE, FAULT_KIND
    log = os.open(os.path.join(log_dir, f"{job['name']}.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    torch.set_num_threads(1)
    FAULT.update(job)
    PAUSE, FAULT_KIND = job.get("pause", ""), job["kind"]
    try:
        code = main(job["argv"])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def run(jobs_file: str) -> None:
    with open(jobs_file) as handle:
        spec = json.load(handle)
    transformers.utils.logging.disable_progress_bar()
    for job in spec["jobs"]:
        pid = os.fork()
        if pid == 0:
            run_child(job, spec["log_dir"])
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"name": job["name"], "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                          "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}), flush=True)


if __name__ == "__main__":
    run(sys.argv[1])
