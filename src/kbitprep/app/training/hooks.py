"""Per-step features, written once for both step loops: the `StepHook` interface.

A run trains with one of two loops, the transformers Trainer (one process, DDP) or the
sharded loop (`--fsdp`). Everything a run does around its optimizer steps is a hook, and
both loops call the same hooks at the same points::

    on_train_begin(state)                    before the first step (of a resumed run too)
    on_step(state, entries)                  after each optimizer step, before its checkpoint
    on_checkpoint(state, folder)             the step's checkpoint is written, by every process
    on_train_end(state)                      after the last step

`entries` starts as the step's own log entry (step, loss, learning_rate, grad_norm); a
hook may append entries of its own (an evaluation appends one with `eval_loss`), which
the hooks after it see and the loop keeps in its log, so a checkpoint saved at that step
holds them. A hook that raises stops the run before that step's checkpoint is saved.
Every process calls every hook (an evaluation of a sharded model is collective); a hook
that writes or reports checks `state.main`.

The Trainer's path adapts the list to one TrainerCallback (`trainer.HookCallback`); the
sharded loop (`sharded_loop.ShardedTraining`) calls it directly. A new per-step feature
is one `StepHook` in the run's list (`run.step_hooks`), and both loops get it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

EVAL_LOSS, EVAL_PERPLEXITY = "eval_loss", "eval_perplexity"  # an evaluation's keys in the log

if TYPE_CHECKING:
    from ..runs.folder import RunFolder
    from .observer import FinetuneObserver

__all__ = ["EVAL_LOSS", "EVAL_PERPLEXITY", "CheckpointMarker", "Progress", "StepHook", "StepHooks", "StepState"]


@dataclasses.dataclass(frozen=True)
class StepState:
    """Where training stands, as a hook sees it.

    Args:
        step (int): optimizer steps taken so far (the step just finished, in `on_step`).
        total_steps (int): the steps the run takes in all.
        model (Any): the model being trained (peft-wrapped; sharded under --fsdp).
        main (bool): this is the main process (the one that writes and reports).
    """

    step: int
    total_steps: int
    model: Any
    main: bool


class StepHook:
    """One per-step feature; every method is optional (see the module docstring for when each runs)."""

    def on_train_begin(self, state: StepState) -> None:
        """Before the first step of this process's training (at `state.step` when resumed)."""

    def on_step(self, state: StepState, entries: list[dict[str, float]]) -> None:
        """After optimizer step `state.step`; `entries[0]` is its log entry, later ones other hooks' additions."""

    def on_checkpoint(self, state: StepState, folder: Path) -> None:
        """Every process has written its part of the checkpoint of step `state.step` into `folder`."""

    def on_train_end(self, state: StepState) -> None:
        """After the last step."""


class StepHooks(StepHook):
    """A list of hooks called in order, itself a hook."""

    def __init__(self, hooks: Sequence[StepHook]) -> None:
        self.hooks = list(hooks)

    def on_train_begin(self, state: StepState) -> None:
        for hook in self.hooks:
            hook.on_train_begin(state)

    def on_step(self, state: StepState, entries: list[dict[str, float]]) -> None:
        for hook in self.hooks:
            hook.on_step(state, entries)

    def on_checkpoint(self, state: StepState, folder: Path) -> None:
        for hook in self.hooks:
            hook.on_checkpoint(state, folder)

    def on_train_end(self, state: StepState) -> None:
        for hook in self.hooks:
            hook.on_train_end(state)


class Progress(StepHook):
    """Tells the run's observer about each step and evaluation (main process only)."""

    def __init__(self, observer: FinetuneObserver) -> None:
        self.observer = observer

    def on_train_begin(self, state: StepState) -> None:
        if state.main:
            self.observer.on_train_begin(state.total_steps, state.step)

    def on_step(self, state: StepState, entries: list[dict[str, float]]) -> None:
        if not state.main:
            return
        for entry in entries:
            if "loss" in entry:
                self.observer.on_step(int(entry["step"]), float(entry["loss"]))
            if EVAL_LOSS in entry:
                self.observer.on_eval(int(entry["step"]), float(entry[EVAL_LOSS]), float(entry[EVAL_PERPLEXITY]))

    def on_train_end(self, state: StepState) -> None:
        if state.main:
            self.observer.on_train_end()


class CheckpointMarker(StepHook):
    """Marks each checkpoint complete in the run folder once every process has written it (main process)."""

    def __init__(self, folder: RunFolder) -> None:
        self.folder = folder

    def on_checkpoint(self, state: StepState, folder: Path) -> None:
        if state.main:
            self.folder.mark_checkpoint_complete(folder, state.step)
