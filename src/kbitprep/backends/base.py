"""What a backend row is: its data (`Backend`) and the behaviour it may carry (`BackendBehaviour`).

Planning and applying never test which backend a model uses; they ask the detected row's
behaviour. The default behaviour does nothing, so a backend that is only data (how to
recognise it, whether it may be upcast) needs no code; one that needs more subclasses
`BackendBehaviour` in its own module, as `bitsandbytes.py` does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from ..diagnostics import Diagnostic

__all__ = ["Backend", "BackendBehaviour", "OwnedParameter", "class_matches", "is_plain_tensor", "qualified_name"]

# (name, parameter, owning module): one parameter of a model, as planning walks them.
OwnedParameter = tuple[str, nn.Parameter, nn.Module]


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def class_matches(cls: type, prefixes: tuple[str, ...]) -> bool:
    """Whether `cls` or one of its bases has a qualified name starting with one of `prefixes`."""
    return bool(prefixes) and any(qualified_name(base).startswith(prefixes) for base in cls.__mro__)


def is_plain_tensor(tensor: torch.Tensor) -> bool:
    """True for an ordinary tensor or `nn.Parameter`, False for any tensor subclass.

    Only plain tensors are ever cast: a subclass (`Params4bit`, `Int8Params`, quanto's
    `WeightQBytesTensor`, torchao's tensors, ...) has its own storage layout, and
    rewriting its `.data` corrupts it or raises deep inside the backend.
    """
    return type(tensor) in (torch.Tensor, nn.Parameter)


class BackendBehaviour:
    """What planning and applying must do for one backend beyond its row's data. By default: nothing.

    Every method only reads, except `restore_training_layout`, which `apply_plan` calls.
    """

    def logical_numel(self, tensor: torch.Tensor) -> int:
        """How many values a tensor of this backend represents (packed storage counts unpacked)."""
        return tensor.numel()

    def diagnostics(self, model: nn.Module, parameters: Sequence[OwnedParameter], *, upcast: str,
                    casts: int) -> list[Diagnostic]:
        """Warnings about this backend's layers that preparing `model` will emit.

        Args:
            model (nn.Module): the model being planned.
            parameters (Sequence[OwnedParameter]): its parameters, each once, with their owners.
            upcast (str): the upcast policy asked for.
            casts (int): how many parameters the plan casts to float32.
        """
        return []

    def training_layout(self, model: nn.Module) -> tuple[str, ...]:
        """Layers whose weights must be switched to (or kept in) a layout autograd can train through."""
        return ()

    def describe_training_layout(self, layers: Sequence[str]) -> tuple[str, str]:
        """A (label, text) row for the plan's table about those layers."""
        return "training layout", f"{len(layers)} layers switched to their training layout"

    def restore_training_layout(self, model: nn.Module, layers: Sequence[str]) -> None:
        """Switch the named layers to their training layout. Changes the model."""


NO_BEHAVIOUR = BackendBehaviour()


@dataclasses.dataclass(frozen=True)
class Backend:
    """One quantization backend.

    Args:
        name (str): the name kbitprep reports, e.g. ``"bitsandbytes-4bit"``.
        method (str): transformers' ``QuantizationMethod`` value for it.
        upcast_allowed (bool): whether half-precision weights of such a model may be cast
            to float32. Only bitsandbytes computes in the dtype of the tensors around it;
            every other backend manages its own precision, and its kernels expect the
            dtypes it chose (the seed's reasoning for gptq/aqlm/eetq/hqq/torchao).
        flags (tuple[str, ...]): model attributes that, when truthy, mean this backend.
        packages (tuple[str, ...]): prefixes of the qualified names of the backend's tensor
            and layer classes (a package such as ``"torchao."`` or one class such as
            ``"bitsandbytes.nn.modules.Params4bit"``); a parameter or layer whose class, or
            one of its bases, matches marks the model as quantized by it.
        behaviour (BackendBehaviour): what planning and applying do for it beyond this data.
            Default: nothing more
        compute_float32 (str): how to make its quantized layers compute in float32, in its own
            options (the advice where its layers compute in a precision the device runs slowly).
            Default: generic words
        load_for_qlora (str): how to load a model quantized by it for QLoRA, where kbitprep
            recommends it for a model that is not quantized; "" for the others. Default: ""
    """

    name: str
    method: str
    upcast_allowed: bool = False
    flags: tuple[str, ...] = ()
    packages: tuple[str, ...] = ()
    behaviour: BackendBehaviour = NO_BEHAVIOUR
    compute_float32: str = "make its quantized layers compute in float32, as the backend's own options allow"
    load_for_qlora: str = ""

    def owns_class(self, cls: type) -> bool:
        """Whether `cls` or one of its bases is a class of this backend."""
        return class_matches(cls, self.packages)
