"""Loading a local model folder: checks that need no model, the tokenizer, and the quantized model.

Models are local folders (config.json, weights, tokenizer); nothing is downloaded and no
remote code runs. The checks here name the file at fault, so a wrong path or a damaged
config costs a one-line error before anything heavy is imported.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...device import accelerator, has_accelerator
from ...errors import KbitPrepError

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
    "model_fingerprint",
    "resolve_compute_dtype",
    "resolve_folder_quantize",
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
    check_config_values(config, config_file)
    if need_weights and not has_weights(folder):
        raise ModelFolderError(f"{folder}: holds no weights (*.safetensors or pytorch_model*.bin); "
                               f"`kbitprep inspect {folder}` sizes a model from its config alone")
    return config


# Bounds far above any real model (the largest have ~130 layers and a few hundred experts):
# past them, a config.json is damaged, and building even its empty skeleton takes hours.
SIZE_BOUNDS = {"num_hidden_layers": 1024, "num_layers": 1024, "n_layer": 1024, "num_decoder_layers": 1024,
               "num_local_experts": 8192, "num_experts": 8192, "n_routed_experts": 8192}


def check_config_values(config: dict[str, Any], config_file: str | os.PathLike[str]) -> None:
    """Check the values of a config.json as transformers reads them, and their sizes, before any model is built.

    Raises:
        ModelFolderError: a value of the wrong type (`"hidden_size": "64"`), an unknown
            `model_type`, or an absurd size (a million layers); the message names the key.
    """
    for section in (config, *(v for v in config.values() if isinstance(v, dict))):  # text_config, ...
        for key, bound in SIZE_BOUNDS.items():
            value = section.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and not 0 < value <= bound:
                raise ModelFolderError(f"{config_file}: \"{key}\" is {value}; a model has between 1 and {bound} "
                                       "(the largest real ones about 130 layers): the file is damaged, fix that value")
    from transformers import AutoConfig

    try:
        model_type = config.get("model_type")
        if isinstance(model_type, str):  # the values already read, checked as from_pretrained checks them
            AutoConfig.for_model(model_type, **{k: v for k, v in config.items() if k != "model_type"})
        else:
            AutoConfig.from_pretrained(os.path.dirname(os.fspath(config_file)) or ".", local_files_only=True,
                                       trust_remote_code=False)
    except Exception as error:  # noqa: BLE001 - transformers' validation raises many types; each names the field
        detail = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
        raise ModelFolderError(f"{config_file}: transformers cannot read this config ({detail}); fix that "
                               "value (numbers without quotes, true/false for switches)") from None


def resolve_folder_quantize(model_dir: str | os.PathLike[str], requested: str,
                            config: dict[str, Any] | None = None) -> str:
    """The `--quantize` a run uses on a model folder: "auto" resolved, a contradiction refused.

    The rule is `kbitprep.backends.bitsandbytes.resolve_quantize`: a folder saved already
    quantized by bitsandbytes loads as saved ("auto", or its own format named explicitly),
    any other folder gets nf4 for "auto". A folder without a readable config.json keeps
    `requested` ("auto": nf4): the checks that load it name what is wrong. `config`: the
    folder's config.json already read (it is then not read again).

    Raises:
        QuantizeConflictError: `requested` contradicts the quantization the folder was saved with.
        UnsupportedQuantizationError: the folder is saved quantized by gptq, awq, ...
    """
    from ...backends.bitsandbytes import resolve_quantize

    if config is None:
        try:
            config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = {}
    return resolve_quantize(config if isinstance(config, dict) else {}, requested, where=os.fspath(model_dir))[0]


def check_weight_shapes(model_dir: str | os.PathLike[str], quantize: str = "none",
                        config: dict[str, Any] | None = None) -> None:
    """Compare the shapes in the weight files' headers with the model config.json describes, before loading.

    Only `.safetensors` headers are read (no tensor data); names the files and the model
    do not share (checkpoints in an older layout, the quantization state a pre-quantized
    folder stores beside each 4-bit weight) are left to transformers. A folder saved
    quantized is compared with the skeleton of that quantization, whose 4-bit weights
    have the packed shape the files hold.

    Args:
        model_dir (str | PathLike): the model folder.
        quantize (str): the quantization the files hold: "none", or the saved format. Default: "none"
        config (dict | None): config.json, already read; None: read it. Default: None

    Raises:
        ModelFolderError: a tensor has another shape than config.json gives it.
    """
    from safetensors import safe_open

    from ...sizing import build_meta_model

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return
    try:
        skeleton = build_meta_model(config if config is not None else os.fspath(model_dir), quantize=quantize)
        # Parameters and buffers, not state_dict(): a 4-bit layer's state_dict reads its quant
        # state's values, which a meta skeleton does not have.
        expected = {name: tuple(t.shape) for named in (skeleton.named_parameters(remove_duplicate=False),
                                                       skeleton.named_buffers(remove_duplicate=False))
                    for name, t in named}
    except Exception:  # noqa: BLE001 - a model the skeleton builder cannot make: transformers will say why
        return
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                shape = tuple(handle.get_slice(name).get_shape())
                if name in expected and expected[name] != shape:
                    raise ModelFolderError(
                        f"{file}: {name} has shape {list(shape)} but config.json gives it {list(expected[name])}: "
                        "the config and the weights come from different models (or sizes); put the config.json "
                        "that was saved with these weights beside them")


def model_fingerprint(model_dir: str | os.PathLike[str], config: dict[str, Any] | None = None) -> str:
    """A hash of a model folder's config, tokenizer files, and weight files' names and sizes.

    Cheap for any model size (weights are not read): what a resumed run compares to
    notice that the folder now holds another model. `config`: config.json already read
    (hashed as its values, so the file is not read again).
    """
    import hashlib

    folder = Path(model_dir)
    digest = hashlib.sha256()
    if config is not None:
        digest.update(b"config.json\0" + json.dumps(config, sort_keys=True).encode())
    for name in (*(() if config is not None else ("config.json",)), *TOKENIZER_FILES, "tokenizer_config.json"):
        if (folder / name).is_file():
            digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
    for pattern in WEIGHT_PATTERNS:
        for file in sorted(folder.glob(pattern)):
            digest.update(f"{file.name}\0{file.stat().st_size}\0".encode())
    return digest.hexdigest()


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
        device (torch.device | str | None): where the model computes; None: the accelerator, else the CPU.
            Default: None
    """
    import torch

    from ...precision import compute_dtype_for

    if choice != "auto":
        return getattr(torch, choice)
    named = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "float32"), None)
    dtype = named if isinstance(named, torch.dtype) and named.is_floating_point else torch.float32
    return compute_dtype_for(dtype, device or accelerator() or "cpu")


def load_tokenizer(model_dir: str | os.PathLike[str]) -> Any:
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
                         device_index: int | None = None, compute: str = "auto",
                         config: dict[str, Any] | None = None) -> nn.Module:
    """A causal LM from a local folder, loaded as `quantize` says ("auto", "nf4", "fp4", "int8", "none").

    A folder saved already quantized by bitsandbytes (its config.json has a
    `quantization_config`) is loaded as saved, not quantized again: "auto" or its own
    format; any other `quantize` is refused (`resolve_folder_quantize`). "auto" on any
    other folder is nf4.

    4-bit layers compute in `resolve_compute_dtype(config, compute)`; a model that is not
    quantized is loaded in that dtype, since all of it computes in the dtype it is stored in.
    `config`: the folder's config.json as `check_model_folder` returned it, when the caller
    has read it already (it is then not read again).

    Quantized layers are switched to their training layout at once (see
    `kbitprep.apply.keep_training_layout`: bitsandbytes' CPU inference repacking is switched off).

    Raises:
        ModelFolderError: transformers cannot load it (unknown architecture, damaged weights, ...).
        QuantizeConflictError: `quantize` contradicts the quantization the folder was saved with.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from ...backends.bitsandbytes import resolve_quantize
    from ...sizing import bnb_config_for

    config = config if config is not None else check_model_folder(model_dir)
    quantize, saved = resolve_quantize(config, quantize, where=os.fspath(model_dir))
    accel = accelerator()
    device = torch.device(accel.type, device_index) if accel is not None and device_index is not None else "cpu"
    computes_in = resolve_compute_dtype(config, compute, device)
    dtype = computes_in if quantize == "none" else compute_dtype(config)
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True, "trust_remote_code": False}
    # A saved quantization is read from config.json by transformers itself (a config passed
    # beside it is ignored with a warning), so the compute dtype is set on the layers after loading.
    quantization_config = None if saved is not None else bnb_config_for(quantize, compute_dtype=computes_in)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if device_index is not None:
        kwargs["device_map"] = {"": device_index}
    damaged = _damaged_weight_file(model_dir)
    if damaged is None:
        check_weight_shapes(model_dir, quantize if saved is not None else "none", config=config)
    try:
        with warnings.catch_warnings(), _held_load_report() as reports:
            warnings.simplefilter("ignore", UserWarning)  # bitsandbytes/transformers notes about CPU-only set-ups
            loaded: Any = AutoModelForCausalLM.from_pretrained(os.fspath(model_dir), output_loading_info=True,
                                                               **kwargs)
            model, info = loaded  # the model and what loading found (missing keys, ...)
    except Exception as error:  # safetensors, torch and transformers each raise their own types here
        where = f"{damaged}: damaged or truncated weight file" if damaged else f"{model_dir}: cannot load the model"
        raise ModelFolderError(f"{where} ({error_summary(error)})") from error
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ModelFolderError(f"{model_dir}: the weight files lack {len(missing)} tensor(s) the model in config.json "
                               f"has (first: {missing[0]}); they would start random. The weights are incomplete (a "
                               "shard missing?) or belong to another model: save or download them again")
    for record in reports:  # not replaced by an error: the user still sees what transformers reported
        logging.getLogger(record.name).handle(record)
    if saved is not None and saved.quantize != "int8":
        _compute_4bit_in(model, computes_in)
    from ...apply import keep_training_layout

    return keep_training_layout(model)


def _compute_4bit_in(model: Any, dtype: torch.dtype) -> None:
    """Make every 4-bit layer compute in `dtype` (what `bnb_4bit_compute_dtype` does for a fresh quantization)."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.compute_dtype, module.compute_type_is_set = dtype, True
    record = getattr(model.config, "quantization_config", None)
    if record is not None and hasattr(record, "bnb_4bit_compute_dtype"):
        record.bnb_4bit_compute_dtype = dtype


@contextlib.contextmanager
def _held_load_report() -> Iterator[list[logging.LogRecord]]:
    """Hold back transformers' weight-loading report while loading: when kbitprep turns what it
    reports into an error, the error says it once; otherwise the caller logs the report after all."""
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in str(record.msg):
            held.append(record)
            return False
        return True

    logger = logging.getLogger("transformers.modeling_utils")
    logger.addFilter(hold)
    try:
        yield held
    finally:
        logger.removeFilter(hold)


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
