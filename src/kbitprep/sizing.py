"""Sizing a model from its config alone: a quantized skeleton on the meta device.

`build_meta_model` builds the model that `from_pretrained(..., quantization_config=...)`
would give, with no weights and no memory: the same layers replaced by bitsandbytes ones
(by transformers' own rules for what is left unquantized), and each 4-bit weight given
the packed shape and storage dtype that quantizing it produces. `plan_preparation` on
that skeleton then reports the bytes of the real thing, so a 70B run is sized in seconds.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["QUANTIZE_CHOICES", "bnb_config_for", "build_meta_model", "load_config"]

# --quantize values -> BitsAndBytesConfig arguments (None: not quantized).
QUANTIZE_CHOICES: Mapping[str, Mapping[str, Any] | None] = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "int8": {"load_in_8bit": True},
    "none": None,
}


def bnb_config_for(quantize: str, compute_dtype: torch.dtype | None = None):
    """The `BitsAndBytesConfig` for a `--quantize` value, or None for "none".

    Raises:
        ValueError: `quantize` is not one of `QUANTIZE_CHOICES`.
    """
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {sorted(QUANTIZE_CHOICES)}, not {quantize!r}")
    arguments = QUANTIZE_CHOICES[quantize]
    if arguments is None:
        return None
    from transformers import BitsAndBytesConfig

    extra = {"bnb_4bit_compute_dtype": compute_dtype} if compute_dtype is not None and "load_in_4bit" in arguments else {}
    return BitsAndBytesConfig(**arguments, **extra)


def load_config(config_or_path: Any):
    """A transformers config from a config object, a dict, a model folder or a config.json path.

    Raises:
        FileNotFoundError: the folder has no config.json.
        ValueError: the file is not valid JSON or names no known `model_type`.
    """
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config_or_path, PretrainedConfig):
        return config_or_path
    if isinstance(config_or_path, Mapping):
        data = dict(config_or_path)
    else:
        path = os.fspath(config_or_path)
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file}: no such file; a model folder needs a config.json")
        try:
            with open(file, encoding="utf-8") as handle:
                data = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{file}: not valid JSON ({error})") from None
    model_type = data.pop("model_type", None)
    if not model_type:
        raise ValueError("the config has no 'model_type' (e.g. \"llama\"), so the architecture is unknown")
    try:
        return AutoConfig.for_model(model_type, **data)
    except ValueError as error:
        raise ValueError(f"model_type {model_type!r} is not one this transformers knows ({error})") from None


def _skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The model for `config` on the meta device, through the first Auto class that takes it."""
    import transformers

    errors = []
    for auto in ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModel"):
        try:
            with torch.device("meta"):
                return getattr(transformers, auto).from_config(config, dtype=dtype)
        except ValueError as error:  # "Unrecognized configuration class ... for this kind of AutoModel"
            errors.append(f"{auto}: {error}")
    raise ValueError(f"no transformers model class takes this config: {'; '.join(errors)}")


def _modules_not_to_convert(model: nn.Module, bnb_config) -> list[str]:
    """transformers' own list of layers it leaves unquantized (the LM head, tied weights, skips)."""
    skip = list(bnb_config.llm_int8_skip_modules or [])
    keep_fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    try:  # transformers 5
        from transformers.quantizers.base import HfQuantizer

        return HfQuantizer.get_modules_to_not_convert(model, bnb_config.llm_int8_skip_modules, keep_fp32)
    except (ImportError, AttributeError):
        pass
    try:  # transformers 4
        from transformers.integrations.bitsandbytes import get_keys_to_not_convert

        return list(get_keys_to_not_convert(model)) + skip + keep_fp32
    except ImportError:
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return [name for name, module in model.named_modules() if module is output] + skip + keep_fp32


def _pack_like_a_real_load(model: nn.Module, bnb_config, dtype: torch.dtype) -> None:
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
            state = QuantState(absmax=torch.empty(0, device="meta"), shape=weight.shape, blocksize=64,
                               quant_type=bnb_config.bnb_4bit_quant_type, dtype=dtype)
            module.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, bnb_quantized=True,
                                              quant_type=bnb_config.bnb_4bit_quant_type, quant_storage=storage,
                                              module=module)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            module.weight.data = torch.empty(module.weight.shape, dtype=torch.int8, device="meta")


def build_meta_model(config_or_path: Any, *, quantize: str = "nf4", dtype: torch.dtype | None = None) -> nn.Module:
    """The model a quantized `from_pretrained` would load, on the meta device (no weights, no memory).

    Args:
        config_or_path: a transformers config, a config dict, a model folder or a config.json path.
        quantize (str): "nf4" (with double quantization), "fp4", "int8" or "none". Default: "nf4"
        dtype (torch.dtype | None): dtype of the unquantized weights; None takes the config's
            (as `from_pretrained` does), else float32. Default: None

    Returns:
        nn.Module: the skeleton, with bitsandbytes layers where a real load has them.

    Raises:
        FileNotFoundError / ValueError: the config cannot be read or names no known model.

    Example:
        >>> model = build_meta_model("configs/llama-3-70b/config.json")
        >>> plan_preparation(model, upcast="norms").bytes_after
    """
    config = load_config(config_or_path)
    configured = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(configured, str):
        configured = getattr(torch, configured, None)
    dtype = dtype or (configured if isinstance(configured, torch.dtype) else torch.float32)
    bnb_config = bnb_config_for(quantize, compute_dtype=dtype)
    model = _skeleton(config, dtype)
    if bnb_config is None:
        return model

    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    model = replace_with_bnb_linear(model, modules_to_not_convert=_modules_not_to_convert(model, bnb_config),
                                    quantization_config=bnb_config)
    _pack_like_a_real_load(model, bnb_config, dtype)
    flag = "is_loaded_in_4bit" if bnb_config.load_in_4bit else "is_loaded_in_8bit"
    setattr(model, flag, True)
    model.is_quantized = True
    model.config.quantization_config = bnb_config
    return model
