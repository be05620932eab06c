"""Fault injection: runs killed (SIGKILL) in the middle of each kind of write, a disk that fills
during a checkpoint, and two runs on one folder. After each, nothing the user had is lost,
nothing half-written looks finished, and `--resume` ends with an adapter bit-identical to
an uninterrupted run.

The faulted runs go through tests/fault_driver.py, which imports the heavy modules once
and forks one child per fault; each child kills itself halfway through the chosen write
(half the bytes on disk, as a real kill leaves them). The kill points are chosen, not
random, so every kind of write is covered on every run of the suite: the run folder's
own files (INCOMPLETE, a checkpoint's completeness marker, loss.png, report.json), the
Trainer's checkpoint files (the adapter weights, the optimizer state) and the final
adapter. Resumes and the reference run happen in this process, on one thread, so the
comparison is bitwise.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import as_a_subprocess_computes

from kbitprep.app.runs.folder import MANIFEST, OWNER

DRIVER = Path(__file__).with_name("fault_driver.py")
ALPHABET = "abcdefghijklmnopqrstuvwxyz"
# Checkpoints at steps 2 and 4 (the last); dropout on, so the resumed RNG state matters.
RUN = ["--max-steps", "4", "--save-steps", "2", "--seq-len", "32", "--batch-size", "4", "--lr", "1e-2",
       "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0.1"]
FINISHED = [MANIFEST, "adapter", "loss.png", "report.json", "run.yaml"]

# name: (kind of write, path it matches); the run is killed halfway through that write.
KILLS = {
    "incomplete-marker": ("write", r"INCOMPLETE"),
    "run-file": ("write", r"tmp-run\.yaml"),
    "checkpoint-adapter": ("safetensors", r"checkpoint-2/adapter_model\.safetensors$"),
    "checkpoint-optimizer": ("torch-save", r"checkpoint-2/optimizer\.pt$"),
    "checkpoint-marker": ("write", r"checkpoint-4/\.kbitprep-tmp-kbitprep-complete"),
    "final-adapter": ("safetensors", r"staging-adapter-[^/]*/adapter_model\.safetensors$"),
    "loss-plot": ("write", r"tmp-loss\.png"),
    "report": ("write", r"tmp-report\.json"),
}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def digest(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def space(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kbitprep.app.demo import build_tiny_model

    root = tmp_path_factory.mktemp("faults")
    build_tiny_model(root / "model")
    write_jsonl(root / "data.jsonl", [{"text": "".join(ALPHABET[(i + k) % 26] for k in range(12 + i % 9))}
                                      for i in range(16)])
    return root


def finetune_argv(space: Path, output: Path, *extra: str) -> list[str]:
    return ["finetune", str(space / "model"), str(space / "data.jsonl"), "--output", str(output), *RUN, *extra]


def run_in_process(argv: list[str]) -> int:
    import torch

    from kbitprep.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the driver's children: the same reductions, the same bits
    try:
        with as_a_subprocess_computes():  # and the same precisions
            return main(argv)
    finally:
        torch.set_num_threads(threads)


def adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


class Driver:
    """tests/fault_driver.py running a list of jobs; `result(name)` waits for that job to end."""

    def __init__(self, space: Path, jobs: list[dict]) -> None:
        spec = space / "jobs.json"
        spec.write_text(json.dumps({"log_dir": str(space), "jobs": jobs}))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "KBITPREP_DEBUG": "", "PYTHONPATH": os.pathsep.join(sys.path)}
        self.process = subprocess.Popen([sys.executable, str(DRIVER), str(spec)], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, env=env)
        self.results: dict[str, dict] = {}

    def result(self, name: str) -> dict:
        while name not in self.results:
            line = self.process.stdout.readline()
            if not line:
                self.process.wait(timeout=60)
                raise AssertionError(f"the fault driver ended without {name}: {self.process.stderr.read()[-3000:]}")
            if line.startswith("{"):
                entry = json.loads(line)
                self.results[entry.pop("name")] = entry
        return self.results[name]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate()


@pytest.fixture(scope="module")
def reference(space: Path) -> Path:
    """The uninterrupted run every resumed run must equal."""
    assert run_in_process(finetune_argv(space, space / "reference")) == 0
    return space / "reference"


@pytest.fixture(scope="module")
def driver(space: Path):
    """One driver for every faulted run: each kill point, the full disk, then a run that pauses
    at its first checkpoint (the live run of the concurrency test) until told to go on."""
    jobs = [{"name": name, "argv": finetune_argv(space, space / name), "fault": "kill", "kind": kind, "match": match}
            for name, (kind, match) in KILLS.items()]
    jobs.append({"name": "disk-full", "argv": finetune_argv(space, space / "disk-full"), "fault": "disk-full",
                 "kind": "safetensors", "match": r"checkpoint-4/adapter_model\.safetensors$"})
    jobs.append({"name": "demo", "argv": ["demo", "--output", str(space / "demo"), "--max-steps", "4"],
                 "fault": "kill", "kind": "write", "match": r"tmp-report\.json"})
    jobs.append({"name": "live", "argv": finetune_argv(space, space / "live"), "fault": "pause", "kind": "write",
                 "match": r"checkpoint-2/\.kbitprep-tmp-kbitprep-complete", "pause": str(space / "live.paused")})
    running = Driver(space, jobs)
    yield running
    (space / "live.paused.go").touch()
    running.close()


@pytest.mark.parametrize("point", list(KILLS))
def test_killed_mid_write_then_resumed_equals_an_uninterrupted_run(point: str, space: Path, reference: Path,
                                                                    driver: Driver) -> None:
    inputs = digest(space / "model"), (space / "data.jsonl").read_bytes()
    run = space / point
    assert driver.result(point)["signal"] == signal.SIGKILL, (space / f"{point}.log").read_text()
    # Killed: nothing looks finished; the run is marked unfinished once the marker is whole.
    assert not (run / "report.json").exists()
    if point != "incomplete-marker":
        assert (run / "INCOMPLETE").is_file() and json.loads((run / "INCOMPLETE").read_text())["settings"]

    assert run_in_process(finetune_argv(space, run, "--resume")) == 0
    report = json.loads((run / "report.json").read_text())
    expected = json.loads((reference / "report.json").read_text())
    assert report["steps"] == 4 and [e["step"] for e in report["loss_history"]] == [1, 2, 3, 4]
    assert [e["loss"] for e in report["loss_history"]] == [e["loss"] for e in expected["loss_history"]]
    got, want = adapter(run), adapter(reference)
    assert got.keys() == want.keys()
    assert all(got[name].equal(want[name]) for name in want), point  # bit for bit
    # Nothing half-written or temporary is left, and the inputs are untouched.
    assert sorted(p.name for p in run.iterdir()) == FINISHED
    assert not [p for p in run.rglob("*") if ".kbitprep-tmp-" in p.name or ".kbitprep-staging-" in p.name]
    assert (digest(space / "model"), (space / "data.jsonl").read_bytes()) == inputs


def test_a_disk_full_during_a_checkpoint_is_named_and_resumable(space: Path, reference: Path,
                                                               driver: Driver) -> None:
    run = space / "disk-full"
    result = driver.result("disk-full")
    log = (space / "disk-full.log").read_text()
    assert result == {"signal": None, "code": 1}, log
    assert "Traceback" not in log
    [line] = [line for line in log.splitlines() if "error" in line]
    assert "the disk is full" in line and "`--resume` continues from checkpoint-2" in line, line
    # The checkpoint cut short is gone (it only takes space); the complete one is kept.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-2"]
    assert "disk is full" in json.loads((run / "INCOMPLETE").read_text())["error"]

    assert run_in_process(finetune_argv(space, run, "--resume")) == 0
    got, want = adapter(run), adapter(reference)
    assert all(got[name].equal(want[name]) for name in want)


def test_two_runs_on_one_folder(space: Path, reference: Path, driver: Driver,
                                capsys: pytest.CaptureFixture[str]) -> None:
    """A run paused at its first checkpoint is live; every other run on its folder fails at once,
    names it and changes nothing; the live run then finishes as if alone."""
    run, pause = space / "live", space / "live.paused"
    deadline = time.monotonic() + 180
    while not pause.exists():
        assert driver.process.poll() is None and time.monotonic() < deadline, driver.results
        time.sleep(0.05)
    try:
        owner = json.loads((run / OWNER).read_text())
        before = digest(run)
        for extra in ([], ["--overwrite"], ["--resume"]):
            capsys.readouterr()
            assert run_in_process(finetune_argv(space, run, *extra)) == 1
            [line] = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
            assert f"another kbitprep run is live in this folder (pid {owner['pid']} on" in line, line
            assert digest(run) == before
    finally:
        (space / "live.paused.go").touch()
    assert driver.result("live") == {"signal": None, "code": 0}, (space / "live.log").read_text()
    assert sorted(p.name for p in run.iterdir()) == FINISHED
    got, want = adapter(run), adapter(reference)
    assert all(got[name].equal(want[name]) for name in want)


def test_an_interrupted_demo_resumes_and_overwrites(space: Path, driver: Driver,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The demo's own base model lives in its run folder, recorded as kbitprep's: a resumed demo
    keeps it, an overwriting one rebuilds it, and the message after a kill names a flag demo has."""
    run = space / "demo"
    assert driver.result("demo")["signal"] == signal.SIGKILL, (space / "demo.log").read_text()
    base = digest(run / "base-model")
    capsys.readouterr()
    assert run_in_process(["demo", "--output", str(run), "--max-steps", "4"]) == 1
    [line] = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert "unfinished run" in line and "--resume" in line, line
    assert run_in_process(["demo", "--output", str(run), "--max-steps", "4", "--resume"]) == 0
    assert json.loads((run / "report.json").read_text())["steps"] == 4 and digest(run / "base-model") == base
    assert run_in_process(["demo", "--output", str(run), "--max-steps", "4", "--overwrite"]) == 0
    assert sorted(p.name for p in run.iterdir()) == sorted([*FINISHED, "base-model"])
    assert digest(run / "base-model") == base  # rebuilt from the same seed
