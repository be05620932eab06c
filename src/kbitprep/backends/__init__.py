"""What each quantization backend is and how to recognise it on a model.

One table, `BACKENDS`, holds a row per backend. A model is matched against it in three
passes, and the first pass that finds something wins:

1. the flags transformers sets when it loads a model (`is_loaded_in_4bit`, ...);
2. the method name transformers records (`model.quantization_method`, the quantizer,
   or `config.quantization_config["quant_method"]`);
3. the types of the model's tensors and layers, so that a model quantized by hand,
   outside `from_pretrained`, is recognised too.

Adding a backend is adding a row; a backend whose plan or preparation needs more than
data (extra warnings, a training-layout fix) carries a `BackendBehaviour` in its row,
written in its own module here (see `base.py` and `bitsandbytes.py`). Every value of the installed transformers'
`QuantizationMethod` that has no row of its own gets a generic one, so a backend that
transformers learns about later is still recognised (and left at its own precision).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
from torch import nn

from .base import NO_BEHAVIOUR, Backend, BackendBehaviour, is_plain_tensor, qualified_name
from .bitsandbytes import BITSANDBYTES, CLASSES_4BIT, CLASSES_8BIT

__all__ = [
    "BACKENDS",
    "RECOMMENDED_BACKEND",
    "UNKNOWN_BACKEND",
    "Backend",
    "BackendBehaviour",
    "Detection",
    "detect_quantization",
    "is_plain_tensor",
    "quantized_tensor_backend",
]


# Order matters only inside pass 3 (first match wins); the flags and method names do not overlap.
_ROWS: tuple[Backend, ...] = (
    Backend("bitsandbytes-4bit", "bitsandbytes", upcast_allowed=True, flags=("is_loaded_in_4bit",),
            packages=CLASSES_4BIT, behaviour=BITSANDBYTES,
            compute_float32="load with BitsAndBytesConfig(bnb_4bit_compute_dtype=torch.float32) so the 4-bit layers "
                            "compute in float32 (kbitprep finetune: --compute-dtype auto picks it)",
            load_for_qlora="Load it with a BitsAndBytesConfig for QLoRA"),
    Backend("bitsandbytes-8bit", "bitsandbytes", upcast_allowed=True, flags=("is_loaded_in_8bit",),
            packages=CLASSES_8BIT, behaviour=BITSANDBYTES,
            compute_float32="load with from_pretrained(..., dtype=torch.float32) beside BitsAndBytesConfig("
                            "load_in_8bit=True): its int8 layers compute in the dtype of their input"),
    Backend("gptq", "gptq", packages=("auto_gptq.", "gptqmodel.", "optimum.gptq.")),
    Backend("awq", "awq", packages=("awq.",)),
    Backend("aqlm", "aqlm", packages=("aqlm.",)),
    Backend("vptq", "vptq", packages=("vptq.",)),
    Backend("quanto", "quanto", packages=("optimum.quanto.", "quanto."),
            compute_float32="load with from_pretrained(..., dtype=torch.float32) beside QuantoConfig(weights=...): "
                            "quanto's layers compute in the dtype of their activations"),
    Backend("eetq", "eetq", packages=("eetq.",)),
    Backend("higgs", "higgs", packages=("flute.", "transformers.integrations.higgs.")),
    Backend("hqq", "hqq", flags=("hqq_quantized",), packages=("hqq.",)),
    Backend("compressed-tensors", "compressed-tensors", packages=("compressed_tensors.",)),
    Backend("fbgemm_fp8", "fbgemm_fp8", packages=("transformers.integrations.fbgemm_fp8.",)),
    Backend("torchao", "torchao", packages=("torchao.",),
            compute_float32="load with from_pretrained(..., dtype=torch.float32) beside TorchAoConfig(...): "
                            "torchao's weight-only layers compute in the dtype of their activations"),
    Backend("bitnet", "bitnet", packages=("transformers.integrations.bitnet.",)),
    Backend("spqr", "spqr", packages=("spqr_quant.",)),
    Backend("fp8", "fp8", packages=("transformers.integrations.finegrained_fp8.",)),
    Backend("mxfp4", "mxfp4", packages=("transformers.integrations.mxfp4.", "triton_kernels.")),
)


def _all_backends() -> tuple[Backend, ...]:
    """The rows above, plus a generic row for every other method transformers knows."""
    known = {row.method for row in _ROWS}
    try:
        from transformers.utils.quantization_config import QuantizationMethod
    except ImportError:  # transformers is optional for planning plain torch modules
        extra: list[str] = []
    else:
        extra = [m.value for m in QuantizationMethod if m.value not in known]
    return _ROWS + tuple(Backend(value, value) for value in extra)


BACKENDS: tuple[Backend, ...] = _all_backends()

# The backend kbitprep recommends for a model that is not quantized (its row says how to load with it).
RECOMMENDED_BACKEND: Backend = next(row for row in BACKENDS if row.load_for_qlora)

# A tensor subclass that no row claims: treated as quantized storage (never cast),
# and the model as quantized by a backend that manages its own precision.
UNKNOWN_BACKEND = Backend("unknown", "unknown")


@dataclasses.dataclass(frozen=True)
class Detection:
    """How a model's quantization was recognised.

    Args:
        backend (Backend | None): the matching row, or None for a model that is not quantized.
        evidence (str): what matched, for the plan, e.g. ``"model.is_loaded_in_4bit"``.
    """

    backend: Backend | None
    evidence: str

    @property
    def name(self) -> str | None:
        return self.backend.name if self.backend else None

    @property
    def behaviour(self) -> BackendBehaviour:
        """What planning and applying do for the backend; nothing for a model that is not quantized."""
        return self.backend.behaviour if self.backend else NO_BEHAVIOUR


def quantized_tensor_backend(tensor: torch.Tensor) -> Backend | None:
    """The backend owning a tensor's class; `UNKNOWN_BACKEND` for an unclaimed subclass; None if plain."""
    if is_plain_tensor(tensor):
        return None
    cls = type(tensor)
    return next((row for row in BACKENDS if row.owns_class(cls)), UNKNOWN_BACKEND)


def _method_name(model: nn.Module) -> str | None:
    """The quantization method transformers recorded for a model, as a plain string."""
    candidates = [getattr(model, "quantization_method", None)]
    quantizer = getattr(model, "hf_quantizer", None)
    candidates.append(getattr(getattr(quantizer, "quantization_config", None), "quant_method", None))
    config_entry = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(config_entry, dict):
        candidates.append(config_entry.get("quant_method"))
    else:
        candidates.append(getattr(config_entry, "quant_method", None))
    for value in candidates:
        if value:
            return str(getattr(value, "value", value))
    return None


def _by_flags(model: nn.Module) -> Detection | None:
    for row in BACKENDS:
        for flag in row.flags:
            if getattr(model, flag, False) is True:
                return Detection(row, f"model.{flag}")
    return None


def _by_method(model: nn.Module) -> Detection | None:
    method = _method_name(model)
    if method is None:
        return None
    rows = [row for row in BACKENDS if row.method == method]
    if len(rows) > 1:
        # Rows that share a method (bitsandbytes 4-bit and 8-bit): the flags above did not say which; the tensors do.
        return _by_tensors(model) or Detection(rows[0], f"quantization_method = {method}")
    if rows:
        return Detection(rows[0], f"quantization_method = {method}")
    return Detection(dataclasses.replace(UNKNOWN_BACKEND, name=method, method=method),
                     f"quantization_method = {method} (not a method this transformers knows)")


def _tensors_and_layers(model: nn.Module) -> Iterator[tuple[str, type]]:
    for name, tensor in model.named_parameters():
        yield name, type(tensor)
    for name, buffer in model.named_buffers():
        yield name, type(buffer)
    for name, module in model.named_modules():
        yield name or "<root>", type(module)


def _by_tensors(model: nn.Module) -> Detection | None:
    for name, cls in _tensors_and_layers(model):
        for row in BACKENDS:
            if row.owns_class(cls):
                return Detection(row, f"{name} is a {qualified_name(cls)}")
    for name, tensor in model.named_parameters():
        if quantized_tensor_backend(tensor) is UNKNOWN_BACKEND:
            return Detection(UNKNOWN_BACKEND,
                             f"{name} is a {qualified_name(type(tensor))}, a tensor subclass kbitprep does not know")
    return None


def detect_quantization(model: nn.Module) -> Detection:
    """Recognise how `model` is quantized. Reads only; changes nothing.

    Args:
        model (nn.Module): any torch module, usually a transformers `PreTrainedModel`.

    Returns:
        Detection: the backend row (None when the model is not quantized) and the evidence.

    Example:
        >>> detect_quantization(model).name
        'bitsandbytes-4bit'
    """
    for detect in (_by_flags, _by_method, _by_tensors):
        found = detect(model)
        if found is not None:
            return found
    return Detection(None, "no quantization flag, method or quantized tensor found")
