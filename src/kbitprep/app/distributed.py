"""The points where a run's processes meet under `torchrun` (DDP); with one process each is a no-op."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import TrainingArguments

__all__ = ["barrier", "start_processes"]


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
