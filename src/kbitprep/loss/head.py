"""The LM head as the chunks compute it: its plain weight or the module to call, and any LoRA adapters."""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import torch
from torch import nn


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP/DataParallel and peft wrappers."""
    while isinstance(getattr(model, "module", None), nn.Module) and not hasattr(model, "get_output_embeddings"):
        model = cast(nn.Module, model.module)
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


@dataclasses.dataclass(frozen=True)
class _Adapter:
    """One active LoRA adapter on the head: lora_B(lora_A(dropout(x))) * scaling."""

    down: nn.Module  # dropout, then lora_A: computed on the selected positions outside the chunks
    up: nn.Linear  # lora_B, split by vocabulary rows inside the chunks
    scaling: float
    dtype: torch.dtype  # lora_A's, which peft casts the adapter's input to


@dataclasses.dataclass(frozen=True)
class _HeadParts:
    """The head as the chunks compute it.

    Args:
        module (nn.Module): the head as the model calls it (hooked to capture its input).
        base (nn.Module): the layer under any LoRA.
        weight (torch.Tensor | None): the base's plain (V, H) weight; None: `base` is called per chunk.
        bias (torch.Tensor | None): the base's bias, with a plain weight.
        adapters (tuple[_Adapter, ...]): active LoRA adapters.
        description (str): for the plan.
    """

    module: nn.Module
    base: nn.Module
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    adapters: tuple[_Adapter, ...]
    description: str


def _is_lora_layer(module: nn.Module) -> bool:
    return all(hasattr(module, name) for name in ("lora_A", "lora_B", "base_layer", "scaling", "active_adapters"))


def _plain_weight(module: nn.Module) -> torch.Tensor | None:
    """The (V, H) weight of a plain linear layer that nothing intercepts, else None."""
    weight = getattr(module, "weight", None)
    plain = (isinstance(module, nn.Linear) and weight is not None and type(weight) in (torch.Tensor, nn.Parameter)
             and weight.is_floating_point() and weight.device.type != "meta"
             and not module._forward_hooks and not module._forward_pre_hooks and not hasattr(module, "_hf_hook"))
    return weight if plain else None


def _sharded(module: nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in module.parameters())


def _lora_adapters(layer: nn.Module) -> tuple[tuple[_Adapter, ...], str | None]:
    head: Any = layer  # a peft LoRA layer: its ModuleDicts and flags are read by adapter name
    if getattr(head, "merged", False) or getattr(head, "disable_adapters", False):
        return (), None  # the base alone computes the head (a merged weight holds the adapters)
    active = [name for name in head.active_adapters if name in head.lora_A]
    variants = [name for name in active if name in getattr(head, "lora_variant", {})
                or getattr(head, "use_dora", {}).get(name)]
    if variants:
        return (), f"the LM head's LoRA adapter {variants[0]!r} is a variant (such as DoRA) the chunks do not split"
    adapters = tuple(_Adapter(nn.Sequential(head.lora_dropout[name], head.lora_A[name]), head.lora_B[name],
                              float(head.scaling[name]), head.lora_A[name].weight.dtype) for name in active)
    return adapters, None


def _head_parts(head: nn.Module) -> tuple[_HeadParts | None, str | None]:
    if _sharded(head):
        return None, ("the LM head is sharded by FSDP outside an FSDP2 module kbitprep can gather it with; "
                      "the chunked loss needs its whole weight on each process")
    adapters: tuple[_Adapter, ...] = ()
    base = head
    if _is_lora_layer(head):
        adapters, reason = _lora_adapters(head)
        if reason:
            return None, reason
        base = cast(nn.Module, head.base_layer)
    weight = _plain_weight(base)
    kind = (f"linear weight ({str(weight.dtype).removeprefix('torch.')})" if weight is not None
            else f"{type(base).__name__} called per chunk")
    if adapters:
        kind = f"LoRA ({len(adapters)} adapter{'s' * (len(adapters) > 1)}) on a {kind}"
    bias = getattr(base, "bias", None) if weight is not None else None
    return _HeadParts(head, base, weight, bias, adapters, kind), None
