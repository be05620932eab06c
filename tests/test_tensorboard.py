"""`--report-to tensorboard`: the run's per-step log in RUN/tensorboard/, read back with tensorboard's own reader.

A short Trainer-path run with evaluation and a cosine schedule after a warm-up; the event
files must hold every tag for every step, with the values report.json records (the loss
and learning rate of loss_history, the eval loss of eval_history), stored as float32 as
TensorBoard stores them. The sharded path's log is checked in tests/test_fsdp.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

STEPS = 6


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kbitprep.app.demo import DEMO_DATA, build_tiny_model
    from kbitprep.app.training.run import FinetuneSettings, finetune

    root = tmp_path_factory.mktemp("tensorboard")
    model = build_tiny_model(root / "model")
    settings = FinetuneSettings(str(model), str(DEMO_DATA), str(root / "run"), max_steps=STEPS, batch_size=4,
                                seq_len=48, lora_r=4, lora_alpha=8, lr=1e-2, lr_scheduler="cosine", warmup_ratio=0.2,
                                eval_fraction=0.2, eval_steps=3, report_to="tensorboard", loss="full")
    finetune(settings)
    return root / "run"


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def as_float32(values: list[float]) -> list[float]:
    return [float(np.float32(value)) for value in values]


@pytest.mark.slow
def test_tensorboard_holds_each_step_with_the_reported_values(tensorboard_run: Path) -> None:
    report = json.loads((tensorboard_run / "report.json").read_text())
    logged = scalars(tensorboard_run)
    assert set(logged) == {"train/loss", "train/learning_rate", "train/grad_norm", "eval/loss",
                           "memory/peak_bytes", "memory/predicted_peak_bytes"}
    steps = list(range(1, STEPS + 1))
    for tag in ("train/loss", "train/learning_rate", "train/grad_norm", "memory/peak_bytes"):
        assert [step for step, _ in logged[tag]] == steps, tag
    history = report["loss_history"]
    assert [value for _, value in logged["train/loss"]] == as_float32([e["loss"] for e in history])
    assert [value for _, value in logged["train/learning_rate"]] == as_float32([e["learning_rate"] for e in history])
    assert history[0]["learning_rate"] == 0.0 and history[2]["learning_rate"] == pytest.approx(1e-2)  # 2 warm-up steps
    assert all(value > 0 for _, value in logged["train/grad_norm"])
    assert logged["eval/loss"] == list(zip([3, 6], as_float32([e["loss"] for e in report["eval_history"]]),
                                           strict=True))
    assert logged["memory/predicted_peak_bytes"] == [(0, float(np.float32(report["memory"]["predicted_peak_bytes"])))]
    peaks = [value for _, value in logged["memory/peak_bytes"]]
    assert peaks == sorted(peaks) and peaks[-1] > 0  # a running peak never falls


@pytest.mark.slow
def test_the_tensorboard_folder_is_the_runs_own(tensorboard_run: Path) -> None:
    manifest = json.loads((tensorboard_run / ".kbitprep-manifest.json").read_text())
    assert {"tensorboard", "run.yaml"} <= set(manifest["written"])  # --overwrite removes them with the run
    assert [p.name.startswith("events.out.tfevents.") for p in (tensorboard_run / "tensorboard").iterdir()] == [True]
