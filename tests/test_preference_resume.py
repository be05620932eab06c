"""A preference run killed after its first checkpoint and resumed ends bit-identical to an uninterrupted one.

The run (DPO or ORPO on the demo pairs, dropout on, so the resumed RNG state matters) is
killed by tests/fault_driver.py halfway through writing its step-4 checkpoint; `--resume`
continues from checkpoint-2. Its adapter, its losses and its rewards per step must equal
those of the run that was never stopped, bit for bit. The resumes and the reference runs
happen in this process, on one thread, as in tests/test_faults.py.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from kbitprep.loss import REWARD_KEYS
from test_faults import Driver, adapter, run_in_process

METHODS = ("dpo", "orpo")
RUN = ["--max-steps", "4", "--save-steps", "2", "--seq-len", "32", "--batch-size", "4", "--lr", "1e-2",
       "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0.1", "--beta", "0.5"]


@pytest.fixture(scope="module")
def space(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kbitprep.app.demo import build_tiny_model

    root = tmp_path_factory.mktemp("preference-resume")
    build_tiny_model(root / "model")
    return root


def argv(space: Path, output: Path, method: str, *extra: str) -> list[str]:
    from kbitprep.app.demo import DEMO_PREFERENCE_DATA

    return ["finetune", str(space / "model"), str(DEMO_PREFERENCE_DATA), "--output", str(output), "--method", method,
            *RUN, *extra]


@pytest.fixture(scope="module")
def killed(space: Path):
    """Each method's run, killed halfway through its step-4 checkpoint's completeness marker."""
    jobs = [{"name": method, "argv": argv(space, space / method, method), "fault": "kill", "kind": "write",
             "match": r"checkpoint-4/\.kbitprep-tmp-kbitprep-complete"} for method in METHODS]
    running = Driver(space, jobs)
    yield running
    running.close()


def history(run: Path) -> list[dict]:
    return json.loads((run / "report.json").read_text())["loss_history"]


@pytest.mark.parametrize("method", METHODS)
def test_a_killed_preference_run_resumed_equals_an_uninterrupted_one(method: str, space: Path, killed: Driver) -> None:
    run = space / method
    assert killed.result(method)["signal"] == signal.SIGKILL, (space / f"{method}.log").read_text()
    assert not (run / "report.json").exists() and (run / "INCOMPLETE").is_file()
    assert run_in_process(argv(space, run, method, "--resume")) == 0
    record = json.loads((run / "report.json").read_text())
    assert record["resumed_from_step"] == 2 and record["settings"]["method"] == method

    straight = space / f"{method}-straight"
    assert run_in_process(argv(space, straight, method)) == 0
    got, want = adapter(run), adapter(straight)
    assert got.keys() == want.keys()
    assert all(got[name].equal(want[name]) for name in want), method  # bit for bit
    resumed, expected = history(run), history(straight)
    assert [e["step"] for e in resumed] == [1, 2, 3, 4]
    keys = ("loss", *REWARD_KEYS)
    assert [[e[k] for k in keys] for e in resumed] == [[e[k] for k in keys] for e in expected]
    # the steps after the resume moved the adapter: the comparison is not of two untrained ones
    assert expected[-1]["rewards/margins"] != expected[1]["rewards/margins"]
