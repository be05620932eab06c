"""The preparations the benchmarks compare: the reference first, then each kbitprep policy."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

import kbitprep

__all__ = ["REFERENCE", "VARIANTS", "Variant", "reference_rule_bytes"]


def _prepare_reference(model: nn.Module) -> nn.Module:
    from peft import prepare_model_for_kbit_training  # the reference is only ever imported here

    return prepare_model_for_kbit_training(model)


def _prepare_kbitprep(upcast: str) -> Callable[[nn.Module], nn.Module]:
    def prepare(model: nn.Module) -> nn.Module:
        return kbitprep.prepare_model_for_kbit_training(model, upcast=upcast)

    return prepare


@dataclasses.dataclass(frozen=True)
class Variant:
    """One preparation under test.

    Args:
        name (str): short name used in tables and on the command line.
        label (str): how tables name it.
        prepare (Callable): prepares a loaded model in place, with that variant's defaults.
        upcast (str | None): the kbitprep policy, None for the reference.
    """

    name: str
    label: str
    prepare: Callable[[nn.Module], nn.Module]
    upcast: str | None = None


REFERENCE = Variant("reference", "peft (reference)", _prepare_reference)

VARIANTS: dict[str, Variant] = {variant.name: variant for variant in (
    REFERENCE,
    Variant("all", 'kbitprep "all"', _prepare_kbitprep("all"), upcast="all"),
    Variant("norms", 'kbitprep "norms"', _prepare_kbitprep("norms"), upcast="norms"),
    Variant("none", 'kbitprep "none"', _prepare_kbitprep("none"), upcast="none"),
)}


def reference_rule_bytes(model: nn.Module) -> int:
    """Bytes the reference's rule leaves: every fp16/bf16 parameter that is not a Params4bit -> fp32.

    Read off the unprepared model, as a cross-check of running the reference itself
    (shared parameters count once, as `model_bytes` counts them).
    """
    added = sum(param.numel() * (4 - param.element_size()) for param in model.parameters()
                if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit")
    return kbitprep.model_bytes(model) + added
