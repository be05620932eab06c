"""Keeping `make bench` within its time on any CPU: the precision it computes in, step budgets, progress.

A CPU without oneDNN bf16 kernels (AVX2 only) multiplies bf16 5-170x slower than fp32, so
a benchmark that computes in bf16 there can run for hours. The benchmarks therefore
compute 4-bit layers in the precision the product picks on this device
(`kbitprep.compute_dtype_for`, the rule `finetune --compute-dtype auto` follows), and the
lockstep sections cap their rounds of steps with a time budget measured from the rounds
already done (`StepBudget`), saying in the report when they ran fewer than asked.

`KBITPREP_BENCH_SLOW_BF16=1` makes the benchmark and its workers treat bf16 as slow on
this CPU (kbitprep's `override_fast_dtypes`), to exercise that path on a machine that
computes bf16 fast: the product then plans as on an AVX2-only CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable

import torch

__all__ = ["SLOW_BF16_ENV", "Progress", "StepBudget", "bench_compute_dtype", "bf16_treated_slow",
           "treat_bf16_as_configured"]

SLOW_BF16_ENV = "KBITPREP_BENCH_SLOW_BF16"


def bf16_treated_slow() -> bool:
    """Whether `SLOW_BF16_ENV` asks the benchmark to treat bf16 as slow on this CPU."""
    return os.environ.get(SLOW_BF16_ENV, "") not in ("", "0")


_held = contextlib.ExitStack()  # the override stays entered until the process ends


def treat_bf16_as_configured() -> None:
    """For the rest of this process, make kbitprep see bf16 as slow on the CPU if `SLOW_BF16_ENV` says so."""
    if bf16_treated_slow():
        from kbitprep import override_fast_dtypes

        _held.enter_context(override_fast_dtypes("cpu", set()))


def bench_compute_dtype() -> torch.dtype:
    """The dtype 4-bit layers of a bf16 model compute in here: bf16 where this CPU computes it fast, else fp32."""
    from kbitprep import compute_dtype_for

    return compute_dtype_for(torch.bfloat16, "cpu")


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}:{secs:02d}"


class Progress:
    """Progress lines for a section of `total` units, with the time left estimated from the units done.

    A line is printed when a unit ends, at most one per `every_s` seconds (and always for the last).
    """

    def __init__(self, label: str, total: int, log: Callable[[str], None], *, unit: str = "step",
                 every_s: float = 10.0) -> None:
        self.label, self.total, self.log, self.unit, self.every_s = label, total, log, unit, every_s
        self.done, self.started, self.last_line = 0, time.perf_counter(), float("-inf")

    def advance(self, count: int = 1, *, total: int | None = None) -> None:
        """`count` more units done; `total` replaces the planned number of units (a budget cut it)."""
        self.done += count
        if total is not None:
            self.total = total
        now = time.perf_counter()
        if now - self.last_line < self.every_s and self.done < self.total:
            return
        self.last_line = now
        elapsed = now - self.started
        left = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        self.log(f"    {self.label}: {self.unit} {self.done}/{self.total}, {_clock(elapsed)} elapsed, "
                 f"about {_clock(left)} left")


@dataclasses.dataclass
class StepBudget:
    """How many rounds of steps fit a section's time budget, judged from the rounds done so far.

    Args:
        requested (int): rounds asked for.
        minimum (int): rounds always run (warm-up plus the timed steps a median needs).
        budget_s (float | None): seconds the rounds may take; None: no budget.
    """

    requested: int
    minimum: int
    budget_s: float | None
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def rounds_after(self, done: int) -> int:
        """The rounds to run in all, once `done` rounds have taken the time since `started`."""
        if self.budget_s is None or done == 0:
            return self.requested
        per_round = (time.perf_counter() - self.started) / done
        fitting = int(self.budget_s / per_round) if per_round > 0 else self.requested
        return max(min(self.minimum, self.requested), min(self.requested, fitting))
