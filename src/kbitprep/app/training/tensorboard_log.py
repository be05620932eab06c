"""`--report-to tensorboard`: a run's per-step log as TensorBoard scalars, in the run folder's tensorboard/.

    tag                          step        from
    train/loss                   each step   the step's logged loss (report.json's loss_history)
    train/learning_rate          each step   the learning rate the step used
    train/grad_norm              each step   the gradient norm before clipping
    train/rewards/chosen, ...    each step   --method dpo|orpo: the step's rewards (`REWARD_KEYS`)
    eval/loss                    each eval   --eval-data / --eval-fraction (report.json's eval_history)
    memory/peak_bytes            each step   the measured peak so far (CUDA's allocator peak, or the
                                             process's peak resident memory on a CPU)
    memory/predicted_peak_bytes  0           the memory model's prediction, when it has one

One step hook, `TensorBoardLog`, serves either training path (see `hooks`). Only the main
process writes. The files are written by torch's `SummaryWriter` (the tensorboard
package's event format); `tensorboard --logdir RUN/tensorboard` shows them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ...loss.preference import REWARD_KEYS
from ..runs.folder import TENSORBOARD_DIR
from .hooks import EVAL_LOSS, StepHook, StepState

__all__ = ["STEP_SCALARS", "TensorBoardLog", "open_tensorboard"]

# A log entry's key -> its TensorBoard tag.
STEP_SCALARS = (("loss", "train/loss"), ("learning_rate", "train/learning_rate"), ("grad_norm", "train/grad_norm"),
                *((key, f"train/{key}") for key in REWARD_KEYS))


class TensorBoardLog(StepHook):
    """Writes a run's scalars into `run_folder/tensorboard/`; the writer opens on the first scalar.

    A step hook: each step's entries (the step's own, and an evaluation's) become scalars;
    a resumed run writes its new steps only.

    Args:
        run_folder (Path): the run folder.
        device (Any): the device the run trains on, whose peak memory is measured.
        predicted_peak_bytes (int | None): the memory model's prediction, if any. Default: None
    """

    def __init__(self, run_folder: Path, device: Any, predicted_peak_bytes: int | None = None) -> None:
        self.directory = Path(run_folder) / TENSORBOARD_DIR
        self.device = device
        self.predicted = predicted_peak_bytes
        self.writer: Any = None

    def _open(self) -> Any:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.directory))
            if self.predicted:
                self.writer.add_scalar("memory/predicted_peak_bytes", float(self.predicted), 0)
        return self.writer

    def log_step(self, entry: Mapping[str, Any]) -> None:
        """One optimizer step's entry (step, loss, learning_rate, grad_norm; any may be missing)."""
        from ..memory.live_bytes import measured_peak

        writer, step = self._open(), int(entry["step"])
        for key, tag in STEP_SCALARS:
            if entry.get(key) is not None:
                writer.add_scalar(tag, float(entry[key]), step)
        peak = measured_peak(self.device)["bytes"]
        if peak is not None:
            writer.add_scalar("memory/peak_bytes", float(peak), step)
        writer.flush()  # a dashboard watching the folder sees each step, and a killed run keeps its log

    def log_eval(self, step: int, loss: float) -> None:
        """An evaluation after optimizer step `step`."""
        writer = self._open()
        writer.add_scalar("eval/loss", float(loss), int(step))
        writer.flush()

    def on_step(self, state: StepState, entries: list[dict[str, float]]) -> None:
        for entry in entries:
            if "loss" in entry:
                self.log_step(entry)
            if EVAL_LOSS in entry:
                self.log_eval(int(entry["step"]), entry[EVAL_LOSS])

    def on_train_end(self, state: StepState) -> None:
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def open_tensorboard(settings: Any, run_folder: Path, device: Any, memory: Mapping[str, Any],
                     main: bool) -> TensorBoardLog | None:
    """The run's `TensorBoardLog` on the main process with `--report-to tensorboard`; None otherwise."""
    if settings.report_to != "tensorboard" or not main:
        return None
    return TensorBoardLog(run_folder, device, memory.get("predicted_peak_bytes"))
