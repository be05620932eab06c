"""--lr-scheduler and --warmup-ratio / --warmup-steps: the same learning rate per step on both training paths.

The reference is the Trainer's own scheduler (`Trainer.create_scheduler` from the run's
`training_arguments`); the sharded loop builds its scheduler in `ShardedTraining._set_up_optimizer`,
called here on a plain module (no torchrun needed). Both must give the learning rate of every
step, for each schedule and warm-up, and the golden values below.
"""

from __future__ import annotations

import math
import types
from pathlib import Path

import pytest
import torch

from kbitprep.app.config.settings import FinetuneSettings
from kbitprep.app.config.schedule import SCHEDULE_CHOICES, warmup_steps

STEPS = 8
WARMUPS = {"none": {}, "ratio": {"warmup_ratio": 0.25}, "steps": {"warmup_steps": 3}}


def settings_for(scheduler: str, warmup: str) -> FinetuneSettings:
    return FinetuneSettings("m", "d", "o", lr=0.5, max_steps=STEPS, lr_scheduler=scheduler, **WARMUPS[warmup])


def rates(optimizer: torch.optim.Optimizer, scheduler, steps: int = STEPS) -> list[float]:
    """The learning rate each step uses (read before the step, as both paths log it)."""
    used = []
    for _ in range(steps):
        used.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return used


def trainer_rates(settings: FinetuneSettings, tmp_path: Path) -> list[float]:
    from transformers import Trainer

    from kbitprep.app.training.trainer import training_arguments

    trainer = Trainer(model=torch.nn.Linear(2, 2), args=training_arguments(settings, tmp_path))
    trainer.create_optimizer_and_scheduler(num_training_steps=STEPS)
    return rates(trainer.optimizer, trainer.lr_scheduler)


def sharded_loop_rates(settings: FinetuneSettings) -> list[float]:
    from kbitprep.app.training.sharded_loop import ShardedTraining

    loop = types.SimpleNamespace(model=torch.nn.Linear(2, 2), settings=settings, total_steps=STEPS)
    ShardedTraining._set_up_optimizer(loop)  # type: ignore[arg-type]  # the loop's own set-up, without a process group
    return rates(loop.optimizer, loop.scheduler)


@pytest.mark.parametrize("warmup", list(WARMUPS))
@pytest.mark.parametrize("scheduler", SCHEDULE_CHOICES)
def test_the_sharded_loop_uses_the_trainers_learning_rate_at_every_step(tmp_path: Path, scheduler: str,
                                                                       warmup: str) -> None:
    settings = settings_for(scheduler, warmup)
    assert sharded_loop_rates(settings) == pytest.approx(trainer_rates(settings, tmp_path), abs=1e-12)


def test_golden_learning_rates() -> None:
    lr = 0.5
    cosine_after_2 = [lr * 0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)]
    expected = {
        ("linear", "none"): [lr * (STEPS - k) / STEPS for k in range(STEPS)],  # the run's schedule before warm-ups
        ("linear", "steps"): [0.0, lr / 3, 2 * lr / 3, *(lr * (5 - k) / 5 for k in range(5))],
        ("cosine", "ratio"): [0.0, lr / 2, *cosine_after_2],  # ceil(0.25 * 8) = 2 warm-up steps
        ("constant", "none"): [lr] * STEPS,
        ("constant", "steps"): [0.0, lr / 3, 2 * lr / 3, *[lr] * 5],  # transformers' "constant" would skip it
    }
    for (scheduler, warmup), values in expected.items():
        assert sharded_loop_rates(settings_for(scheduler, warmup)) == pytest.approx(values, abs=1e-12), scheduler


def test_warmup_steps_count_as_the_trainer_counts_them() -> None:
    assert warmup_steps(settings_for("linear", "none"), 100) == 0
    assert warmup_steps(settings_for("linear", "steps"), 100) == 3
    assert warmup_steps(FinetuneSettings("m", "d", "o", warmup_ratio=0.01), 150) == 2  # ceil(1.5)
