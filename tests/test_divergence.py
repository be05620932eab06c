"""The divergence guard on its own: which values stop a run, what the message says, and that
the Trainer is asked to log a non-finite loss as it is (its default filter logs it as 0)."""

from __future__ import annotations

import math

import pytest
import torch

from kbitprep.app.training.divergence import (
    DivergenceError,
    check_finite_weights,
    DivergenceGuard,
    first_non_finite,
)
from kbitprep.app.training.hooks import StepState


def at_step(step: int, model: torch.nn.Module) -> StepState:
    return StepState(step=step, total_steps=10, model=model, main=True)


def lora_like() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)  # a frozen base weight: never checked
    return model


def test_first_non_finite_names_the_tensor_and_a_value() -> None:
    model = lora_like()
    assert first_non_finite(model.named_parameters()) is None
    with torch.no_grad():
        model[1].bias[1] = float("inf")
    assert first_non_finite(model.named_parameters()) == ("1.bias", math.inf)


@pytest.mark.parametrize(("logs", "says"), [
    ({"loss": float("nan"), "grad_norm": 1.0}, "training diverged at step 7: the loss is nan"),
    ({"loss": 2.0, "grad_norm": float("inf")}, "training diverged at step 7: the gradient norm is inf"),
])
def test_a_non_finite_loss_or_gradient_norm_stops_the_run(logs: dict, says: str) -> None:
    guard = DivergenceGuard(lr=1e30, lora_alpha=64)
    with pytest.raises(DivergenceError, match=rf"{says}; lower --lr \(now 1e\+30\) or --lora-alpha \(now 64\)"):
        guard.on_step(at_step(7, lora_like()), [{"step": 7, **logs}])
    guard.on_step(at_step(7, lora_like()), [{"step": 7, "loss": 2.0, "grad_norm": 1.0}])  # finite: goes on


def test_a_non_finite_trained_weight_stops_the_run_and_is_never_written() -> None:
    model = lora_like()
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    with pytest.raises(DivergenceError, match=r"step 3: the update made the weight 1\.weight nan"):
        DivergenceGuard(lr=1e-3, lora_alpha=16).on_step(at_step(3, model), [{"step": 3, "loss": 1.0}])
    with pytest.raises(DivergenceError, match=r"will not write the adapter: the trained weight 1\.weight holds nan"):
        check_finite_weights(model, what="write the adapter", lr=1e-3, lora_alpha=16)
    with torch.no_grad():
        model[1].weight[0, 0] = 0.0
        model[0].weight[0, 0] = float("nan")  # frozen: not the adapter's
    check_finite_weights(model, what="write the adapter", lr=1e-3, lora_alpha=16)


def test_the_trainer_logs_non_finite_losses_as_they_are(tmp_path) -> None:
    from kbitprep.app.config.settings import FinetuneSettings
    from kbitprep.app.training.trainer import training_arguments

    args = training_arguments(FinetuneSettings(model="m", data="d", output=str(tmp_path)), tmp_path / "checkpoints")
    assert args.logging_nan_inf_filter is False and args.logging_steps == 1
