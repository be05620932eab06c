"""The points where a run's processes meet under `torchrun` (DDP); with one process each is a no-op."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import torch
    from transformers import TrainingArguments

__all__ = ["LAUNCH_VARIABLES", "Launch", "barrier", "from_main_process", "main_decides", "one_of_several",
           "start_processes"]

T = TypeVar("T")

# What torchrun sets in every process it starts; one of them alone is a leftover, not a launch.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")
_FROM_MAIN_ATTR = "kbitprep_from_main_process"


class Launch(tuple[int, int]):
    """(rank, world size) of a process that torchrun started as one of several."""

    @property
    def rank(self) -> int:
        return self[0]

    @property
    def world_size(self) -> int:
        return self[1]


def one_of_several(environ: Mapping[str, str] | None = None) -> Launch | None:
    """This process's rank and world size when it really is one of several torchrun started, else None.

    A `RANK` left in the shell (or set by another tool) without the rest of torchrun's
    variables, a world size of 1, or values that are not numbers all mean one process:
    it must report its own errors, not stay silent as a non-main rank would.

    Args:
        environ (Mapping[str, str] | None): the environment; None: `os.environ`. Default: None
    """
    environ = os.environ if environ is None else environ
    if not all(environ.get(name) for name in LAUNCH_VARIABLES):
        return None
    try:
        rank, world_size = int(environ["RANK"]), int(environ["WORLD_SIZE"])
    except ValueError:
        return None
    return Launch((rank, world_size)) if world_size > 1 and 0 <= rank < world_size else None


def from_main_process(error: BaseException) -> bool:
    """True for an error this process received from the main one (`main_decides`): the main process reports it."""
    return bool(getattr(error, _FROM_MAIN_ATTR, False))


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
        if not main and outcome[1] is not None:
            setattr(outcome[1], _FROM_MAIN_ATTR, True)  # the main process shows it; the others need not repeat it
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]
