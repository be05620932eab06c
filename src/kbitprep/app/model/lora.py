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


def _linear_layers(model: nn.Module) -> list[str]:
    """Full names of the model's linear layers (bitsandbytes ones included), without the output head.

    A model's own subclass of `nn.Linear` with a forward of its own is no linear layer to
    adapt: Phi-3.5-MoE's router is one, and returns (logits, scores, experts), which peft's
    LoRA layer cannot add its update to.
    """
    from torch import nn as torch_nn
    from transformers.pytorch_utils import Conv1D

    def linear(module: nn.Module) -> bool:
        cls = type(module)
        own = cls.__module__.startswith("transformers.models.") and cls.forward is not torch_nn.Linear.forward
        return isinstance(module, (torch_nn.Linear, Conv1D)) and not own

    output_embeddings = getattr(model, "get_output_embeddings", None)
    head = output_embeddings() if callable(output_embeddings) else None
    return [name for name, module in model.named_modules() if linear(module) and module is not head]


def linear_layer_names(model: nn.Module) -> list[str]:
    """Leaf names of the model's linear layers (bitsandbytes ones included), without the output head."""
    return sorted({name.rsplit(".", 1)[-1] for name in _linear_layers(model)})


def default_targets(model: nn.Module) -> list[str]:
    """The default LoRA targets: the model's linear layers but the output head, named as peft matches them.

    Naming the linear layers, rather than asking peft for "all-linear", keeps peft from also
    wrapping the fused expert parameters of a mixture of experts (transformers 5 stores each
    projection of the experts as one 3-D parameter), which its parameter wrapper trains only
    without dropout. Two kinds of names are left out for that reason:

    - a name that is also the name of a module that is no linear layer (Zamba2 has linear
      layers and decoder layers of one name), which peft would try to wrap and refuse;
    - a name peft itself reads, on this model type, as the experts' parameters: it maps the
      names adapters trained under transformers 4 used for the experts (`gate_proj`,
      `up_proj`, `down_proj`, `w1`, ...) onto the fused parameters, wherever they appear
      (DeepSeek-V3's shared experts are linear `down_proj` layers; naming them would reach
      its routed experts too).
    """
    linear = _linear_layers(model)
    layers = set(linear)
    others = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name and name not in layers}
    left_out = others | _expert_names_for_peft(model)
    return sorted({name.rsplit(".", 1)[-1] for name in linear} - left_out)


def _expert_names_for_peft(model: nn.Module) -> set[str]:
    """The target names peft maps onto fused expert parameters for this model (transformers 5 only)."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        return set()
    try:  # peft's own table; absent from peft releases without the mapping, which then maps nothing
        from peft.utils.transformers_weight_conversion import (
            _MODEL_TO_CONVERSION_PATTERN,
            _MOE_TARGET_MODULE_MAPPING,
        )
    except ImportError:
        return set()
    pattern = _MODEL_TO_CONVERSION_PATTERN.get(str(getattr(getattr(model, "config", None), "model_type", "")))
    return set(_MOE_TARGET_MODULE_MAPPING.get(pattern, {})) if isinstance(pattern, str) else set()


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
        target_modules=list(settings.target_modules or default_targets(model)), task_type="CAUSAL_LM",
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
        experts = ("; peft trains a mixture of experts' fused expert parameters, which these names also reach, only "
                   "with --lora-dropout 0: pass that, or leave the experts' names out" if "ParamWrapper" in str(error)
                   else "")
        raise LoraTargetError(f"--target-modules: {error_summary(error)}{experts}; the model's linear layers are "
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
