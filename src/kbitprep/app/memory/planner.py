"""What buys the most memory: each change a run can make, with the peak the memory model predicts for it.

`kbitprep inspect MODEL --memory BUDGET` answers whether the run fits, the largest batch size and
sequence length that do (`estimate.fit_memory`), and, from here, the changes that lower the peak
at the asked batch shape, most bytes first: checkpointing every block (when off), the chunked
loss (when the full one is asked), an 8-bit optimizer (bitsandbytes' paged AdamW, when the fp32
one is asked) and a smaller LoRA rank (half the asked one, down to 4). Each is the same estimate
with one setting changed, so the numbers are as good as the model's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .estimate import MemoryEstimate, MemorySettings, TrainingSkeleton

__all__ = ["Change", "suggest_changes"]


@dataclasses.dataclass(frozen=True)
class Change:
    """One setting changed, and the predicted peak with it.

    Args:
        what (str): the change in words, e.g. "checkpointing every block".
        option (str): the command-line option that makes it, e.g. "--optim paged_adamw_8bit".
        peak (int): the predicted peak with the change, in bytes.
        saves (int): bytes below the run's peak as asked (negative: it costs).
        fits (bool | None): whether the peak fits the budget; None without one.
    """

    what: str
    option: str
    peak: int
    saves: int
    fits: bool | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _candidates(settings: MemorySettings) -> list[tuple[str, str, dict[str, Any]]]:
    """(what, option, the changed fields) for each change the run has not made yet."""
    found: list[tuple[str, str, dict[str, Any]]] = []
    if not settings.gradient_checkpointing:
        found.append(("checkpointing every block", "drop --no-gradient-checkpointing",
                      {"gradient_checkpointing": True}))
    if settings.loss != "chunked":
        found.append(("the chunked loss", "--loss chunked", {"loss": "chunked"}))
    if settings.optim == "adamw_torch":
        found.append(("an 8-bit optimizer", "--optim paged_adamw_8bit", {"optim": "paged_adamw_8bit"}))
    if settings.lora_r > 4:
        rank = max(4, settings.lora_r // 2)
        found.append((f"LoRA rank {rank}", f"--lora-r {rank}", {"lora_r": rank}))
    return found


def suggest_changes(model: Any, estimate: MemoryEstimate, budget: int | None = None) -> tuple[Change, ...]:
    """Each change's predicted peak at the estimate's batch size and sequence length, most bytes saved first.

    Args:
        model (Any): a model folder, config.json path, config dict or transformers config.
        estimate (MemoryEstimate): the run as asked.
        budget (int | None): bytes available, for `Change.fits`. Default: None

    Raises:
        MemoryModelError: the config cannot be read.
        SimulationError: the model's step cannot run on the meta device.
    """
    settings = estimate.settings
    changes = []
    for what, option, fields in _candidates(settings):
        changed = TrainingSkeleton(model, dataclasses.replace(settings, **fields)).estimate()
        changes.append(Change(what, option, changed.total, estimate.total - changed.total,
                              None if budget is None else changed.total <= budget))
    return tuple(sorted(changes, key=lambda change: -change.saves))
