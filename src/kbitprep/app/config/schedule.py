"""The learning-rate schedule of a run (`--lr-scheduler`, `--warmup-ratio`, `--warmup-steps`), one for both paths.

    lr(step) = lr * step / warmup                          for step < warmup (a linear rise from 0)
             = lr * decay((step - warmup) / (total - warmup))   after it, where decay is
    linear:    1 - x          (to zero at the last step: transformers' "linear")
    cosine:    (1 + cos(pi * x)) / 2                       (transformers' "cosine", half a period)
    constant:  1                                           (transformers' "constant_with_warmup")

The Trainer path gives `TRAINER_SCHEDULES[name]` and the warm-up to `TrainingArguments`; the
sharded loop builds the same schedule with `schedule()`, through the same
`transformers.get_scheduler`, so both paths use the same learning rate at every step.
kbitprep's "constant" is transformers' "constant_with_warmup": transformers' own "constant"
would ignore a warm-up.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["SCHEDULE_CHOICES", "TRAINER_SCHEDULES", "schedule", "trainer_warmup", "warmup_steps"]

# kbitprep's name -> transformers' SchedulerType name.
TRAINER_SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
SCHEDULE_CHOICES = tuple(TRAINER_SCHEDULES)


def trainer_warmup(settings: Any) -> float:
    """`TrainingArguments.warmup_steps`: a step count (>= 1), or a fraction of the steps (< 1) for --warmup-ratio."""
    if settings.warmup_steps is not None:
        return int(settings.warmup_steps)
    return float(settings.warmup_ratio or 0.0)


def warmup_steps(settings: Any, total_steps: int) -> int:
    """The warm-up in steps, counted as the Trainer counts it (`TrainingArguments.get_warmup_steps`)."""
    warmup = trainer_warmup(settings)
    return int(warmup) if warmup >= 1 else math.ceil(total_steps * warmup)


def schedule(optimizer: Any, settings: Any, total_steps: int) -> Any:
    """The run's learning-rate scheduler for `optimizer` over `total_steps` optimizer steps.

    Args:
        optimizer (torch.optim.Optimizer): its learning rate is the peak, `settings.lr`.
        settings (FinetuneSettings): `lr_scheduler`, `warmup_ratio`, `warmup_steps`.
        total_steps (int): the run's optimizer steps.

    Returns:
        torch.optim.lr_scheduler.LambdaLR: step it after each optimizer step.
    """
    from transformers import get_scheduler

    return get_scheduler(TRAINER_SCHEDULES[settings.lr_scheduler], optimizer,
                         num_warmup_steps=warmup_steps(settings, total_steps), num_training_steps=total_steps)
