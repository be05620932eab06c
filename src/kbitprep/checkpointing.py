"""Gradient (activation) checkpointing: choosing the API, checking the options, enabling it once.

transformers 5 renamed `gradient_checkpointing_enable` to `activation_checkpointing_enable`
and made the old name warn; older releases have only the old name, and releases before
4.35 take no checkpoint kwargs at all. `plan_checkpointing` reads which one the model has,
and `enable_checkpointing` calls it, so the happy path emits no deprecation warning.

torch warns when `use_reentrant` is not passed, and its implicit default is the reentrant
variant. The seed passes nothing, so kbitprep passes `use_reentrant=True` explicitly:
the same behaviour, without the warning.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .device import has_accelerator
from .diagnostics import Diagnostic, error_code, warning_code
from .errors import ArgumentTypeError, InvalidArgumentError

__all__ = ["CheckpointingPlan", "enable_checkpointing", "has_input_grad_hook", "plan_checkpointing"]

# Options torch.utils.checkpoint.checkpoint accepts (it pops preserve_rng_state from **kwargs).
CHECKPOINT_OPTIONS: frozenset[str] = frozenset(
    name for name, p in inspect.signature(torch.utils.checkpoint.checkpoint).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
) | {"preserve_rng_state"}

# (method name, name of its kwargs parameter), newest API first: first match wins.
_ENABLE_METHODS: tuple[tuple[str, str], ...] = (
    ("activation_checkpointing_enable", "activation_checkpointing_kwargs"),
    ("gradient_checkpointing_enable", "gradient_checkpointing_kwargs"),
)

_OWN_HOOKS_ATTR = "_kbitprep_input_grad_hooks"

KWARGS_IGNORED = warning_code("checkpointing-kwargs-ignored",
                              "this transformers takes no checkpointing kwargs; they are ignored", FutureWarning)
OPTION_UNSUPPORTED = warning_code("checkpointing-option-unsupported",
                                  "every_n_layers or offload is not supported by this transformers; ignored",
                                  UserWarning)
OFFLOAD_WITHOUT_ACCELERATOR = warning_code("offload-without-accelerator",
                                           "offload=True without an accelerator to offload from; ignored", UserWarning)
CANNOT_CHECKPOINT = error_code("cannot-checkpoint", "the model has no (supported) gradient checkpointing method")
NO_INPUT_EMBEDDINGS = error_code("no-input-embeddings",
                                 "reentrant checkpointing needs input embeddings the model does not expose")

# Checkpoint options that are switches; torch tests them for truth, so "False" would mean True.
_BOOL_OPTIONS: frozenset[str] = frozenset({"use_reentrant", "preserve_rng_state", "debug", "early_stop"})


@dataclasses.dataclass(frozen=True)
class CheckpointingPlan:
    """What preparation will do about checkpointing.

    Args:
        enabled (bool): whether checkpointing will be switched on.
        reason (str): why, or why not, in words.
        method (str | None): the model method that will be called.
        kwargs (dict): the options handed to `torch.utils.checkpoint.checkpoint`.
        input_grad_hook (bool): whether the input embeddings' output is made to require grad
            (needed by reentrant checkpointing when every weight below it is frozen).
        every_n_layers (int): checkpoint every n-th layer (1: all of them).
        offload (bool): keep saved activations in host memory.
        disables_use_cache (bool): whether `config.use_cache` is switched off (a KV cache
            cannot be used with checkpointing in training; transformers says so on every forward).
    """

    enabled: bool
    reason: str
    method: str | None = None
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    input_grad_hook: bool = False
    every_n_layers: int = 1
    offload: bool = False
    disables_use_cache: bool = False

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["kwargs"] = {key: _jsonable(value) for key, value in self.kwargs.items()}
        return data


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, (bool, int, float, str, type(None))) else repr(value)


@dataclasses.dataclass(frozen=True)
class _Findings:
    plan: CheckpointingPlan
    warnings: tuple[Diagnostic, ...] = ()
    errors: tuple[Diagnostic, ...] = ()


def validate_checkpointing_kwargs(kwargs: object) -> dict[str, Any]:
    """Check user-given checkpoint options up front, instead of at the first forward pass.

    Raises:
        TypeError: when `kwargs` is not a mapping, or a switch such as `use_reentrant` is not a bool.
        ValueError: when a key is not an option of `torch.utils.checkpoint.checkpoint`.
    """
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping):
        raise ArgumentTypeError(
            f"gradient_checkpointing_kwargs must be a dict such as {{'use_reentrant': False}}, "
            f"not {type(kwargs).__name__}: {kwargs!r}"
        )
    unknown = sorted(str(key) for key in kwargs if key not in CHECKPOINT_OPTIONS)
    if unknown:
        raise InvalidArgumentError(
            f"gradient_checkpointing_kwargs has unknown option(s) {unknown}; "
            f"torch.utils.checkpoint.checkpoint accepts {sorted(CHECKPOINT_OPTIONS)}"
        )
    resolved = dict(kwargs)
    # torch reads use_reentrant=None as "the default", which is reentrant; dropping it here lets
    # the default (True) be passed explicitly and the input-grad hook be planned for it. Without
    # that hook, reentrant checkpointing over frozen embeddings leaves the adapters without gradients.
    if "use_reentrant" in resolved and resolved["use_reentrant"] is None:
        del resolved["use_reentrant"]
    wrong = {key: value for key, value in resolved.items() if key in _BOOL_OPTIONS and not isinstance(value, bool)}
    if wrong:
        raise ArgumentTypeError(f"gradient_checkpointing_kwargs {wrong} must be True or False: a string or number here "
                        "would be read as truth or falsehood, so e.g. 'False' would mean True")
    return resolved


def _input_embeddings(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_input_embeddings", None)
    if getter is None:
        return None
    try:
        return getter()
    except (NotImplementedError, AttributeError):
        return None


def plan_checkpointing(
    model: nn.Module,
    *,
    quantized: bool,
    use_gradient_checkpointing: bool,
    kwargs: Mapping[str, Any],
    every_n_layers: int,
    offload: bool,
) -> _Findings:
    """Decide what checkpointing preparation will enable. Reads only."""
    if not use_gradient_checkpointing:
        return _Findings(CheckpointingPlan(False, "use_gradient_checkpointing=False"))
    if not quantized:
        reason = "the model is not quantized (the seed checkpoints only quantized models)"
        return _Findings(CheckpointingPlan(False, reason))

    found = next(((name, arg) for name, arg in _ENABLE_METHODS if callable(getattr(model, name, None))), None)
    if found is None or getattr(model, "supports_gradient_checkpointing", True) is False:
        what = "has no gradient checkpointing method" if found is None else "does not support gradient checkpointing"
        return _Findings(
            CheckpointingPlan(False, f"{type(model).__name__} {what}"),
            errors=(CANNOT_CHECKPOINT(f"{type(model).__name__} {what}. Pass use_gradient_checkpointing=False to "
                                      "prepare it without checkpointing (activations then take more memory)."),),
        )
    method, kwargs_name = found
    accepted = inspect.signature(getattr(model, method)).parameters
    warnings: list[Diagnostic] = []
    errors: list[Diagnostic] = []

    resolved = dict(kwargs)
    resolved.setdefault("use_reentrant", True)
    input_grad_hook = bool(resolved["use_reentrant"])
    if kwargs_name not in accepted:
        if kwargs:
            warnings.append(KWARGS_IGNORED(
                f"{method} of this transformers version takes no checkpointing kwargs; {dict(kwargs)} "
                "ignored. Upgrade transformers to pass them."))
        resolved = {}
    if input_grad_hook and _input_embeddings(model) is None:
        errors.append(NO_INPUT_EMBEDDINGS(
            f"{type(model).__name__} exposes no input embeddings to make their output require grad, which "
            "reentrant checkpointing needs. Pass gradient_checkpointing_kwargs={'use_reentrant': False}."))

    for option, value, default in (("every_n_layers", every_n_layers, 1), ("offload", offload, False)):
        if value != default and option not in accepted:
            warnings.append(OPTION_UNSUPPORTED(f"{option}={value!r} is not supported by {method} of this "
                                               "transformers version; ignored. Upgrade transformers to use it."))
    if offload and "offload" in accepted and not has_accelerator():
        # transformers pins the saved activations in host memory, and pinning needs an
        # accelerator: without one the first checkpointed forward raises deep inside torch.
        warnings.append(OFFLOAD_WITHOUT_ACCELERATOR(
            "offload=True needs an accelerator (CUDA, XPU, ...) to offload from, and none "
            "is available: activations already live in host memory; offload ignored."))
        offload = False
    config = getattr(model, "config", None)
    plan = CheckpointingPlan(
        enabled=True,
        reason="the model is quantized",
        method=method,
        kwargs=resolved,
        input_grad_hook=input_grad_hook,
        every_n_layers=every_n_layers if "every_n_layers" in accepted else 1,
        offload=offload if "offload" in accepted else False,
        disables_use_cache=getattr(config, "use_cache", False) is True,
    )
    return _Findings(plan, tuple(warnings), tuple(errors))


def _live(handle: RemovableHandle) -> bool:
    hooks = handle.hooks_dict_ref()
    return hooks is not None and handle.id in hooks


def _input_grad_handles(model: nn.Module) -> list[RemovableHandle]:
    """Handles of the input-grad hooks transformers or kbitprep registered and that are still in place."""
    handles = list(getattr(model, "_require_grads_hooks", None) or [])
    legacy = getattr(model, "_require_grads_hook", None)
    if legacy is not None:
        handles.append(legacy)
    handles += getattr(model, _OWN_HOOKS_ATTR, [])
    return [handle for handle in handles if isinstance(handle, RemovableHandle) and _live(handle)]


def has_input_grad_hook(model: nn.Module) -> bool:
    """Whether the output of `model`'s input embeddings is already made to require grad."""
    return bool(_input_grad_handles(model))


def _output_requires_grad(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    # Frozen embeddings give an output with no grad_fn; reentrant checkpointing then sees
    # no input that requires grad and drops the whole segment from the backward pass.
    output.requires_grad_(True)


def _add_input_grad_hook(model: nn.Module) -> None:
    enable = getattr(model, "enable_input_require_grads", None)
    if callable(enable):
        enable()
        return
    embeddings = _input_embeddings(model)
    if embeddings is None:  # plan_checkpointing reported this as an error, so preparation never gets here
        return
    setattr(model, _OWN_HOOKS_ATTR, [embeddings.register_forward_hook(_output_requires_grad)])


def enable_checkpointing(model: nn.Module, plan: CheckpointingPlan) -> None:
    """Switch checkpointing on as planned, leaving exactly one input-grad hook where one is wanted.

    transformers 5's `activation_checkpointing_enable` registers input-grad hooks of its
    own on every call, so a second preparation would stack a second hook on each embedding;
    the hooks that call adds beside ones already in place are removed again.
    """
    if not plan.enabled or plan.method is None:
        return
    existing = _input_grad_handles(model)
    hooked = [hooks for hooks in (handle.hooks_dict_ref() for handle in existing) if hooks is not None]
    keys_before = [set(hooks) for hooks in hooked]
    method = getattr(model, plan.method)
    # The transformers model the method belongs to: for a PeftModel, whose attributes forward
    # to the base model, the handles must be read from and restored on the base model, or its
    # disable_input_require_grads would later act on handles of hooks already removed.
    owner = getattr(method, "__self__", model)
    previous_handles = getattr(owner, "_require_grads_hooks", None)
    previous_handle = getattr(owner, "_require_grads_hook", None)

    accepted = inspect.signature(method).parameters
    call: dict[str, Any] = {}
    kwargs_name = dict(_ENABLE_METHODS)[plan.method]
    if kwargs_name in accepted:
        call[kwargs_name] = dict(plan.kwargs)
    for option in ("every_n_layers", "offload"):
        if option in accepted:
            call[option] = getattr(plan, option)
    method(**call)

    for hooks, before in zip(hooked, keys_before, strict=True):
        for hook_id in set(hooks) - before:
            del hooks[hook_id]
    if existing and previous_handles is not None:
        owner._require_grads_hooks = previous_handles
        if previous_handle is not None:
            owner._require_grads_hook = previous_handle
    if plan.input_grad_hook and not has_input_grad_hook(model):
        _add_input_grad_hook(model)
    config = getattr(model, "config", None)
    if plan.disables_use_cache and config is not None:
        config.use_cache = False
