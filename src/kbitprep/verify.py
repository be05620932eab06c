"""A cheap check that training will work: one forward/backward on a tiny batch.

After preparation and adapters, every trainable parameter must receive a finite gradient
and no frozen one may receive any. A frozen embedding below reentrant checkpointing, a
norm hook that cuts the graph or an adapter on a layer the forward never reaches all show
up here as a named parameter, before hours of training that change nothing.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .errors import GradientFlowError

__all__ = ["GradientFlowReport", "tiny_batch", "verify_gradient_flow"]


@dataclasses.dataclass(frozen=True)
class GradientFlowReport:
    """What one forward/backward showed.

    Args:
        loss (float): the scalar that was back-propagated.
        with_grad (tuple[str, ...]): trainable parameters that received a finite gradient.
        missing (tuple[str, ...]): trainable parameters that received no gradient.
        non_finite (tuple[str, ...]): trainable parameters whose gradient has NaN or inf.
        leaked (tuple[str, ...]): frozen parameters that received a gradient.
    """

    loss: float
    with_grad: tuple[str, ...]
    missing: tuple[str, ...]
    non_finite: tuple[str, ...]
    leaked: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return bool(self.with_grad) and not (self.missing or self.non_finite or self.leaked)

    def describe(self) -> str:
        if self.ok:
            return (f"gradients reach all {len(self.with_grad)} trainable parameters and no frozen one "
                    f"(loss {self.loss:.4f})")
        if not (self.with_grad or self.missing):
            return "no parameter is trainable: attach adapters (peft.get_peft_model) before verifying"
        parts = [f"{label}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''} ({len(names)})"
                 for label, names in (("no gradient", self.missing), ("NaN/inf gradient", self.non_finite),
                                      ("gradient on a frozen parameter", self.leaked)) if names]
        return "; ".join(parts)


def _first_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def tiny_batch(model: nn.Module, *, batch_size: int = 2, seq_len: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """A seeded batch of random token ids within the model's vocabulary, with labels."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None) or 32
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, int(vocab), (batch_size, seq_len), generator=generator).to(_first_device(model))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _accepted(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
    params = inspect.signature(model.forward).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return {key: value for key, value in batch.items() if takes_any or key in params}


def _scalar(output: Any) -> torch.Tensor:
    """The loss if the model computed one, else the mean of its first floating output."""
    loss = getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    values: Iterable[Any]
    if isinstance(output, Mapping):
        values = output.values()
    else:
        values = output if isinstance(output, (tuple, list)) else [output]
    for value in values:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.float().mean()
    raise GradientFlowError(f"{type(output).__name__} holds no floating tensor to back-propagate from")


def verify_gradient_flow(
    model: nn.Module, batch: Mapping[str, Any] | None = None, *, raise_on_failure: bool = True
) -> GradientFlowReport:
    """Run one forward/backward and check where gradients went.

    The model is put in training mode for the pass and restored afterwards; gradients
    computed here are cleared again, so the check leaves no trace on the next step.

    Args:
        model (nn.Module): a prepared model with adapters attached.
        batch (Mapping | None): model inputs; None makes a tiny random batch with labels.
        raise_on_failure (bool): raise instead of returning a failing report. Default: True

    Returns:
        GradientFlowReport: which parameters got gradients.

    Raises:
        GradientFlowError: a trainable parameter got no (or a non-finite) gradient, or a
            frozen one got a gradient; the message names them.
    """
    batch = tiny_batch(model) if batch is None else batch
    named = list(model.named_parameters())
    was_training = model.training
    previous = {name: param.grad for name, param in named}
    for _, param in named:
        param.grad = None
    model.train()
    try:
        loss = _scalar(model(**_accepted(model, batch)))
        # A loss outside the autograd graph is the worst case of the failure this check looks
        # for (e.g. frozen embeddings under reentrant checkpointing cut off every adapter):
        # report every trainable parameter as missing instead of letting backward() raise.
        if loss.requires_grad:
            loss.backward()
        trainable = [(name, param) for name, param in named if param.requires_grad]
        report = GradientFlowReport(
            loss=float(loss.detach()),
            with_grad=tuple(n for n, p in trainable if p.grad is not None and bool(torch.isfinite(p.grad).all())),
            missing=tuple(n for n, p in trainable if p.grad is None),
            non_finite=tuple(n for n, p in trainable if p.grad is not None and not bool(torch.isfinite(p.grad).all())),
            leaked=tuple(n for n, p in named if not p.requires_grad and p.grad is not None),
        )
    finally:
        for name, param in named:
            param.grad = previous[name]
        model.train(was_training)
    if raise_on_failure and not report.ok:
        raise GradientFlowError(f"gradient check failed: {report.describe()}")
    return report
