"""Attaching the LoRA adapter (peft, imported only when one is attached)."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Protocol

from ...errors import KbitPrepError
from .loading import error_summary

if TYPE_CHECKING:
    from torch import nn

__all__ = ["LoraSettings", "LoraTargetError", "attach_lora", "linear_layer_names"]


class LoraTargetError(KbitPrepError, ValueError):
    """`--target-modules` names no module the adapter can wrap; the message lists the linear layers."""


class LoraSettings(Protocol):
    """The settings `attach_lora` reads: a `FinetuneSettings`, or the memory model's `MemorySettings`."""

    @property
    def lora_r(self) -> int: ...
    @property
    def lora_alpha(self) -> float: ...
    @property
    def lora_dropout(self) -> float: ...
    @property
    def target_modules(self) -> tuple[str, ...] | None: ...


def linear_layer_names(model: nn.Module) -> list[str]:
    """Leaf names of the model's linear layers (bitsandbytes ones included), without the output head.

    The default LoRA targets. Naming them, rather than asking peft for "all-linear", keeps
    peft from also wrapping the fused expert parameters of mixture-of-experts models, which
    its parameter wrapper trains only without dropout.
    """
    from torch import nn as torch_nn
    from transformers.pytorch_utils import Conv1D

    output_embeddings = getattr(model, "get_output_embeddings", None)
    head = output_embeddings() if callable(output_embeddings) else None
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, (torch_nn.Linear, Conv1D)) and module is not head})


def attach_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """The model wrapped by peft with a LoRA adapter as `settings` say.

    Raises:
        LoraTargetError: `settings.target_modules` names no module of the model; the message
            lists the model's linear layers.
    """
    from peft import LoraConfig, get_peft_model

    linear = linear_layer_names(model)
    config = LoraConfig(
        # peft annotates lora_alpha as int, but scales by alpha / r in floating point.
        r=settings.lora_r, lora_alpha=settings.lora_alpha,  # type: ignore[arg-type]
        lora_dropout=settings.lora_dropout, bias="none",
        target_modules=list(settings.target_modules or linear), task_type="CAUSAL_LM",
    )
    try:
        with warnings.catch_warnings():
            # peft's get_peft_model reads the deprecated `is_gradient_checkpointing` property
            # (peft's bug, not ours); transformers answers with exactly this FutureWarning.
            warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated",
                                    category=FutureWarning)
            return get_peft_model(model, config)
    except ValueError as error:
        raise LoraTargetError(f"--target-modules: {error_summary(error)}; the model's linear layers are "
                            f"{', '.join(linear) or 'none'}") from None
