"""What a finished fine-tuning run did: `FinetuneReport`, written as the run folder's report.json."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from .folder import REPORT

__all__ = ["FinetuneReport", "loss_history", "package_versions", "read_report"]

_VERSIONED_PACKAGES = ("kbitprep", "torch", "transformers", "peft", "bitsandbytes", "accelerate")


@dataclasses.dataclass(frozen=True)
class FinetuneReport:
    """What a finished run did: written as report.json and rendered by the CLI.

    Args:
        settings (dict): the run's settings.
        plan (dict): kbitprep's preparation plan (`PreparationPlan.to_dict()`).
        model (dict): architecture, compute dtype, parameter counts.
        loss (dict): how the loss was computed (`LossPlan.to_dict()`: "chunked" or "full", and the
            reason when the chunked loss could not be used) and the measured peak memory.
        data (dict): rows read, examples kept, rows truncated or dropped.
        loss_history (list[dict]): one entry per optimizer step: step, loss, learning_rate, grad_norm;
            a preference run (settings' "method" dpo or orpo) adds its rewards (`REWARD_KEYS`: the
            chosen and rejected completions' mean rewards, their margin, how often chosen wins).
        batch_loss_before (float): loss on the first batch (file order) before training.
        batch_loss_after (float): the same batch after training; the saved adapter reproduces it.
        samples (list[dict]): prompt, completion before, completion after.
        resumed_from_step (int | None): the checkpoint step the run continued from.
        world_size (int): number of training processes.
        timings (dict[str, float]): seconds per phase.
        versions (dict[str, str]): package versions.
        files (dict[str, str]): the run's output files.
        memory (dict): the memory model's predicted peak (`MemoryEstimate.to_dict()` under
            "predicted", or "why_not_predicted") beside the peak of live tensor bytes measured from
            preparation to the end of training ("measured_peak_bytes", "measured_by"), and the
            prediction's error in percent.
        eval_history (list[dict]): one entry per evaluation: step, loss, perplexity (empty
            without --eval-data or --eval-fraction). Default: []
    """

    settings: dict[str, Any]
    plan: dict[str, Any]
    model: dict[str, Any]
    loss: dict[str, Any]
    data: dict[str, Any]
    loss_history: list[dict[str, float]]
    batch_loss_before: float
    batch_loss_after: float
    samples: list[dict[str, str]]
    resumed_from_step: int | None
    world_size: int
    timings: dict[str, float]
    versions: dict[str, str]
    files: dict[str, str]
    memory: dict[str, Any] = dataclasses.field(default_factory=dict)
    eval_history: list[dict[str, float]] = dataclasses.field(default_factory=list)

    @property
    def loss_drop(self) -> float:
        """Fractional fall of the first batch's loss: 0.4 means 40% lower after training."""
        return 1.0 - self.batch_loss_after / self.batch_loss_before if self.batch_loss_before else 0.0

    @property
    def steps(self) -> int:
        return int(self.loss_history[-1]["step"]) if self.loss_history else 0

    def to_dict(self) -> dict[str, Any]:
        return {"status": "finished", **dataclasses.asdict(self), "loss_drop": self.loss_drop, "steps": self.steps}


def read_report(output: str | os.PathLike[str]) -> dict[str, Any]:
    """The report.json of a finished run."""
    return json.loads((Path(output) / REPORT).read_text(encoding="utf-8"))


def loss_history(log_history: Sequence[dict[str, Any]]) -> list[dict[str, float]]:
    """One entry per optimizer step (step, loss, learning_rate, grad_norm, and a preference run's rewards)
    from a step loop's log."""
    from ...loss.preference import REWARD_KEYS

    history: dict[int, dict[str, float]] = {}
    for entry in log_history:
        if "loss" in entry and "step" in entry:
            history[int(entry["step"])] = {"step": int(entry["step"]), "loss": float(entry["loss"]),
                                           "learning_rate": float(entry.get("learning_rate", 0.0))}
            if entry.get("grad_norm") is not None:  # the norm before clipping, as both step loops log it
                history[int(entry["step"])]["grad_norm"] = float(entry["grad_norm"])
            history[int(entry["step"])] |= {key: float(entry[key]) for key in REWARD_KEYS if key in entry}
    return [history[step] for step in sorted(history)]


def package_versions() -> dict[str, str]:
    """The versions of Python and of the packages a run depends on."""
    versions = {"python": platform.python_version()}
    for package in _VERSIONED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions
