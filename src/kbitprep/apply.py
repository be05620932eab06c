"""Carrying out a preparation plan: the only module that changes a model."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .backends import detect_quantization
from .checkpointing import enable_checkpointing
from .device import empty_accelerator_cache
from .diagnostics import error_code
from .errors import PreparationError
from .plan import PreparationPlan, plan_preparation

__all__ = ["WRAPPED_MODEL", "apply_plan", "keep_training_layout", "prepare_model_for_kbit_training", "refuse_wrapped"]

_NORM_HOOKS_ATTR = "_kbitprep_norm_hooks"

WRAPPED_MODEL = error_code("wrapped-model", "the model is wrapped in DataParallel or DistributedDataParallel")


def refuse_wrapped(model: Any) -> None:
    """Refuse a model wrapped for data parallelism: prepare the model inside, then wrap it.

    The wrapper has none of the model's own methods (gradient checkpointing, input
    embeddings), so its plan would report the wrong problem.

    Raises:
        PreparationError: code `wrapped-model`, naming `.module` as the fix.
    """
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    if isinstance(model, wrappers):
        inner = type(model.module).__name__
        raise PreparationError("cannot prepare the model; nothing was changed", [WRAPPED_MODEL(
            f"model is a {type(model).__name__} wrapping a {inner}: prepare the model itself, "
            f"prepare_model_for_kbit_training(model.module), then wrap it (or attach the adapters) afterwards")])


def _cast_floating(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, tuple):
        return tuple(_cast_floating(item, dtype) for item in value)
    return value


def _compute_in_float32(output_dtype: torch.dtype) -> tuple[Callable[..., tuple], Callable[..., Any]]:
    """Hooks that run a norm layer in float32 and hand its output back in `output_dtype`.

    An fp32 norm weight times an fp16 activation promotes the product to fp32, which either
    breaks the next layer (nn.LayerNorm refuses mixed dtypes) or silently doubles the size of
    every activation after it; casting at the layer's edges keeps the model's dtype outside.
    """

    def before(module: nn.Module, args: tuple) -> tuple:
        return _cast_floating(args, torch.float32)

    def after(module: nn.Module, args: tuple, output: Any) -> Any:
        return _cast_floating(output, output_dtype)

    return before, after


def _add_norm_hooks(model: nn.Module, plan: PreparationPlan) -> None:
    modules = dict(model.named_modules())
    output_dtypes = {cast.norm_layer: cast.from_dtype for cast in plan.casts if cast.norm_layer is not None}
    for name, dtype in output_dtypes.items():
        module = modules[name]
        if hasattr(module, _NORM_HOOKS_ATTR):  # prepared before: one pair of hooks is enough
            continue
        before, after = _compute_in_float32(dtype)
        setattr(module, _NORM_HOOKS_ATTR,
                (module.register_forward_pre_hook(before), module.register_forward_hook(after)))


def keep_training_layout(model: nn.Module) -> nn.Module:
    """Switch the model's quantized layers to the layout autograd can train through, now; returns `model`.

    Preparation does this too; doing it right after loading as well keeps a forward in
    eval mode before preparation (a sample generation) from changing the weights' layout,
    which preparation could only undo approximately. What it does is the detected
    backend's (`BackendBehaviour.training_layout`); for most backends, nothing.
    """
    behaviour = detect_quantization(model).behaviour
    behaviour.restore_training_layout(model, behaviour.training_layout(model))
    return model


def apply_plan(model: nn.Module, plan: PreparationPlan, *, auto_clear_cache: bool = True) -> nn.Module:
    """Carry out `plan` on the model it was made for: freeze, cast, hook norms, checkpoint.

    Raises:
        PreparationError: the plan lists errors; the model is left untouched.
    """
    problems = [d for d in plan.diagnostics if d.severity == "error"]
    if problems:
        raise PreparationError("cannot prepare the model; nothing was changed", problems)
    for warning in plan.diagnostics:
        if warning.severity == "warning":
            warnings.warn(warning.as_warning(), stacklevel=3)

    keep = set(plan.kept_trainable)
    for name, param in model.named_parameters():
        if name not in keep:
            param.requires_grad_(False)

    params = dict(model.named_parameters())
    for cast in plan.casts:
        param = params[cast.name]
        param.data = param.data.to(cast.to_dtype)
    _add_norm_hooks(model, plan)
    plan.detection.behaviour.restore_training_layout(model, plan.training_layout)
    if plan.casts and auto_clear_cache:
        # Casting allocates new fp32 storage and frees the half-precision one; the caching
        # allocator keeps the freed blocks reserved, which on unified-memory devices is RAM
        # that nothing else can use.
        empty_accelerator_cache()

    enable_checkpointing(model, plan.checkpointing)
    return model


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
    auto_clear_cache: bool = True,
    *,
    upcast: str = "all",
    every_n_layers: int = 1,
    offload: bool = False,
    activation_checkpointing_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Prepare a quantized model for adapter (LoRA) training, in place: plan, then apply.

    A drop-in for peft's function of the same name. With the defaults it freezes every
    parameter, casts every plain float16/bfloat16 parameter to float32 (quantized storage
    is never touched), and, for a quantized model, makes the input embeddings' output
    require grad and switches on gradient checkpointing. Calling it twice changes nothing
    more.

    Args:
        model (nn.Module): the model, usually loaded with a `BitsAndBytesConfig`.
        use_gradient_checkpointing (bool): checkpoint activations of a quantized model. Default: True
        gradient_checkpointing_kwargs (dict | None): options for `torch.utils.checkpoint.checkpoint`;
            `use_reentrant` defaults to True and is passed explicitly. Default: None
        auto_clear_cache (bool): release the accelerator cache after casting. Default: True
        upcast (str): ``"all"`` (the seed's rule), ``"norms"`` (normalisation layers only; they
            compute in float32 and return the model's dtype) or ``"none"``. Default: ``"all"``
        every_n_layers (int): checkpoint every n-th layer, where transformers supports it. Default: 1
        offload (bool): keep checkpointed activations in host memory, where supported. Default: False
        activation_checkpointing_kwargs (dict | None): `gradient_checkpointing_kwargs` by the name
            peft 0.22 gives it, so calls written for either release work; pass one of the two.
            Default: None

    Returns:
        nn.Module: the same `model` object.

    Raises:
        TypeError: `model` is not a torch module, or an argument has the wrong type.
        ValueError: an argument has a value that is not allowed.
        PreparationError: the model cannot be prepared (wrapped in DataParallel or
            DistributedDataParallel: pass `model.module`; no parameters, weights on the meta
            device, cannot checkpoint); raised before anything is changed.

    Example:
        >>> config = BitsAndBytesConfig(load_in_4bit=True)
        >>> model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config)
        >>> model = prepare_model_for_kbit_training(model, upcast="norms")
        >>> model = peft.get_peft_model(model, LoraConfig(r=16, target_modules="all-linear"))
    """
    refuse_wrapped(model)
    plan = plan_preparation(
        model, use_gradient_checkpointing, gradient_checkpointing_kwargs, auto_clear_cache,
        upcast=upcast, every_n_layers=every_n_layers, offload=offload,
        activation_checkpointing_kwargs=activation_checkpointing_kwargs,
    )
    return apply_plan(model, plan, auto_clear_cache=auto_clear_cache)
