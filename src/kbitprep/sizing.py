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

# The --quantize choices are bitsandbytes configurations; that backend's module owns them.
from .backends.bitsandbytes import QUANTIZE_AUTO, QUANTIZE_CHOICES, bnb_config_for, quantize_skeleton, resolve_quantize
from .errors import InvalidArgumentError, MissingFileError

__all__ = ["QUANTIZE_AUTO", "QUANTIZE_CHOICES", "bnb_config_for", "build_meta_model", "load_config"]


def load_config(config_or_path: Any) -> Any:
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
            raise MissingFileError(f"{file}: no such file; a model folder needs a config.json")
        try:
            with open(file, encoding="utf-8") as handle:
                data = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise InvalidArgumentError(f"{file}: not valid JSON ({error})") from None
    model_type = data.pop("model_type", None)
    if not model_type:
        raise InvalidArgumentError("the config has no 'model_type' (e.g. \"llama\"), so the architecture is unknown")
    try:
        return AutoConfig.for_model(model_type, **data)
    except ValueError as error:
        raise InvalidArgumentError(f"model_type {model_type!r} is not one this transformers knows ({error})") from None


def _skeleton(config: Any, dtype: torch.dtype) -> nn.Module:
    """The model for `config` on the meta device, through the first Auto class that takes it."""
    import transformers

    errors = []
    for auto in ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModel"):
        try:
            with torch.device("meta"):
                return getattr(transformers, auto).from_config(config, dtype=dtype)
        except ValueError as error:  # "Unrecognized configuration class ... for this kind of AutoModel"
            errors.append(f"{auto}: {error}")
    raise InvalidArgumentError(f"no transformers model class takes this config: {'; '.join(errors)}")


def build_meta_model(config_or_path: Any, *, quantize: str = "nf4", dtype: torch.dtype | None = None,
                     compute_dtype: torch.dtype | None = None) -> nn.Module:
    """The model a quantized `from_pretrained` would load, on the meta device (no weights, no memory).

    Args:
        config_or_path: a transformers config, a config dict, a model folder or a config.json path.
        quantize (str): "nf4" (with double quantization), "fp4", "int8", "none", or "auto": as the config
            says the weights were saved quantized, else nf4. A config saved quantized by bitsandbytes is
            built as saved (its double quantization and storage dtype included), and a `quantize`
            contradicting it is refused (`kbitprep.backends.bitsandbytes.resolve_quantize`). Default: "nf4"
        dtype (torch.dtype | None): dtype of the unquantized weights; None takes the config's
            (as `from_pretrained` does), else float32. Default: None
        compute_dtype (torch.dtype | None): the dtype 4-bit layers compute in; None: `dtype`. Default: None

    Returns:
        nn.Module: the skeleton, with bitsandbytes layers where a real load has them.

    Raises:
        FileNotFoundError / ValueError: the config cannot be read or names no known model, or
            `quantize` contradicts the quantization it was saved with.

    Example:
        >>> model = build_meta_model("configs/llama-3-70b/config.json")
        >>> plan_preparation(model, upcast="norms").bytes_after
    """
    config = load_config(config_or_path)
    configured = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(configured, str):
        configured = getattr(torch, configured, None)
    dtype = dtype or (configured if isinstance(configured, torch.dtype) else torch.float32)
    quantize, saved = resolve_quantize(config, quantize)
    bnb_config = saved.bnb_config(compute_dtype or dtype) if saved is not None \
        else bnb_config_for(quantize, compute_dtype=compute_dtype or dtype)
    model = _skeleton(config, dtype)
    return model if bnb_config is None else quantize_skeleton(model, bnb_config, dtype)
