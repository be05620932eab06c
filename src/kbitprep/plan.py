"""Planning a preparation: what will be frozen, cast and checkpointed, and what it costs.

What preparing a 4-bit model does, and what each upcast policy casts::

      input_ids
          |
    [ embed_tokens ]  fp16 ---- "all": -> fp32          "norms"/"none": stays fp16
          |
    +-----v--------------------------------------------------+  x N layers,
    |  [ RMSNorm ]     fp16 ---- "all" and "norms": -> fp32   |  each one
    |  [ q/k/v/o  ]    4-bit Params4bit: never cast, frozen   |  checkpointed
    |  [ RMSNorm ]     fp16 ---- "all" and "norms": -> fp32   |  (recomputed in
    |  [ MLP      ]    4-bit Params4bit: never cast, frozen   |  the backward)
    +-----|--------------------------------------------------+
    [ final norm ]     fp16 ---- "all" and "norms": -> fp32
          |
    [ lm_head ]        fp16 ---- "all": -> fp32          "norms"/"none": stays fp16
          |
        logits          (LoRA adapters, attached later by peft, are the only trainables)

Under "norms" a norm layer computes in fp32 and hands its output back in the model's
dtype, so the rest of the forward pass runs as before. The embeddings and the LM head
are the bulk of a small model's non-quantized bytes (a 151,936 x 896 embedding is most
of Qwen2-0.5B's), which is why "all" costs so much more than "norms".

`plan_preparation` only reads the model; `kbitprep.apply` carries a plan out.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .backends import (
    RECOMMENDED_BACKEND,
    UNKNOWN_BACKEND,
    Detection,
    detect_quantization,
    quantized_tensor_backend,
)
from .backends.base import OwnedParameter, is_plain_tensor
from .checkpointing import CheckpointingPlan, plan_checkpointing, validate_checkpointing_kwargs
from .diagnostics import Diagnostic, error_code, warning_code
from .errors import ArgumentTypeError, InvalidArgumentError, NotQuantizedWarning
from .precision import SlowLayer, device_precision, slow_layers
from .report import format_bytes, format_count

__all__ = [
    "HALF_DTYPES",
    "UPCAST_POLICIES",
    "Cast",
    "PreparationPlan",
    "is_norm_layer",
    "model_bytes",
    "plan_preparation",
    "tensor_bytes",
]

HALF_DTYPES: frozenset[torch.dtype] = frozenset({torch.float16, torch.bfloat16})
TARGET_DTYPE = torch.float32

# torch's own normalisation layers; transformers' per-model RMSNorm classes are caught by name and shape.
_TORCH_NORMS: tuple[type[nn.Module], ...] = (
    nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm,
    nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
)


def is_norm_layer(module: nn.Module) -> bool:
    """Whether `module` is a normalisation layer.

    torch's norm classes, and any module whose class name says "Norm" and whose own
    parameters are all 1-D scales or shifts (LlamaRMSNorm, T5LayerNorm, GemmaRMSNorm,
    ...). The shape rule keeps out look-alikes such as Baichuan's `NormHead`, a linear layer.
    """
    if isinstance(module, _TORCH_NORMS):
        return True
    own = list(module.parameters(recurse=False))
    return "norm" in type(module).__name__.lower() and bool(own) and all(p.dim() == 1 for p in own)


# Which half-precision parameters each policy casts: (parameter, owning module) -> bool.
UPCAST_POLICIES: Mapping[str, Callable[[nn.Parameter, nn.Module], bool]] = {
    "all": lambda param, owner: True,  # the seed's rule
    "norms": lambda param, owner: is_norm_layer(owner),
    "none": lambda param, owner: False,
}


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds: its storage, or for a wrapper subclass the sum of its inner tensors.

    A wrapper subclass such as quanto's `WeightQBytesTensor` reports its logical dtype
    (float16) but stores int8 data and scales; `__tensor_flatten__` names those.
    """
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is not None and not is_plain_tensor(tensor):
        inner_names, _ = flatten()
        return sum(tensor_bytes(getattr(tensor, name)) for name in inner_names)
    return tensor.numel() * tensor.element_size()


# (name, parameter, owning module) for each parameter of a model, in `named_parameters` order.
_Owned = tuple[OwnedParameter, ...]

PEFT_MODEL = warning_code("peft-model", "the model is a PeftModel: its adapters stay trainable")
NOT_QUANTIZED = warning_code("not-quantized", "the model holds no quantized weights", NotQuantizedWarning)
UNKNOWN_TENSOR_SUBCLASS = warning_code("unknown-tensor-subclass",
                                       "parameters are tensor subclasses no backend claims; never cast")
SLOW_PRECISION = warning_code("slow-precision",
                              "layers will compute in a half precision this device computes slowly")
SLOW_HEAD_PRECISION = warning_code("slow-head-precision",
                                   "the LM head will compute in a half precision this device computes slowly")
WEIGHTS_NOT_QUANTIZED = warning_code(
    "weights-not-quantized", "a large share of the weights lies outside linear layers, which the backend left "
    "unquantized (a mixture of experts stored as 3-D parameters)")
NO_PARAMETERS = error_code("no-parameters", "the model has no parameters to prepare or train")
META_DEVICE = error_code("meta-device", "parameters are on the meta device: the weights were never loaded")


def _owned_parameters(model: nn.Module) -> Iterator[OwnedParameter]:
    """(name, parameter, owning module), each parameter once, in `named_parameters` order."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for local_name, param in module.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                yield (f"{module_name}.{local_name}" if module_name else local_name), param, module


def model_bytes(model: nn.Module) -> int:
    """Parameter plus buffer bytes of a model, each shared tensor counted once."""
    params = {id(p): p for p in model.parameters()}
    buffers = {id(b): b for b in model.buffers()}
    return sum(tensor_bytes(t) for t in (*params.values(), *buffers.values()))


@dataclasses.dataclass(frozen=True)
class Cast:
    """One parameter that preparation casts.

    Args:
        name (str): the parameter's name.
        from_dtype (torch.dtype): its dtype now.
        to_dtype (torch.dtype): its dtype afterwards (float32).
        numel (int): how many values it holds.
        norm_layer (str | None): the norm layer that owns it, when that layer will compute
            in fp32 and hand back its output in `from_dtype` (the "norms" policy).
    """

    name: str
    from_dtype: torch.dtype
    to_dtype: torch.dtype
    numel: int
    norm_layer: str | None = None

    @property
    def bytes_added(self) -> int:
        return self.numel * (self.to_dtype.itemsize - self.from_dtype.itemsize)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "from": _dtype_name(self.from_dtype), "to": _dtype_name(self.to_dtype),
                "numel": self.numel, "bytes_added": self.bytes_added}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclasses.dataclass(frozen=True)
class PreparationPlan:
    """Everything `prepare_model_for_kbit_training` will do to a model, and its cost.

    Built by `plan_preparation`; `str(plan)` is a table, `plan.to_dict()` is JSON-ready.

    Args:
        detection (Detection): the quantization backend and the evidence for it.
        upcast (str): the upcast policy, one of `UPCAST_POLICIES`.
        cast_reason (str): why the casts are what they are.
        casts (tuple[Cast, ...]): the parameters cast to float32.
        frozen (tuple[str, ...]): parameters that require grad now and will be frozen.
        kept_trainable (tuple[str, ...]): parameters left trainable (adapters of a PeftModel).
        training_layout (tuple[str, ...]): layers the backend switches to a layout autograd
            can train through (e.g. 4-bit layers that a CPU kernel repacks for inference).
        unquantized_weights (tuple[str, ...]): weight matrices of a quantized model that lie outside
            linear layers and embeddings, so the backend left them in float (fused MoE experts).
        parameter_counts (dict[str, int]): logical values by kind: quantized, float, other.
        bytes_before (int): parameter + buffer bytes now (shared tensors once).
        checkpointing (CheckpointingPlan): the checkpointing settings.
        diagnostics (tuple[Diagnostic, ...]): the warnings preparing will emit and the errors
            that stop `prepare_model_for_kbit_training` before it changes anything, each
            with its code (docs/diagnostics.md).
    """

    detection: Detection
    upcast: str
    cast_reason: str
    casts: tuple[Cast, ...]
    frozen: tuple[str, ...]
    kept_trainable: tuple[str, ...]
    parameter_counts: Mapping[str, int]
    bytes_before: int
    checkpointing: CheckpointingPlan
    diagnostics: tuple[Diagnostic, ...] = ()
    training_layout: tuple[str, ...] = ()
    unquantized_weights: tuple[str, ...] = ()

    @property
    def quantization(self) -> str | None:
        return self.detection.name

    @property
    def bytes_after(self) -> int:
        return self.bytes_before + sum(cast.bytes_added for cast in self.casts)

    @property
    def norm_layers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(cast.norm_layer for cast in self.casts if cast.norm_layer is not None))

    @property
    def warnings(self) -> tuple[str, ...]:
        """The messages of the warnings preparing will emit."""
        return tuple(d.message for d in self.diagnostics if d.severity == "warning")

    @property
    def errors(self) -> tuple[str, ...]:
        """The messages of the problems that stop preparation."""
        return tuple(d.message for d in self.diagnostics if d.severity == "error")

    @property
    def codes(self) -> tuple[str, ...]:
        """The code of every diagnostic, in order."""
        return tuple(d.code for d in self.diagnostics)

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-serialisable data."""
        return {
            "quantization": self.quantization,
            "evidence": self.detection.evidence,
            "upcast": self.upcast,
            "cast_reason": self.cast_reason,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "parameter_counts": dict(self.parameter_counts),
            "frozen": list(self.frozen),
            "kept_trainable": list(self.kept_trainable),
            "casts": [cast.to_dict() for cast in self.casts],
            "norm_layers_in_fp32": list(self.norm_layers),
            "checkpointing": self.checkpointing.to_dict(),
            "warnings": list(self.warnings),
            "errors": list(self.errors),
            "diagnostics": [d.to_dict() for d in self.diagnostics],
            "training_layout": list(self.training_layout),
            "unquantized_weights": list(self.unquantized_weights),
        }

    def __str__(self) -> str:
        return format_plan(self)


def _not_a_module_hint(value: object) -> str:
    """What to pass instead, for the things people pass by mistake."""
    if isinstance(value, (str, bytes)) or hasattr(value, "__fspath__"):
        return "a path? load the model first, e.g. AutoModelForCausalLM.from_pretrained(path, quantization_config=...)"
    if value is None:
        return "pass the model object that from_pretrained returned, not the result of a function that returns nothing"
    if isinstance(value, Mapping):
        return "a state dict? build the model, load it with model.load_state_dict(...), then pass the model"
    if isinstance(value, type) and issubclass(value, nn.Module):
        return f"a model class, not a model: load one first, e.g. {value.__name__}.from_pretrained(path)"
    if isinstance(value, (tuple, list)) and any(isinstance(item, nn.Module) for item in value):
        return "a tuple holding a model, as some loaders return (model, tokenizer)? unpack it and pass the model"
    return "pass the loaded model itself, e.g. AutoModelForCausalLM.from_pretrained(...)"


def validate_arguments(
    model: object,
    use_gradient_checkpointing: object,
    gradient_checkpointing_kwargs: object,
    auto_clear_cache: object,
    upcast: object,
    every_n_layers: object,
    offload: object,
) -> dict[str, Any]:
    """Check the arguments shared by planning and preparing; return the checkpoint kwargs as a new dict.

    Raises:
        TypeError: an argument has the wrong type (a model that is not a torch module, ...).
        ValueError: an argument has a value that is not allowed (an unknown upcast policy, ...).
    """
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(f"model must be a torch.nn.Module such as a transformers PreTrainedModel, "
                        f"not {type(model).__name__} ({_not_a_module_hint(model)})")
    for name, value in (("use_gradient_checkpointing", use_gradient_checkpointing),
                        ("auto_clear_cache", auto_clear_cache), ("offload", offload)):
        if not isinstance(value, bool):
            raise ArgumentTypeError(f"{name} must be True or False, not {value!r}")
    if not isinstance(upcast, str) or upcast not in UPCAST_POLICIES:
        raise InvalidArgumentError(f"upcast must be one of {sorted(UPCAST_POLICIES)}, not {upcast!r}")
    if isinstance(every_n_layers, bool) or not isinstance(every_n_layers, int) or every_n_layers < 1:
        raise InvalidArgumentError(f"every_n_layers must be a whole number >= 1, not {every_n_layers!r}")
    return validate_checkpointing_kwargs(gradient_checkpointing_kwargs)


def _is_peft_model(model: nn.Module) -> bool:
    peft = sys.modules.get("peft")  # a PeftModel exists only if peft was imported
    return peft is not None and isinstance(model, getattr(peft, "PeftModel", ()))


def _plan_casts(model: nn.Module, owned: _Owned, detection: Detection, upcast: str) -> tuple[tuple[Cast, ...], str]:
    backend = detection.backend
    if backend is not None and not backend.upcast_allowed:
        return (), f"{backend.name} manages its own precision: nothing is upcast"
    if upcast == "none":
        return (), "upcast='none'"
    wants = UPCAST_POLICIES[upcast]
    module_names = {id(module): name for name, module in model.named_modules()}
    casts = tuple(
        Cast(name, param.dtype, TARGET_DTYPE, param.numel(),
             norm_layer=module_names[id(owner)] if upcast == "norms" else None)
        for name, param, owner in owned
        if is_plain_tensor(param) and param.dtype in HALF_DTYPES and wants(param, owner)
    )
    rule = {"all": "every float16/bfloat16 parameter -> float32",
            "norms": "norm layers -> float32, computing in float32 and returning the model's dtype"}[upcast]
    return casts, f"upcast='{upcast}': {rule}"


def _count_parameters(owned: _Owned, detection: Detection) -> dict[str, int]:
    counts = {"quantized": 0, "float": 0, "other": 0}
    for _, param, _ in owned:
        kind = "quantized" if not is_plain_tensor(param) else "float" if param.is_floating_point() else "other"
        counts[kind] += detection.behaviour.logical_numel(param)
    return counts


# A quantized model whose weights outside linear layers reach this share of its bytes is warned about.
UNQUANTIZED_SHARE = 0.10


def _output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    try:
        head = getter() if callable(getter) else None
    except (AttributeError, NotImplementedError):  # a model that declares the method but has no head
        return None
    return head if isinstance(head, nn.Module) else None


def _unquantized_weights(model: nn.Module, owned: _Owned, detection: Detection) -> tuple[OwnedParameter, ...]:
    """The weight matrices a quantized model holds in float outside linear layers and embeddings.

    A backend quantizes linear layers (`nn.Linear`, transformers' `Conv1D`); a weight of two or
    more dimensions held by another module stays as it was loaded. Transformers 5 stores a
    mixture-of-experts layer's experts so: one 3-D parameter per projection, every expert a slice.
    """
    if detection.backend is None:
        return ()
    head = _output_head(model)
    return tuple(entry for entry in owned
                 if is_plain_tensor(entry[1]) and entry[1].is_floating_point() and entry[1].dim() >= 2
                 and not isinstance(entry[2], (nn.Linear, nn.Embedding, nn.EmbeddingBag))
                 and type(entry[2]).__name__ != "Conv1D" and entry[2] is not head)


def _unquantized_warning(owned: _Owned, loose: tuple[OwnedParameter, ...], detection: Detection) -> list[Diagnostic]:
    loose_bytes = sum(tensor_bytes(param) for _, param, _ in loose)
    total = sum(tensor_bytes(param) for _, param, _ in owned)
    if not total or loose_bytes < UNQUANTIZED_SHARE * total:
        return []
    by_class: dict[str, list[OwnedParameter]] = {}
    for entry in loose:
        by_class.setdefault(type(entry[2]).__name__, []).append(entry)
    ranked = sorted(by_class.items(), key=lambda item: -sum(tensor_bytes(p) for _, p, _ in item[1]))
    holders = ", ".join(f"{len(entries)} in {cls} (first: {entries[0][0]})" for cls, entries in ranked[:3])
    dtypes = "/".join(sorted({str(param.dtype).removeprefix("torch.") for _, param, _ in loose}))
    values = sum(param.numel() for _, param, _ in loose)
    experts = any(param.dim() == 3 for _, param, _ in loose)
    why = (" Transformers stores a mixture-of-experts layer's experts as 3-D parameters (one slice per expert), "
           "not as linear layers, so they are not quantized, and LoRA adapts only the linear layers around them."
           if experts else "")
    fix = "Count these bytes before training (kbitprep inspect --memory sizes the run with them)"
    fix += ("; to have the experts quantized, use a transformers release before 5.0, where each expert is a set of "
            "linear layers (for the families it has)." if experts else ".")
    return [WEIGHTS_NOT_QUANTIZED(
        f"{format_bytes(loose_bytes)} of the model's {format_bytes(total)} of parameters "
        f"({loose_bytes / total:.0%}; {format_count(values)} values in {dtypes}) lie outside linear layers and "
        f"are not quantized by {detection.name}: {len(loose)} weight tensors, {holders}.{why} {fix}")]


def _model_warnings(model: nn.Module, owned: _Owned, detection: Detection, upcast: str,
                    casts: tuple[Cast, ...], loose: tuple[OwnedParameter, ...]) -> list[Diagnostic]:
    found: list[Diagnostic] = []
    if _is_peft_model(model):
        found.append(PEFT_MODEL(
            "model is a PeftModel: kbitprep keeps its trainable (adapter) parameters trainable, where the seed "
            "would freeze them. Prepare the base model first, then call peft.get_peft_model."))
    if detection.backend is None:
        cost = sum(cast.bytes_added for cast in casts)
        found.append(NOT_QUANTIZED(
            f"model is not quantized ({detection.evidence}): it is frozen, {len(casts)} half-precision parameters "
            f"are cast to float32 (+{cost:,} bytes) and checkpointing stays off, as the seed does. "
            f"{RECOMMENDED_BACKEND.load_for_qlora}, or pass upcast='none' (or use peft.get_peft_model directly)."))
    unknown = [(name, type(param)) for name, param, _ in owned
               if quantized_tensor_backend(param) is UNKNOWN_BACKEND]
    if unknown:
        first, cls = unknown[0]
        treated = (" The model is treated as quantized by a backend that keeps its own precision: nothing is upcast."
                   if detection.backend is UNKNOWN_BACKEND else "")
        found.append(UNKNOWN_TENSOR_SUBCLASS(
            f"{len(unknown)} parameter(s) are tensor subclasses kbitprep does not know (first: {first}, a "
            f"{cls.__module__}.{cls.__qualname__}); they are left exactly as they are and never cast.{treated} "
            "If they are not quantized weights, make them plain torch.nn.Parameter before preparing."))
    found += _unquantized_warning(owned, loose, detection)
    return found + detection.behaviour.diagnostics(model, owned, upcast=upcast, casts=len(casts))


def _slow_precision_warnings(model: nn.Module, owned: _Owned, casts: tuple[Cast, ...],
                             detection: Detection) -> list[Diagnostic]:
    """Layers left (or computing) in a half precision that their device runs many times slower than fp32.

    How to make quantized layers compute in float32 is the detected backend's own advice.
    """
    cast_names = {cast.name for cast in casts}
    cast_ids = {id(param) for name, param, _ in owned if name in cast_names}
    slow = slow_layers(model, lambda param: TARGET_DTYPE if id(param) in cast_ids else param.dtype)
    if not slow:
        return []
    head = _output_head(model)
    head_names = {name for name, module in model.named_modules() if head is not None and module is head}
    found = []
    heads = [layer for layer in slow if layer.name in head_names]
    others = [layer for layer in slow if layer.name not in head_names]
    if heads:
        found.append(SLOW_HEAD_PRECISION(_slow_message(heads, f"the LM head {heads[0].name}") + (
            " Fix: prepare with upcast='all' to keep it in float32 "
            f"(+{sum(layer.numel for layer in heads) * 2:,} bytes), or compute the loss with "
            "kbitprep.causal_lm_loss, which upcasts the head a piece at a time on such a device "
            "(kbitprep finetune does).")))
    if others:
        quantized = [layer for layer in others if layer.quantized]
        plain = sum(layer.numel for layer in others if not layer.quantized) * 2
        fixes = ([f"prepare with upcast='all' to keep the unquantized ones in float32 (+{plain:,} bytes)"]
                 if plain else []) + ([(detection.backend or RECOMMENDED_BACKEND).compute_float32]
                                      if quantized else [])
        subject = f"{len(others)} layer(s) (first: {others[0].name})"
        found.append(SLOW_PRECISION(_slow_message(others, subject) + " Fix: " + "; and ".join(fixes) + "."))
    return found


def _slow_message(layers: list[SlowLayer], what: str) -> str:
    dtype = str(layers[0].dtype).removeprefix("torch.")
    source = device_precision(layers[0].device).source
    return (f"{what} will compute in {dtype} on {layers[0].device.type}, which computes "
            f"{dtype} slowly ({source}): a {dtype} matmul there can take 5-170x the float32 time, forward and "
            "backward.")


def _model_errors(model: nn.Module, owned: _Owned) -> list[Diagnostic]:
    found: list[Diagnostic] = []
    meta = [name for name, param, _ in owned if param.device.type == "meta"]
    if meta:
        found.append(META_DEVICE(
            f"{len(meta)} parameter(s) are on the meta device (first: {meta[0]}): the weights were never "
            "loaded. Load the model with its weights before preparing it; plan_preparation sizes it as is."))
    if not owned:
        found.append(NO_PARAMETERS(
            f"{type(model).__name__} has no parameters: there is nothing to prepare or train. "
            "Pass the model that holds the weights (what from_pretrained returned), not a part of it "
            "or an empty container."))
    return found


def plan_preparation(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
    auto_clear_cache: bool = True,
    *,
    upcast: str = "all",
    every_n_layers: int = 1,
    offload: bool = False,
    activation_checkpointing_kwargs: dict[str, Any] | None = None,
) -> PreparationPlan:
    """Plan what `prepare_model_for_kbit_training` would do, changing nothing.

    Args:
        model (nn.Module): the model, quantized or not; the meta device is fine.
        use_gradient_checkpointing (bool): checkpoint activations of a quantized model. Default: True
        gradient_checkpointing_kwargs (dict | None): options for `torch.utils.checkpoint.checkpoint`.
            `use_reentrant` defaults to True, the seed's (and torch's implicit) choice. Default: None
        auto_clear_cache (bool): release the accelerator cache after casting. Default: True
        upcast (str): which half-precision parameters go to float32: ``"all"`` (the seed's rule),
            ``"norms"`` (only normalisation layers), ``"none"``. Default: ``"all"``
        every_n_layers (int): checkpoint every n-th layer, where transformers supports it. Default: 1
        offload (bool): keep checkpointed activations in host memory, where supported. Default: False
        activation_checkpointing_kwargs (dict | None): `gradient_checkpointing_kwargs` by peft 0.22's
            name for it; pass one of the two. Default: None

    Returns:
        PreparationPlan: the plan; `str()` for a table, `.to_dict()` for JSON.

    Raises:
        TypeError: `model` is not a torch module, or an argument has the wrong type.
        ValueError: an argument has a value that is not allowed.

    Example:
        >>> plan = plan_preparation(model, upcast="norms")
        >>> plan.bytes_after / plan.bytes_before
        1.02
    """
    if activation_checkpointing_kwargs is not None:
        if gradient_checkpointing_kwargs is not None:
            raise InvalidArgumentError("pass gradient_checkpointing_kwargs or activation_checkpointing_kwargs (peft "
                                       "0.22's name for the same options), not both")
        gradient_checkpointing_kwargs = activation_checkpointing_kwargs
    kwargs = validate_arguments(model, use_gradient_checkpointing, gradient_checkpointing_kwargs,
                                auto_clear_cache, upcast, every_n_layers, offload)
    detection = detect_quantization(model)
    owned = tuple(_owned_parameters(model))  # one walk over the model, shared by every step below
    casts, cast_reason = _plan_casts(model, owned, detection, upcast)
    checkpointing = plan_checkpointing(
        model, quantized=detection.backend is not None, use_gradient_checkpointing=use_gradient_checkpointing,
        kwargs=kwargs, every_n_layers=every_n_layers, offload=offload,
    )
    keep = _is_peft_model(model)
    trainable = [name for name, param, _ in owned if param.requires_grad]
    loose = _unquantized_weights(model, owned, detection)
    diagnostics = [*_model_warnings(model, owned, detection, upcast, casts, loose),
                   *_slow_precision_warnings(model, owned, casts, detection), *checkpointing.warnings,
                   *_model_errors(model, owned), *checkpointing.errors]

    return PreparationPlan(
        detection=detection,
        upcast=upcast,
        cast_reason=cast_reason,
        casts=casts,
        frozen=() if keep else tuple(trainable),
        kept_trainable=tuple(trainable) if keep else (),
        parameter_counts=_count_parameters(owned, detection),
        training_layout=detection.behaviour.training_layout(model),
        unquantized_weights=tuple(name for name, _, _ in loose),
        bytes_before=model_bytes(model),
        checkpointing=checkpointing.plan,
        diagnostics=tuple(diagnostics),
    )


_MAX_CAST_ROWS = 12


def format_plan(plan: PreparationPlan) -> str:
    """A plan as a two-column table, with the casts listed underneath (`str(plan)`). It only reads the plan."""
    counts = plan.parameter_counts
    ratio = plan.bytes_after / plan.bytes_before if plan.bytes_before else 1.0
    ckpt = plan.checkpointing
    if ckpt.enabled:
        extras = [f"kwargs {dict(ckpt.kwargs)}"]
        if ckpt.every_n_layers != 1:
            extras.append(f"every {ckpt.every_n_layers} layers")
        if ckpt.offload:
            extras.append("offloaded to host")
        extras.append("input-grad hook" if ckpt.input_grad_hook else "no input-grad hook")
        checkpointing = f"on via {ckpt.method}, " + ", ".join(extras)
    else:
        checkpointing = f"off ({ckpt.reason})"
    rows = [
        ("quantization", f"{plan.quantization or 'none'} ({plan.detection.evidence})"),
        ("parameters", " | ".join(f"{kind} {format_count(n)}" for kind, n in counts.items())),
        ("frozen", f"{len(plan.frozen)} parameter tensors"
                   + (f"; {len(plan.kept_trainable)} kept trainable" if plan.kept_trainable else "")),
        ("upcast", plan.cast_reason),
        ("casts", f"{len(plan.casts)} parameters, +{format_bytes(sum(c.bytes_added for c in plan.casts))}"),
        ("bytes", f"{format_bytes(plan.bytes_before)} -> {format_bytes(plan.bytes_after)} (x{ratio:.3f})"),
        ("checkpointing", checkpointing),
    ]
    if plan.training_layout:
        rows.append(plan.detection.behaviour.describe_training_layout(plan.training_layout))
    rows += [("warning", message) for message in plan.warnings]
    rows += [("error", message) for message in plan.errors]
    width = max(len(key) for key, _ in rows)
    lines = ["kbitprep preparation plan"] + [f"  {key:<{width}}  {value}" for key, value in rows]
    if plan.casts:
        name_width = min(60, max(len(cast.name) for cast in plan.casts))
        lines.append(f"  {'':<{width}}  {'parameter':<{name_width}}  {'from':<9} {'to':<8} {'added':>11}")
        for cast in plan.casts[:_MAX_CAST_ROWS]:
            lines.append(f"  {'':<{width}}  {cast.name:<{name_width}}  {str(cast.from_dtype)[6:]:<9} "
                         f"{str(cast.to_dtype)[6:]:<8} {'+' + format_bytes(cast.bytes_added):>11}")
        if len(plan.casts) > _MAX_CAST_ROWS:
            lines.append(f"  {'':<{width}}  ... and {len(plan.casts) - _MAX_CAST_ROWS} more (to_dict() lists all)")
    return "\n".join(lines)
