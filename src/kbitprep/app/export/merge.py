"""`kbitprep merge`: a finished run's adapter folded into a standalone model folder.

    run folder ──> base loaded exactly as the run loaded it (same quantization)
        ──> each quantized layer dequantized (the weights the adapter was trained against)
        ──> W + scale * B @ A per adapted layer, in float32, cast once to the output dtype
            (DoRA: that sum rescaled row by row to the trained magnitude, m * V / ||V||)
        ──> model folder (safetensors, config without quantization, tokenizer, generation
            config stopping at the chat template's end of turn), staged beside the output
            and renamed into place; with --gguf, model.gguf and an Ollama Modelfile
        ──> with --verify, the folder as written compared with the run's own model on the
            run's rows (`kbitprep.app.export.verify`) before it is renamed into place

Why dequantize rather than reuse the original 16-bit weights: the adapter learned to
correct the 4-bit weights, not the 16-bit ones. Merging onto the originals adds that
correction to weights it was never trained with (unsloth-zoo PR #810 had to fix exactly
this). The merged folder needs neither peft nor bitsandbytes to load.

An adapter initialised by a method that rewrites the base (`--init-lora-weights olora`,
`pissa`) trained against the rewritten weights: W - scale * B0 @ A0, requantized on a
4-bit base. Merge lets peft rewrite the loaded base again, as it does when it loads the
adapter (`PeftModel.from_pretrained`), and merges onto that residual. The adapter is saved
as trained, not converted to the original base: with a 4-bit base a conversion would be
off by the requantization of the residual.

The merge arithmetic is done here, layer by layer, so the float32 copy of only one
layer exists at a time; peft's own `merge_and_unload` is the reference the tests compare
against.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...device import has_accelerator
from ...errors import KbitPrepError
from ..model.loading import ModelFolderError, check_model_folder, load_quantized_model, load_tokenizer
from ..model.lora import INIT_METHODS
from ..runs.folder import ADAPTER_DIR, INCOMPLETE, REPORT, RunFolder
from .stops import MODELFILE, ollama_modelfile, stopping_generation_config

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["MERGE_DTYPES", "MERGE_RECORD", "MergeError", "MergeReport", "adapter_magnitudes", "adapter_updates",
           "dequantize_layers", "merge_adapter", "merge_run", "read_finished_run", "rewritten_base", "run_tokenizer"]

# --dtype value -> torch dtype name; None in the CLI means "the model's own dtype".
MERGE_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
MERGE_RECORD = "kbitprep-merge.json"  # provenance written into the merged folder
_ADAPTER_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_"
                          r"(?P<part>A|B|embedding_A|embedding_B|magnitude_vector)(?:\.default)?(?:\.weight)?$")


class MergeError(KbitPrepError, RuntimeError):
    """A run cannot be merged as asked; the message names the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class FinishedRun:
    """What merge needs from a finished run folder.

    Args:
        path (Path): the run folder.
        settings (dict): the run's settings, as report.json records them.
        adapter (Path): the adapter folder.
    """

    path: Path
    settings: dict[str, Any]
    adapter: Path

    @property
    def model(self) -> Path:
        return Path(self.settings["model"])


@dataclasses.dataclass(frozen=True)
class MergeReport:
    """What a merge did.

    Args:
        run (str): the run folder.
        output (str): the merged model folder.
        base (str): the base model folder the run trained on.
        quantize (str): how the base was loaded (and so dequantized).
        dtype (str): the merged weights' dtype.
        dequantized (int): quantized layers turned back into plain weights.
        merged (int): layers that received an adapter update.
        seconds (float): time taken.
        gguf (str | None): the GGUF file written beside the safetensors (`gguf=True`). Default: None
        modelfile (str | None): the Ollama Modelfile written beside the GGUF. Default: None
        eos_token_ids (tuple[int, ...]): the generation config's eos ids (the model's eos and the
            chat template's end-of-turn token). Default: ()
        verify (tuple[dict, ...] | None): with `verify=True`, the figures of each comparison
            (`VerifyFigures.to_dict`). Default: None
    """

    run: str
    output: str
    base: str
    quantize: str
    dtype: str
    dequantized: int
    merged: int
    seconds: float
    gguf: str | None = None
    modelfile: str | None = None
    eos_token_ids: tuple[int, ...] = ()
    verify: tuple[dict[str, Any], ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- reading the run -----------------------------------------------------------------------


def read_finished_run(run_dir: str | os.PathLike[str], *, command: str = "merge") -> FinishedRun:
    """The settings and adapter of a finished `kbitprep finetune` run; changes nothing.

    Args:
        run_dir (str | PathLike): the run folder.
        command (str): the command that reads it ("merge", "generate"), for messages. Default: "merge"

    Raises:
        MergeError: the folder is missing, unfinished, not written by kbitprep, or its
            adapter or base model is gone.
    """
    path = Path(run_dir)
    if not path.is_dir():
        what = "is a file" if path.exists() else "no such run folder"
        raise MergeError(f"{path}: {what}; pass the --output folder of a finished `kbitprep finetune` run")
    state = RunFolder(path).state()
    if state == "incomplete":
        raise MergeError(f"{path}: holds an unfinished run ({INCOMPLETE}); finish it first with "
                         f"`kbitprep finetune ... --resume`, then {command}")
    report = _read_report(path) if state == "finished" else None
    if report is None:
        hint = f" (it holds a bare adapter; {command} needs the whole run folder)" \
            if (path / "adapter_config.json").is_file() else ""
        raise MergeError(f"{path}: is not a kbitprep run folder{hint}; pass the --output folder of a finished "
                         "`kbitprep finetune` run")
    adapter = path / ADAPTER_DIR
    if not (adapter / "adapter_config.json").is_file():
        raise MergeError(f"{adapter}: the run's adapter is missing; run `kbitprep finetune` again")
    run = FinishedRun(path, report["settings"], adapter)
    try:
        check_model_folder(run.model)
    except ModelFolderError as error:
        raise MergeError(f"the run's base model is not usable: {error}; {command} needs the folder the run "
                         "trained on, where it was") from None
    return run


def _read_report(path: Path) -> dict[str, Any] | None:
    """report.json if kbitprep wrote it (a finished status and the settings merge needs), else None."""
    try:
        report = json.loads((path / REPORT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    settings = report.get("settings") if isinstance(report, dict) else None
    if report.get("status") != "finished" or not isinstance(settings, dict):
        return None
    return report if {"model", "quantize"} <= set(settings) else None


def _check_output(output: Path) -> None:
    if output.exists() or output.is_symlink():
        raise MergeError(f"{output}: already exists; merge writes a new folder and never into an existing one. "
                         "Choose another --output or remove it")
    parent = next((p for p in output.absolute().parents if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise MergeError(f"{output}: cannot be created (no writable folder above it); choose another --output")


# --- dequantizing -----------------------------------------------------------------------------


def _dequantizers() -> tuple[tuple[type, Any], ...]:
    """(layer class, function giving its plain weight) for each quantized layer kind kbitprep loads."""
    import bitsandbytes as bnb

    def four_bit(module: Any) -> torch.Tensor:
        # In the quant state's dtype: exactly the tensor the layer's forward multiplies by.
        return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)

    def int8(module: Any) -> torch.Tensor:
        scale = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
        return bnb.functional.int8_vectorwise_dequant(module.weight.data, scale)

    return ((bnb.nn.Linear4bit, four_bit), (bnb.nn.Linear8bitLt, int8))


def dequantize_layers(model: nn.Module) -> int:
    """Replace every bitsandbytes layer of `model` by a `torch.nn.Linear` holding its dequantized weight.

    Args:
        model (nn.Module): a model loaded with bitsandbytes quantization (or none: then nothing changes).

    Returns:
        int: the number of layers replaced.
    """
    from torch import nn as torch_nn

    try:
        table = _dequantizers()
    except ImportError:  # without bitsandbytes nothing can be quantized by it
        return 0
    replaced = 0
    for name, module in list(model.named_modules()):
        dequantize = next((fn for kind, fn in table if isinstance(module, kind)), None)
        if dequantize is None:
            continue
        weight = dequantize(module)
        plain = torch_nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        plain.weight = torch_nn.Parameter(weight, requires_grad=False)
        if module.bias is not None:
            plain.bias = torch_nn.Parameter(module.bias.data, requires_grad=False)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, plain)
        replaced += 1
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the config must not claim a quantization the weights no longer have
        quantizer.remove_quantization_config(model)
    return replaced


# --- merging -------------------------------------------------------------------------------


def _adapter_config(adapter: Path) -> dict[str, Any]:
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    unsupported = [key for key in ("rank_pattern", "alpha_pattern", "lora_bias", "modules_to_save")
                   if config.get(key)]
    if config.get("peft_type", "LORA") != "LORA" or unsupported:
        raise MergeError(f"{adapter}: an adapter kbitprep did not write ({config.get('peft_type')}, "
                         f"{', '.join(unsupported) or 'no options'}); merge only knows plain LoRA adapters "
                         "from `kbitprep finetune`")
    return config


def adapter_updates(adapter: Path) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """(module name, float32 `scale * B @ A`, whether the module stores its weight transposed) per adapted layer.

    Embeddings, and Conv1D layers (`fan_in_fan_out`), store their weight as (in, out).
    """
    config = _adapter_config(adapter)
    for module, tensors in sorted(_adapter_parts(adapter).items()):
        embedding = "embedding_A" in tensors
        a, b = (tensors["embedding_A"], tensors["embedding_B"]) if embedding else (tensors["A"], tensors["B"])
        rank = a.shape[0]
        scale = config["lora_alpha"] / (math.sqrt(rank) if config.get("use_rslora") else rank)
        yield module, scale * (b.float() @ a.float()), embedding or bool(config.get("fan_in_fan_out"))


def _adapter_parts(adapter: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The adapter's tensors by module and part ("A", "B", "magnitude_vector", ...)."""
    from safetensors.torch import load_file

    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(adapter / "adapter_model.safetensors").items():
        match = _ADAPTER_KEY.match(key)
        if match is None:
            raise MergeError(f"{adapter}: unexpected tensor {key!r}; merge only knows LoRA and DoRA adapters")
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    return parts


def adapter_magnitudes(adapter: Path) -> dict[str, torch.Tensor]:
    """DoRA's trained magnitude per output row, float32, by module name; empty for a LoRA adapter."""
    _adapter_config(adapter)
    return {module: tensors["magnitude_vector"].float() for module, tensors in _adapter_parts(adapter).items()
            if "magnitude_vector" in tensors}


def rewritten_base(model: nn.Module, adapter: Path) -> nn.Module:
    """The base the adapter trained against: `model` itself, or, for an initialisation that rewrites the
    base weights (`INIT_METHODS`' rewrites_base), the residual peft leaves when it loads the adapter.

    Args:
        model (nn.Module): the base, loaded as the run loaded it (still quantized).
        adapter (Path): the run's adapter folder.
    """
    init = _adapter_config(adapter).get("init_lora_weights", True)
    if init not in {method.peft for method in INIT_METHODS.values() if method.rewrites_base}:
        return model
    import warnings

    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        # peft runs the initialisation again (the weights are the same, so is its result), then loads A and B
        return PeftModel.from_pretrained(model, adapter).unload()


def merge_adapter(model: nn.Module, adapter: Path, dtype: torch.dtype) -> int:
    """Add each adapter update to its layer's weight in float32, store the sum in `dtype`; returns the count.

    A DoRA layer's sum V is then scaled row by row to its magnitude, m * V / ||V|| (the norm over
    each output's inputs, as peft's DoRA computes it).
    """
    from torch import nn as torch_nn

    magnitudes = adapter_magnitudes(adapter)
    merged = 0
    for name, update, transposed in adapter_updates(adapter):
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise MergeError(f"{adapter}: adapts {name!r}, which the base model does not have; was the base "
                             "model folder changed after the run?") from None
        update = update.T if transposed else update
        current = layer.get_parameter("weight")
        if tuple(update.shape) != tuple(current.shape):
            raise MergeError(f"{adapter}: the update of {name!r} is {tuple(update.shape)} but the layer's weight "
                             f"is {tuple(current.shape)}; was the base model folder changed after the run?")
        weight = current.data.float() + update.to(current.device)
        if name in magnitudes:
            logical = weight.T if transposed else weight  # (out, in)
            scale = magnitudes[name].to(weight.device) / logical.norm(dim=1)
            weight = (logical * scale[:, None]).T if transposed else logical * scale[:, None]
        layer.weight = torch_nn.Parameter(weight.to(dtype), requires_grad=False)
        merged += 1
    return merged


# --- writing --------------------------------------------------------------------------------


@contextlib.contextmanager
def _staged_folder(output: Path) -> Iterator[Path]:
    """A staging folder beside `output`, renamed to it on success and removed on failure."""
    output.absolute().parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output.absolute().parent, prefix=f".kbitprep-staging-{output.name}-"))
    try:
        yield staging
        for file in staging.rglob("*"):
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        if output.exists():  # appeared while merging: never replace what someone else wrote
            raise MergeError(f"{output}: appeared while merging; nothing was written there. Choose another --output")
        os.rename(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def run_tokenizer(run: FinishedRun) -> Any:
    """The run's tokenizer, carrying the chat template the run trained with."""
    tokenizer = load_tokenizer(run.model)
    template = run.settings.get("chat_template")
    if template:
        try:
            tokenizer.chat_template = Path(template).read_text(encoding="utf-8")
        except OSError as error:
            raise MergeError(f"{template}: the run's --chat-template cannot be read ({error.strerror or error}); "
                             "put it back where the run read it") from None
    return tokenizer


def _output_dtype(run: FinishedRun, dtype: str | None) -> torch.dtype:
    import torch

    if dtype is not None and dtype not in MERGE_DTYPES:
        raise MergeError(f"--dtype must be one of {', '.join(MERGE_DTYPES)}, not {dtype!r}")
    config = check_model_folder(run.model)
    named = MERGE_DTYPES[dtype] if dtype else config.get("dtype") or config.get("torch_dtype") or "float32"
    value = getattr(torch, str(named), None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else torch.float32


def merge_run(run_dir: str | os.PathLike[str], output: str | os.PathLike[str], *,
              dtype: str | None = None, gguf: bool = False, gguf_dtype: str = "f16",
              gguf_pre: str | None = None, verify: bool = False) -> MergeReport:
    """Write a standalone model folder: the run's base, dequantized as it was trained, plus its adapter.

    Args:
        run_dir (str | PathLike): the folder of a finished `kbitprep finetune` run.
        output (str | PathLike): the model folder to create; it must not exist.
        dtype (str | None): "bf16", "fp16" or "fp32"; None keeps the base model's dtype. Default: None
        gguf (bool): also write the merged model as `model.gguf` (llama.cpp, Ollama), tokenizer and
            chat template inside (`kbitprep.app.export.gguf`). Default: False
        gguf_dtype (str): the GGUF file's matrices: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0, or a
            k-quant (q4_k_m, q5_k_m, q6_k, ...: llama.cpp's quantizer, needs llama-cpp-python). Default: "f16"
        gguf_pre (str | None): llama.cpp's pre-tokenizer name for a tokenizer llama.cpp's table does not
            know (`kbitprep.app.export.gguf_vocab`); the caller vouches that it splits the same. Default: None
        verify (bool): compare the written folder (and GGUF, where llama-cpp-python is installed)
            with the run's 4-bit base + adapter on the run's first rows; fail past the
            tolerances (`kbitprep.app.export.verify`). Default: False

    Returns:
        MergeReport: what was merged and written.

    Raises:
        MergeError: the run is unfinished, not kbitprep's, or its base is gone; the output
            exists; nothing is written.
        GgufError: with `gguf`, an architecture or tokenizer with no GGUF form here (checked before
            loading where the config tells); nothing is written.
        VerifyError: with `verify`, a figure past its tolerance, or the run's data gone; nothing is written.

    Example:
        >>> merge_run("runs/demo", "merged", dtype="bf16").merged
        14
    """
    started = time.perf_counter()
    run = read_finished_run(run_dir)
    output = Path(output)
    _check_output(output)
    target = _output_dtype(run, dtype)
    if gguf:
        from .gguf import gguf_architecture
        from .gguf import gguf_dtype as check_gguf_dtype

        check_gguf_dtype(gguf_dtype)  # a k-quant without llama-cpp-python is refused before the load
        gguf_architecture(check_model_folder(run.model))  # an unsupported one costs no load
    tokenizer = run_tokenizer(run)
    if gguf:
        from .gguf_vocab import check_vocab

        check_vocab(tokenizer, pre=gguf_pre)  # an unknown pre-tokenizer costs no load either
    model: Any = rewritten_base(load_quantized_model(run.model, run.settings["quantize"],
                                                     device_index=_device_index()), run.adapter)
    dequantized = dequantize_layers(model)
    merged = merge_adapter(model, run.adapter, target)
    model.to(target)
    model.generation_config = stopping_generation_config(model, tokenizer, run.model)
    eos = model.generation_config.eos_token_id
    report = MergeReport(run=str(run.path.absolute()), output=str(output.absolute()), base=str(run.model),
                         quantize=run.settings["quantize"], dtype=str(target).removeprefix("torch."),
                         dequantized=dequantized, merged=merged, seconds=0.0,
                         eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]))
    with _staged_folder(output) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if gguf:
            from .gguf import GGUF_FILE, write_gguf

            write_gguf(model, tokenizer, staging, staging / GGUF_FILE, dtype=gguf_dtype, gguf_pre=gguf_pre)
            (staging / MODELFILE).write_text(ollama_modelfile(tokenizer, GGUF_FILE), encoding="utf-8")
            report = dataclasses.replace(report, gguf=str(output.absolute() / GGUF_FILE),
                                         modelfile=str(output.absolute() / MODELFILE))
        if verify:
            from .verify import VerifyError, check_figures, verify_merged

            del model  # the comparison loads the run's model and the written folder, one at a time
            try:
                figures = verify_merged(run.settings, run.adapter, tokenizer, staging,
                                        gguf=staging / GGUF_FILE if gguf else None, gguf_dtype=gguf_dtype)
                check_figures(figures)
            except VerifyError as error:
                raise VerifyError(f"{error}; nothing was written to {output}") from None
            report = dataclasses.replace(report, verify=tuple(f.to_dict() for f in figures))
        report = dataclasses.replace(report, seconds=time.perf_counter() - started)
        (staging / MERGE_RECORD).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    return report


def _device_index() -> int | None:
    """Where the run loaded its base: the first accelerator if there is one (bitsandbytes quantizes there)."""
    return 0 if has_accelerator() else None
