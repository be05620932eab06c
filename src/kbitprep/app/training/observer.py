"""How a fine-tuning run reports progress: `FinetuneObserver`, which the CLI renders."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ...plan import PreparationPlan

__all__ = ["FinetuneObserver"]


class FinetuneObserver:
    """Receives a run's progress on the main process; the CLI renders it. Every method is optional."""

    def on_message(self, text: str) -> None:
        """A line of news: resuming, settings chosen, files written."""

    def on_plan(self, plan: PreparationPlan) -> None:
        """The preparation plan, before it is applied."""

    def on_trainable(self, trainable: int, total: int) -> None:
        """Parameter counts once LoRA is attached."""

    def on_sample(self, stage: str, prompt: str, completion: str) -> None:
        """A greedy completion of a sample prompt; stage is "before" or "after"."""

    def on_train_begin(self, total_steps: int, start_step: int) -> None:
        """Training starts (at `start_step` when resumed)."""

    def on_step(self, step: int, loss: float | None) -> None:
        """An optimizer step finished; `loss` is its logged loss."""

    def on_eval(self, step: int, loss: float, perplexity: float) -> None:
        """An evaluation finished after optimizer step `step`."""

    def on_train_end(self) -> None:
        """Training finished."""
