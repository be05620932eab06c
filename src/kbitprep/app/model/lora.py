"""Attaching the LoRA adapter (peft, imported only when one is attached)."""

from __future__ import annotations

import dataclasses
import warnings
from typing import TYPE_CHECKING, Protocol

from ...errors import KbitPrepError
from .loading import error_summary

if TYPE_CHECKING:
    from torch import nn

__all__ = ["INIT_METHODS", "LORA_VARIANTS", "InitMethod", "LoraInitError", "LoraSettings", "LoraTargetError",
           "attach_lora", "linear_layer_names"]

# --lora-variant -> peft's LoraConfig(use_dora=...): DoRA learns a magnitude per output row on top of LoRA.
LORA_VARIANTS = {"lora": False, "dora": True}


@dataclasses.dataclass(frozen=True)
class InitMethod:
    """One `--init-lora-weights` choice: how peft initialises the adapter.

    Args:
        peft (bool | str): the value of peft's `LoraConfig(init_lora_weights=...)`.
        rewrites_base (bool): peft's initialisation also rewrites the base weights it adapts (subtracting
            the initial adapter), so that whoever rebuilds the run's model must let peft do it again:
            peft does on `PeftModel.from_pretrained` (the saved config keeps the method), and merge
            does (`kbitprep.app.export.merge`). Default: False
        loftq (bool): after attaching, peft's `replace_lora_weights_loftq` sets A and B to the low-rank
            part of the 4-bit quantization error, read from the model folder's full-precision
            safetensors; the base is not changed. Default: False
    """

    peft: bool | str
    rewrites_base: bool = False
    loftq: bool = False


# The initialisations peft offers that need no data pass (eva, corda and lora_ga calibrate on batches).
INIT_METHODS = {
    "default": InitMethod(True),         # A Kaiming-uniform, B zero: the adapter starts as a no-op
    "gaussian": InitMethod("gaussian"),  # A Gaussian scaled by the rank, B zero
    "pissa": InitMethod("pissa", rewrites_base=True),  # principal singular vectors; peft needs a float base
    "olora": InitMethod("olora", rewrites_base=True),  # QR of the weight; peft requantizes a 4-bit base
    "orthogonal": InitMethod("orthogonal"),
    "loftq": InitMethod(True, loftq=True),
}


class LoraTargetError(KbitPrepError, ValueError):
    """`--target-modules` names no module the adapter can wrap; the message lists the linear layers."""


class LoraInitError(KbitPrepError, ValueError):
    """peft cannot initialise the adapter as `--init-lora-weights` asks on this base; the message has peft's reason."""


class LoraSettings(Protocol):
    """The settings `attach_lora` reads: a `FinetuneSettings`, or the memory model's `MemorySettings`.

    Read where present, else plain LoRA: `lora_variant` (a key of `LORA_VARIANTS`), `rslora` (bool),
    `init_lora_weights` (a key of `INIT_METHODS`).
    """

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

    The variant (`lora_variant`: DoRA), the scaling (`rslora`: alpha / sqrt(r)) and the
    initialisation (`init_lora_weights`, a key of `INIT_METHODS`) are peft's own; settings
    without them (an older `MemorySettings`) get plain LoRA.

    Raises:
        LoraTargetError: `settings.target_modules` names no module of the model; the message
            lists the model's linear layers.
        LoraInitError: peft cannot initialise the adapter this way on this base (PiSSA on a
            4-bit base, LoftQ without CUDA); the message gives peft's reason.
    """
    from peft import LoraConfig, get_peft_model

    linear = linear_layer_names(model)
    init_name = getattr(settings, "init_lora_weights", "default")
    init = INIT_METHODS[init_name]
    config = LoraConfig(
        # peft annotates lora_alpha as int, but scales by alpha / r in floating point.
        r=settings.lora_r, lora_alpha=settings.lora_alpha,  # type: ignore[arg-type]
        lora_dropout=settings.lora_dropout, bias="none",
        target_modules=list(settings.target_modules or linear), task_type="CAUSAL_LM",
        use_dora=LORA_VARIANTS[getattr(settings, "lora_variant", "lora")],
        # peft annotates init_lora_weights as a Literal of its names; INIT_METHODS holds only those names
        use_rslora=bool(getattr(settings, "rslora", False)), init_lora_weights=init.peft,  # type: ignore[arg-type]
    )
    try:
        with warnings.catch_warnings():
            # peft's get_peft_model reads the deprecated `is_gradient_checkpointing` property
            # (peft's bug, not ours); transformers answers with exactly this FutureWarning.
            warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated",
                                    category=FutureWarning)
            wrapped = get_peft_model(model, config)
    except ValueError as error:
        raise LoraTargetError(f"--target-modules: {error_summary(error)}; the model's linear layers are "
                            f"{', '.join(linear) or 'none'}") from None
    except (TypeError, RuntimeError) as error:  # peft's initialisation refusing (or failing on) this base's weights
        raise _init_error(init_name, error) from None
    if init.loftq and next(model.parameters()).device.type != "meta":
        _apply_loftq(wrapped, init_name)
    return wrapped


def _init_error(name: str, error: BaseException) -> LoraInitError:
    return LoraInitError(f"--init-lora-weights {name}: peft cannot initialise the adapter on this base "
                         f"({error_summary(error)}); pass --init-lora-weights default, "
                         "or --quantize none where peft needs a float base")


def _apply_loftq(model: nn.Module, name: str) -> None:
    """peft's LoftQ for a bitsandbytes 4-bit base: A and B from the quantization error of each adapted layer."""
    from peft.utils.loftq_utils import replace_lora_weights_loftq

    folder = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(
        getattr(model.get_base_model(), "config", None), "_name_or_path", None)  # type: ignore[operator]
    try:
        replace_lora_weights_loftq(model, model_path=folder)
    except (AssertionError, ValueError, TypeError, FileNotFoundError, RuntimeError) as error:
        # peft computes LoftQ on CUDA or XPU only, reads full-precision safetensors, and needs 4-bit layers
        raise _init_error(name, error) from None
