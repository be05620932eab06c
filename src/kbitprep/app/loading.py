"""Loading a local model folder: checks that need no model, the tokenizer, and the quantized model.

Models are local folders (config.json, weights, tokenizer); nothing is downloaded and no
remote code runs. The checks here name the file at fault, so a wrong path or a damaged
config costs a one-line error before anything heavy is imported.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..device import has_accelerator
from ..errors import KbitPrepError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "TOKENIZER_FILES",
    "WEIGHT_PATTERNS",
    "ModelFolderError",
    "check_model_folder",
    "compute_dtype",
    "error_summary",
    "has_weights",
    "load_quantized_model",
    "load_tokenizer",
    "resolve_compute_dtype",
]

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")


class ModelFolderError(KbitPrepError, ValueError):
    """A model folder is missing, unreadable or lacks a file it needs; the message names it."""


def check_model_folder(path: str | os.PathLike[str], *, need_weights: bool = True) -> dict[str, Any]:
    """Check a local model folder and return its config.json as a dict.

    Raises:
        ModelFolderError: the folder is missing or unreadable, has no (valid) config.json,
            or, with `need_weights`, no weight files; the message names the file.
    """
    folder = Path(path)
    if not folder.exists():
        raise ModelFolderError(f"{folder}: no such model folder (models are local folders; nothing is downloaded)")
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: is a file; pass the model's folder (the one holding config.json)")
    try:
        names = {entry.name for entry in folder.iterdir()}
    except OSError as error:
        raise ModelFolderError(f"{folder}: cannot be read ({error.strerror or error})") from None
    config_file = folder / "config.json"
    if "config.json" not in names:
        raise ModelFolderError(f"{config_file}: no such file; a model folder needs config.json, weights "
                               "and a tokenizer")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ModelFolderError(f"{config_file}:{error.lineno}: not valid JSON ({error.msg})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ModelFolderError(f"{config_file}: cannot be read ({getattr(error, 'strerror', None) or error})") from None
    if not isinstance(config, dict):
        raise ModelFolderError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
    if need_weights and not has_weights(folder):
        raise ModelFolderError(f"{folder}: holds no weights (*.safetensors or pytorch_model*.bin); "
                               f"`kbitprep inspect {folder}` sizes a model from its config alone")
    return config


def has_weights(folder: str | os.PathLike[str]) -> bool:
    """Whether a model folder holds weight files."""
    return any(next(Path(folder).glob(pattern), None) is not None for pattern in WEIGHT_PATTERNS)


def compute_dtype(config: dict[str, Any], device: str | None = None) -> torch.dtype:
    """The dtype to compute in: the config's, except float16 on a CPU (slow there) becomes float32.

    `device` ("cpu", "cuda") is where the run trains; None: this machine's (an accelerator when it has one).
    """
    import torch

    named = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(named), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        dtype = torch.float32
    on_cpu = device == "cpu" if device is not None else not has_accelerator()
    if dtype == torch.float16 and on_cpu:
        dtype = torch.float32
    return dtype


def resolve_compute_dtype(config: dict[str, Any], choice: str = "auto",
                          device: torch.device | str | None = None) -> torch.dtype:
    """`--compute-dtype`: a named dtype as it is; "auto", the model's dtype where `device` computes it fast.

    The rule is `kbitprep.precision.compute_dtype_for`: a bf16 model computes in bf16 on a
    CPU with AVX512 or an Ampere GPU, and in float32 on an AVX2-only CPU, where bf16 is many
    times slower.

    Args:
        config (dict): the model's config.json.
        choice (str): "auto", "bfloat16", "float16" or "float32". Default: "auto"
        device (torch.device | str | None): where the model computes; None: CUDA if there is one, else the CPU.
            Default: None
    """
    import torch

    from ..precision import compute_dtype_for

    if choice != "auto":
        return getattr(torch, choice)
    named = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "float32"), None)
    dtype = named if isinstance(named, torch.dtype) and named.is_floating_point else torch.float32
    return compute_dtype_for(dtype, device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_tokenizer(model_dir: str | os.PathLike[str]):
    """The tokenizer saved in a model folder (local files only, no remote code)."""
    from transformers import AutoTokenizer

    if not any((Path(model_dir) / name).is_file() for name in TOKENIZER_FILES):
        raise ModelFolderError(f"{model_dir}: holds no tokenizer ({', '.join(TOKENIZER_FILES)}); "
                               "save one beside the weights with tokenizer.save_pretrained(folder)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(os.fspath(model_dir), local_files_only=True, trust_remote_code=False)
    except Exception as error:  # transformers raises many types here; all mean "no usable tokenizer"
        raise ModelFolderError(f"{model_dir}: no usable tokenizer ({error_summary(error)}); "
                               "save one beside the weights with tokenizer.save_pretrained(folder)") from error
    return tokenizer


def load_quantized_model(model_dir: str | os.PathLike[str], quantize: str, *,
                         device_index: int | None = None, compute: str = "auto") -> nn.Module:
    """A causal LM from a local folder, loaded as `quantize` says ("nf4", "fp4", "int8", "none").

    4-bit layers compute in `resolve_compute_dtype(config, compute)`; a model that is not
    quantized is loaded in that dtype, since all of it computes in the dtype it is stored in.

    Quantized layers are switched to their training layout at once (see
    `kbitprep.apply.keep_training_layout`: bitsandbytes' CPU inference repacking is switched off).

    Raises:
        ModelFolderError: transformers cannot load it (unknown architecture, damaged weights, ...).
    """
    from transformers import AutoModelForCausalLM

    from ..sizing import bnb_config_for

    config = check_model_folder(model_dir)
    device = f"cuda:{device_index}" if device_index is not None else "cpu"
    computes_in = resolve_compute_dtype(config, compute, device)
    dtype = computes_in if quantize == "none" else compute_dtype(config)
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True, "trust_remote_code": False}
    quantization_config = bnb_config_for(quantize, compute_dtype=computes_in)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if device_index is not None:
        kwargs["device_map"] = {"": device_index}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # bitsandbytes/transformers notes about CPU-only set-ups
            model = AutoModelForCausalLM.from_pretrained(os.fspath(model_dir), **kwargs)
    except Exception as error:  # safetensors, torch and transformers each raise their own types here
        damaged = _damaged_weight_file(model_dir)
        where = f"{damaged}: damaged or truncated weight file" if damaged else f"{model_dir}: cannot load the model"
        raise ModelFolderError(f"{where} ({error_summary(error)})") from error
    from ..apply import keep_training_layout

    return keep_training_layout(model)


def _damaged_weight_file(model_dir: str | os.PathLike[str]) -> Path | None:
    """The first safetensors file in the folder whose header cannot be read, if any."""
    from safetensors import safe_open

    for file in sorted(Path(model_dir).glob("*.safetensors")):
        try:
            with safe_open(file, framework="pt") as handle:
                handle.keys()
        except Exception:  # noqa: BLE001 - any failure to open means the file is damaged
            return file
    return None


def error_summary(error: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
