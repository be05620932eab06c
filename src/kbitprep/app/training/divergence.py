"""A diverged run is a failed run: non-finite losses, gradients or weights stop training.

A learning rate or LoRA alpha far too large (or damaged weights) sends the loss to inf or
NaN within a few steps; from then on every update writes NaN into the adapter. Left
alone, the transformers Trainer carries on, logs the non-finite losses as 0 (its
`logging_nan_inf_filter`), and saves an adapter of NaNs. kbitprep instead:

- asks the Trainer to log losses as they are (`logging_nan_inf_filter=False`, set in the
  training arguments), so a NaN is never shown as 0;
- checks after every step, before that step's checkpoint is saved (`DivergenceGuard`, the
  first of the run's step hooks, on both step loops), that the loss, the gradient norm and
  the trainable weights are finite; the first
  non-finite value stops the run with `DivergenceError` naming the step, the value and
  what to lower. The run folder keeps its last good checkpoint;
- refuses to write an adapter holding a non-finite tensor (`check_finite_weights`).

Every process of a `torchrun` run sees the same (reduced) loss; the weights are the same
everywhere under DDP, and under --fsdp each process checks its shards and all agree, so
they all stop at the same step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ...errors import KbitPrepError
from .hooks import StepHook, StepState

if TYPE_CHECKING:
    from torch import nn

__all__ = ["DivergenceError", "DivergenceGuard", "check_finite_weights", "first_non_finite", "hint"]


class DivergenceError(KbitPrepError, RuntimeError):
    """Training produced a non-finite loss, gradient norm or weight; the message names the step and the fix."""


def hint(lr: float, lora_alpha: float) -> str:
    """What to change, with the values the run used."""
    return (f"lower --lr (now {lr:g}) or --lora-alpha (now {lora_alpha:g}), then start again with --overwrite; "
            "if it diverges at any setting, check the model's weights")


def first_non_finite(named: Iterable[tuple[str, Any]]) -> tuple[str, float] | None:
    """The first (name, value) among tensors that holds inf or NaN, with one such value; None if all are finite.

    All tensors are tested in one reduction, so a finite model costs one device sync.
    """
    import torch

    named = [(name, tensor) for name, tensor in named if tensor.is_floating_point()]
    if not named:
        return None
    finite = torch.stack([torch.isfinite(tensor.detach()).all() for _, tensor in named])
    if bool(finite.all()):
        return None
    name, tensor = named[int((~finite).nonzero()[0])]
    flat = tensor.detach().reshape(-1)
    return name, float(flat[~torch.isfinite(flat)][0])


def check_finite_weights(model: nn.Module, *, what: str, lr: float, lora_alpha: float) -> None:
    """Raise `DivergenceError` if a trainable weight of `model` is inf or NaN.

    Args:
        model (nn.Module): the model with its adapter.
        what (str): what was about to happen, for the message ("write the adapter").
        lr (float): the run's learning rate, for the hint.
        lora_alpha (float): the run's LoRA alpha, for the hint.

    Raises:
        DivergenceError: names the first non-finite tensor.
    """
    found = first_non_finite((name, p) for name, p in model.named_parameters() if p.requires_grad)
    if found is not None:
        name, value = found
        raise DivergenceError(f"will not {what}: the trained weight {name} holds {value} (training diverged); "
                              + hint(lr, lora_alpha))


class DivergenceGuard(StepHook):
    """Stops the run at the first non-finite loss, gradient norm or trainable weight.

    It runs first among the step hooks, after the step and before that step's checkpoint,
    so a diverged step is in no checkpoint. Under --fsdp each process checks its own shards
    and all agree, so every process stops at the same step with the same message.

    Args:
        lr (float): the run's learning rate, for the hint.
        lora_alpha (float): the run's LoRA alpha, for the hint.
    """

    def __init__(self, lr: float, lora_alpha: float) -> None:
        self.lr, self.lora_alpha = lr, lora_alpha

    def on_step(self, state: StepState, entries: list[dict[str, float]]) -> None:
        step = f"training diverged at step {state.step}"
        for key, label in (("loss", "the loss"), ("grad_norm", "the gradient norm")):
            value = entries[0].get(key)
            if value is not None and not math.isfinite(float(value)):
                raise DivergenceError(f"{step}: {label} is {float(value)}; " + hint(self.lr, self.lora_alpha))
        found = first_non_finite(_local_trainable(state.model))
        if _any_process(found is not None):
            where = (f"the weight {found[0]} {found[1]}" if found is not None
                     else "a weight another process holds non-finite")
            raise DivergenceError(f"{step}: the update made {where}; " + hint(self.lr, self.lora_alpha))


def _local_trainable(model: nn.Module) -> list[tuple[str, Any]]:
    """The trainable tensors as this process holds them (its shard of each, under FSDP)."""
    return [(name, p.to_local() if hasattr(p, "to_local") else p)
            for name, p in model.named_parameters() if p.requires_grad]


def _any_process(flag: bool) -> bool:
    """Whether `flag` holds on any process of the run (this one's, without torch.distributed)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        value = value.cuda()
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)
