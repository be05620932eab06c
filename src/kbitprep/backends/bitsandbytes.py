"""Everything kbitprep does that is specific to bitsandbytes.

- The classes that mark a model as bitsandbytes-quantized (used by the backend table).
- `BitsAndBytes`, the behaviour of the two bitsandbytes rows: how many values a packed
  4-bit tensor represents, the warnings about 4-bit layers that cannot train (a weight
  never quantized, a float quant storage that FSDP cannot mix with float32), and the CPU
  training layout (see `BitsAndBytes.training_layout`).
- The `--quantize` choices and the meta-device skeleton that `kbitprep.sizing` builds
  (`bnb_config_for`, `quantize_skeleton`).
- What a folder saved already quantized holds (`saved_quantization`), and the rule that
  reconciles it with a requested `--quantize` (`resolve_quantize`).

bitsandbytes itself is imported only inside functions, where it is really used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..diagnostics import Diagnostic, warning_code
from ..errors import InvalidArgumentError
from .base import BackendBehaviour, OwnedParameter, class_matches, is_plain_tensor

__all__ = [
    "BITSANDBYTES",
    "CLASSES_4BIT",
    "CLASSES_8BIT",
    "QUANTIZE_AUTO",
    "QUANTIZE_CHOICES",
    "BitsAndBytes",
    "QuantizeConflictError",
    "SavedQuantization",
    "UnsupportedQuantizationError",
    "bnb_config_for",
    "quantize_skeleton",
    "resolve_quantize",
    "saved_quantization",
]

CLASSES_4BIT = ("bitsandbytes.nn.modules.Params4bit", "bitsandbytes.nn.modules.Linear4bit")
CLASSES_8BIT = ("bitsandbytes.nn.modules.Int8Params", "bitsandbytes.nn.modules.Linear8bitLt")

QUANT_STORAGE_WITH_UPCAST = warning_code(
    "bnb-quant-storage-with-upcast",
    "4-bit weights stored in a float dtype (FSDP-QLoRA) while upcast='all' casts others to float32")
UNQUANTIZED_4BIT_LAYERS = warning_code(
    "bnb-unquantized-4bit-layers",
    "bitsandbytes 4-bit layers hold weights that were never quantized (usually a new head)")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class BitsAndBytes(BackendBehaviour):
    """The behaviour of the bitsandbytes 4-bit and 8-bit rows (their checks look for 4-bit layers)."""

    def logical_numel(self, tensor: torch.Tensor) -> int:
        # Packed 4-bit storage holds two values per byte; its quant state keeps the real shape.
        shape = getattr(getattr(tensor, "quant_state", None), "shape", None)
        return int(torch.Size(shape).numel()) if shape is not None else tensor.numel()

    def diagnostics(self, model: nn.Module, parameters: Sequence[OwnedParameter], *, upcast: str,
                    casts: int) -> list[Diagnostic]:
        found: list[Diagnostic] = []
        storage_dtypes = {p.dtype for _, p, _ in parameters if not is_plain_tensor(p) and p.is_floating_point()
                          and getattr(p, "quant_state", None) is not None}
        if storage_dtypes and casts and upcast == "all":
            found.append(QUANT_STORAGE_WITH_UPCAST(
                f"4-bit weights are stored as {sorted(map(_dtype_name, storage_dtypes))} (FSDP-QLoRA quant storage) "
                "but upcast='all' casts other parameters to float32; FSDP cannot flatten mixed dtypes. "
                "Pass upcast='none' to keep one dtype."))
        unquantized = _4bit_layers_without_quant_state(model, parameters)
        if unquantized:
            skip = [name.rsplit(".", 1)[-1] for name in unquantized]
            found.append(UNQUANTIZED_4BIT_LAYERS(
                f"{len(unquantized)} bitsandbytes 4-bit layer(s) hold no quantized weights (first: {unquantized[0]}); "
                "their first forward fails with 'quantization state not initialized' on CPU. Usually a newly "
                "initialised head: keep it out of quantization with "
                f"BitsAndBytesConfig(llm_int8_skip_modules={sorted(set(skip))!r})."))
        return found

    def training_layout(self, model: nn.Module) -> tuple[str, ...]:
        """4-bit layers that repack their weights for CPU inference, or already have.

        On a CPU with AVX512-BF16, bitsandbytes' `Linear4bit` rewrites its weight for good into
        a packed inference layout the first time it runs forward in eval mode, and computes
        with a kernel that has no autograd from then on: every later training step sends
        silently wrong gradients to the adapters below each frozen layer (torch only warns that
        "an autograd kernel was not registered"). Preparing for training switches that off.
        """
        def repacked(module: nn.Module) -> bool:
            state = getattr(getattr(module, "weight", None), "quant_state", None)
            return bool(getattr(state, "packing_format_for_cpu", False))

        return tuple(name for name, module in model.named_modules()
                     if getattr(module, "support_avx512bf16_for_cpu", False) or repacked(module))

    def describe_training_layout(self, layers: Sequence[str]) -> tuple[str, str]:
        text = f"CPU inference repacking off for {len(layers)} bitsandbytes layers (its kernel has no autograd)"
        return "4-bit layout", text

    def restore_training_layout(self, model: nn.Module, layers: Sequence[str]) -> None:
        """Switch off the CPU inference repacking of each named layer, and unpack a weight already repacked.

        A weight is repacked when a forward ran in eval mode before preparation (a sample
        generation, say); see `training_layout` for why it matters.
        """
        modules = dict(model.named_modules())
        for name in layers:
            module = modules[name]
            module.support_avx512bf16_for_cpu = False
            weight = module.weight
            # A layer whose weight was never quantized (a new head missing from the checkpoint)
            # has no quant_state; planning warns about it by name.
            if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
                from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

                unpacked = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
                weight.data, weight.quant_state = unpacked


BITSANDBYTES = BitsAndBytes()


def _4bit_layers_without_quant_state(model: nn.Module, parameters: Sequence[OwnedParameter]) -> list[str]:
    """Names of 4-bit layers (or loose 4-bit weights) whose weight was never quantized.

    transformers swaps a layer for a `Linear4bit` before loading; a layer missing from the
    checkpoint (a new classification head) keeps a plain, unquantized weight, and on CPU
    its first forward fails deep inside bitsandbytes.
    """
    found: list[str] = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.device.type == "meta":
            continue
        if class_matches(type(module), CLASSES_4BIT) and getattr(weight, "quant_state", None) is None:
            found.append(name or "<root>")
    for name, param, _ in parameters:
        owner = name.rsplit(".", 1)[0] if "." in name else "<root>"
        if getattr(param, "bnb_quantized", True) is False and param.device.type != "meta" and owner not in found:
            found.append(owner)
    return found


# ---------------------------------------------------------------- loading and sizing

# --quantize values -> BitsAndBytesConfig arguments (None: not quantized).
QUANTIZE_CHOICES: Mapping[str, Mapping[str, Any] | None] = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "int8": {"load_in_8bit": True},
    "none": None,
}


# "As the folder stores it": a folder saved already quantized keeps its quantization, any other gets nf4.
QUANTIZE_AUTO = "auto"
_AUTO_FALLBACK = "nf4"


class UnsupportedQuantizationError(InvalidArgumentError):
    """A config.json records a quantization kbitprep cannot load for training (gptq, awq, ...)."""


class QuantizeConflictError(InvalidArgumentError):
    """A `--quantize` that contradicts the quantization a folder was saved with."""


@dataclasses.dataclass(frozen=True)
class SavedQuantization:
    """What a model folder saved already quantized by bitsandbytes holds (its config's `quantization_config`).

    Args:
        quantize (str): the `--quantize` name of its format: "nf4", "fp4" or "int8".
        double_quant (bool): 4-bit block scales quantized again (`bnb_4bit_use_double_quant`).
        storage (str): the dtype packed 4-bit values are stored in (`bnb_4bit_quant_storage`).
        compute_dtype (str | None): the dtype its 4-bit layers were saved computing in.
        record (Mapping[str, Any]): the `quantization_config` as saved.
    """

    quantize: str
    double_quant: bool
    storage: str
    compute_dtype: str | None
    record: Mapping[str, Any] = dataclasses.field(repr=False, compare=False)

    def describe(self) -> str:
        """In words, for messages: "nf4 with double quantization"."""
        if self.quantize == "int8":
            return "int8"
        extras = [*(["double quantization"] if self.double_quant else []),
                  *([f"{self.storage} storage"] if self.storage != "uint8" else [])]
        return self.quantize + (f" with {' and '.join(extras)}" if extras else "")

    def bnb_config(self, compute_dtype: torch.dtype | None = None) -> Any:
        """The `BitsAndBytesConfig` it was saved with; 4-bit layers computing in `compute_dtype` if given."""
        from transformers import BitsAndBytesConfig

        config = BitsAndBytesConfig.from_dict(dict(self.record))
        if compute_dtype is not None and self.quantize != "int8":
            config.bnb_4bit_compute_dtype = compute_dtype
        return config


def saved_quantization(config: Any) -> SavedQuantization | None:
    """What a config (a dict, a transformers config) says its weights were saved as; None: not quantized.

    Raises:
        UnsupportedQuantizationError: the weights are quantized by another method (gptq, awq,
            ...), which kbitprep does not train from; the message names what it supports.
    """
    if isinstance(config, Mapping):
        record = config.get("quantization_config")
    else:
        record = getattr(config, "quantization_config", None)
    if record is not None and not isinstance(record, Mapping):
        record = record.to_dict()  # a QuantizationConfig object
    if not record:
        return None
    method = str(record.get("quant_method", "bitsandbytes"))
    four_bit, eight_bit = bool(record.get("load_in_4bit")), bool(record.get("load_in_8bit"))
    if method != "bitsandbytes" or not (four_bit or eight_bit):
        raise UnsupportedQuantizationError(
            f"the weights are saved quantized by {method!r}, which kbitprep does not load for training; it takes "
            "models saved quantized by bitsandbytes (4-bit nf4/fp4, 8-bit) or full-precision ones. Use the "
            "model's full-precision folder")
    if eight_bit:
        return SavedQuantization("int8", False, "uint8", None, record)
    quant_type = str(record.get("bnb_4bit_quant_type", "fp4"))
    if quant_type not in ("nf4", "fp4"):
        raise UnsupportedQuantizationError(f"bitsandbytes 4-bit type {quant_type!r} is not one kbitprep knows "
                                           "(nf4, fp4); use the model's full-precision folder")
    compute = record.get("bnb_4bit_compute_dtype")
    return SavedQuantization(quant_type, bool(record.get("bnb_4bit_use_double_quant")),
                             str(record.get("bnb_4bit_quant_storage") or "uint8").removeprefix("torch."),
                             str(compute).removeprefix("torch.") if compute else None, record)


def resolve_quantize(config: Any, requested: str, *, where: str = "the model") -> tuple[str, SavedQuantization | None]:
    """The `--quantize` a run uses on a model, and what the model was saved quantized as.

    The rule: a folder saved already quantized is loaded as saved, never quantized twice;
    "auto" means exactly that, and nf4 for a folder that is not quantized. An explicit
    format equal to the saved one is accepted (double quantization and the storage dtype
    then come from the folder); any other is refused, since the full-precision weights it
    would need are not there.

    Args:
        config (Any): the model's config (a dict or a transformers config).
        requested (str): "auto" or a name in `QUANTIZE_CHOICES`.
        where (str): the folder, for messages. Default: "the model"

    Returns:
        tuple[str, SavedQuantization | None]: the resolved name, and the saved quantization (None: not quantized).

    Raises:
        QuantizeConflictError: `requested` contradicts the saved quantization.
        UnsupportedQuantizationError: the model is saved quantized by a method other than bitsandbytes.
        InvalidArgumentError: `requested` is not a known choice.
    """
    if requested != QUANTIZE_AUTO and requested not in QUANTIZE_CHOICES:
        raise InvalidArgumentError(f"quantize must be one of {[QUANTIZE_AUTO, *QUANTIZE_CHOICES]}, not {requested!r}")
    saved = saved_quantization(config)
    if saved is None:
        return (_AUTO_FALLBACK if requested == QUANTIZE_AUTO else requested), None
    if requested in (QUANTIZE_AUTO, saved.quantize):
        return saved.quantize, saved
    why = ("would need the full-precision weights, and the folder holds only the quantized ones"
           if requested == "none" else "would quantize it a second time, from weights already rounded")
    raise QuantizeConflictError(
        f"{where}: is saved already quantized by bitsandbytes ({saved.describe()}); --quantize {requested} {why}. "
        f"Leave --quantize out (auto loads it as saved) or pass --quantize {saved.quantize}; for another format "
        "start from the full-precision model")


def bnb_config_for(quantize: str, compute_dtype: torch.dtype | None = None) -> Any:
    """The `BitsAndBytesConfig` for a `--quantize` value, or None for "none".

    Raises:
        ValueError: `quantize` is not one of `QUANTIZE_CHOICES`.
    """
    if quantize not in QUANTIZE_CHOICES:
        raise InvalidArgumentError(f"quantize must be one of {sorted(QUANTIZE_CHOICES)}, not {quantize!r}")
    arguments = QUANTIZE_CHOICES[quantize]
    if arguments is None:
        return None
    from transformers import BitsAndBytesConfig

    extra = {}
    if compute_dtype is not None and "load_in_4bit" in arguments:
        extra["bnb_4bit_compute_dtype"] = compute_dtype
    return BitsAndBytesConfig(**arguments, **extra)


def _modules_not_to_convert(model: Any, bnb_config: Any) -> list[str]:
    """transformers' own list of layers it leaves unquantized (the LM head, tied weights, skips)."""
    skip = list(bnb_config.llm_int8_skip_modules or [])
    keep_fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    try:  # transformers 5
        from transformers.quantizers.base import HfQuantizer

        return list(HfQuantizer.get_modules_to_not_convert(model, bnb_config.llm_int8_skip_modules, keep_fp32))
    except (ImportError, AttributeError):
        pass
    try:  # transformers 4
        from transformers.integrations.bitsandbytes import get_keys_to_not_convert  # type: ignore[attr-defined]

        return list(get_keys_to_not_convert(model)) + skip + keep_fp32
    except ImportError:
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return [name for name, module in model.named_modules() if module is output] + skip + keep_fp32


def _pack_like_a_real_load(model: nn.Module, bnb_config: Any, dtype: torch.dtype) -> None:
    """Give each bitsandbytes weight the shape and dtype quantizing it produces."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState

    for module in model.modules():
        if getattr(module, "bias", None) is not None and isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            module.bias.data = torch.empty_like(module.bias, dtype=dtype, device="meta")
        if isinstance(module, bnb.nn.Linear4bit):
            weight = module.weight
            storage = bnb_config.bnb_4bit_quant_storage
            storage = getattr(torch, storage) if isinstance(storage, str) else storage
            numel = weight.numel()
            # bitsandbytes packs two 4-bit values per byte into a column of storage elements.
            packed = torch.empty(((numel + 1) // (2 * storage.itemsize), 1), dtype=storage, device="meta")
            state = _quant_state(QuantState, weight.shape, bnb_config, dtype)
            module.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, bnb_quantized=True,
                                              quant_type=bnb_config.bnb_4bit_quant_type, quant_storage=storage,
                                              module=module)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            int8: Any = module.weight  # an Int8Params, with attributes torch's Tensor type does not know
            int8.data = torch.empty(int8.shape, dtype=torch.int8, device="meta")
            # int8 quantization leaves the int8 rows (CB, the weight itself) and one fp32 scale per row
            int8.CB = int8.data
            int8.SCB = torch.empty(int8.shape[0], dtype=torch.float32, device="meta")


# bitsandbytes' 4-bit block sizes: values per fp32 scale, and scales per scale of the scales.
_BLOCKSIZE, _NESTED_BLOCKSIZE = 64, 256


def _quant_state(QuantState: Any, shape: torch.Size, bnb_config: Any, dtype: torch.dtype) -> Any:
    """A 4-bit weight's quantization state with the tensors a real load gives it, on meta.

    One scale per block of 64 values (fp32; with double quantization uint8 codes, plus an
    offset and, per 256 of them, one fp32 scale and a 256-entry code table), and the
    16-entry code table of the 4-bit format. The memory model counts them.
    """
    blocks = -(-shape.numel() // _BLOCKSIZE)
    code = torch.empty(16, dtype=torch.float32, device="meta")
    if not bnb_config.bnb_4bit_use_double_quant:
        return QuantState(absmax=torch.empty(blocks, dtype=torch.float32, device="meta"), shape=shape, code=code,
                          blocksize=_BLOCKSIZE, quant_type=bnb_config.bnb_4bit_quant_type, dtype=dtype)
    nested = QuantState(absmax=torch.empty(-(-blocks // _NESTED_BLOCKSIZE), dtype=torch.float32, device="meta"),
                        code=torch.empty(256, dtype=torch.float32, device="meta"), blocksize=_NESTED_BLOCKSIZE,
                        dtype=torch.float32)
    return QuantState(absmax=torch.empty(blocks, dtype=torch.uint8, device="meta"), shape=shape, code=code,
                      blocksize=_BLOCKSIZE, quant_type=bnb_config.bnb_4bit_quant_type, dtype=dtype,
                      offset=torch.empty((), dtype=torch.float32, device="meta"), state2=nested)


def quantize_skeleton(model: nn.Module, bnb_config: Any, dtype: torch.dtype) -> nn.Module:
    """A meta-device model with bitsandbytes layers where a real quantized load puts them.

    Layers are replaced by transformers' own rules for what stays unquantized, each weight
    gets the packed shape and storage dtype quantizing produces, and the model carries the
    flags a real load sets, so `detect_quantization` and `plan_preparation` see the real thing.
    """
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    skeleton: Any = replace_with_bnb_linear(model, modules_to_not_convert=_modules_not_to_convert(model, bnb_config),
                                            quantization_config=bnb_config)
    _pack_like_a_real_load(skeleton, bnb_config, dtype)
    flag = "is_loaded_in_4bit" if bnb_config.load_in_4bit else "is_loaded_in_8bit"
    setattr(skeleton, flag, True)
    skeleton.is_quantized = True
    skeleton.config.quantization_config = bnb_config
    return skeleton
