"""A diverged run is a failed run: non-finite losses, gradients or weights stop training.

A learning rate or LoRA alpha far too large (or damaged weights) sends the loss to inf or
NaN within a few steps; from then on every update writes NaN into the adapter. Left
alone, the transformers Trainer carries on, logs the non-finite losses as 0 (its
`logging_nan_inf_filter`), and saves an adapter of NaNs. kbitprep instead:

- asks the Trainer to log losses as they are (`logging_nan_inf_filter=False`, set in the
  training arguments), so a NaN is never shown as 0;
- checks at every step's log, which comes before that step's checkpoint is saved, that
  the loss, the gradient norm and the trainable weights are finite; the first
  non-finite value stops the run with `DivergenceError` naming the step, the value and
  what to lower. The run folder keeps its last good checkpoint;
- refuses to write an adapter holding a non-finite tensor (`check_finite_weights`).

Every process of a `torchrun` run sees the same (reduced) loss and the same weights, so
they all stop at the same step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ...errors import KbitPrepError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["DivergenceError", "check_finite_weights", "divergence_callback", "hint"]


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


def divergence_callback(lr: float, lora_alpha: float) -> Any:  # a transformers TrainerCallback
    """A TrainerCallback that stops the run at the first non-finite weight, loss or gradient norm.

    Args:
        lr (float): the run's learning rate, for the hint.
        lora_alpha (float): the run's LoRA alpha, for the hint.

    Returns:
        TrainerCallback: raises `DivergenceError` from `on_log` (loss, gradient norm,
        trainable weights), before that step's checkpoint is saved.
    """
    from transformers import TrainerCallback

    class _StopOnDivergence(TrainerCallback):
        # The Trainer logs every step (logging_steps=1) before it saves that step's checkpoint,
        # so stopping here keeps a diverged step out of every checkpoint.
        def on_log(self, args, state, control, logs=None, model=None, **kwargs):
            step = f"training diverged at step {state.global_step}"
            for key, label in (("loss", "the loss"), ("grad_norm", "the gradient norm")):
                value = (logs or {}).get(key)
                if value is not None and not math.isfinite(float(value)):
                    raise DivergenceError(f"{step}: {label} is {float(value)}; " + hint(lr, lora_alpha))
            found = None if model is None else \
                first_non_finite((name, p) for name, p in model.named_parameters() if p.requires_grad)
            if found is not None:
                raise DivergenceError(f"{step}: the update made the weight {found[0]} {found[1]}; "
                                      + hint(lr, lora_alpha))

    return _StopOnDivergence()
