"""The points where a run's processes meet under `torchrun` (DDP); with one process each is a no-op."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import torch
    from transformers import TrainingArguments

__all__ = ["barrier", "main_decides", "start_processes"]

T = TypeVar("T")


def start_processes(args: TrainingArguments) -> torch.device:
    """Choose this process's device and, under torchrun, join the process group; returns the device.

    TrainingArguments does both lazily, the first time its `device` is read. A run needs
    the process group before its first `barrier()`, so it calls this first, on purpose.
    """
    return args.device


def barrier() -> None:
    """Wait for every process of the run; returns at once when there is only one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def main_decides(main: bool, work: Callable[[], T]) -> T:
    """Run `work` on the main process only; every process returns its result or raises its error.

    Under torchrun the other processes wait for the main one's outcome instead of each
    doing the work (one lock, one claim of the run folder), so all go on or all stop,
    with the same message.
    """
    import torch.distributed as dist

    outcome: list = [None, None]
    if main:
        try:
            outcome = [work(), None]
        except BaseException as error:  # noqa: BLE001 - handed to every process, then raised
            outcome = [None, error]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]
