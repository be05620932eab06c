"""GGUF export of a merged model, for llama.cpp and Ollama, with the `gguf` Python package alone.

    merged model (plain weights) ──> architecture row (gguf_arch.GGUF_ARCHITECTURES)
        ──> hyperparameters and rope keys from config.json (the row's own keys too)
        ──> tensors renamed by gguf's own TensorNameMap, changed as the row says (q/k rows
            permuted, norms shifted, a tied lm_head dropped), plus the rope tensors
            (llama3's rope_freqs, longrope's factors)
        ──> each tensor in its type (gguf_quant: f32 ... q4_0 by the gguf package)
        ──> tokenizer (tokens, types, merges, special ids) and chat template
        ──> one .gguf file, written inside merge's staging folder; for a k-quant (q4_k_m ...)
            an f16 file first, which llama.cpp's quantizer turns into the one asked for
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .gguf_arch import (
    GGUF_ARCHITECTURES,
    GgufArchitecture,
    GgufError,
    extra_tensors,
    gguf_architecture,
    permute_for_llama_rope,
    write_hyperparameters,
    written_tensor,
)
from .gguf_quant import GGUF_DTYPES, TENSOR_FALLBACK, GgufDtype, gguf_dtype, quantize_with_llama_cpp, tensor_data
from .gguf_vocab import write_vocab

if TYPE_CHECKING:
    import torch

__all__ = ["GGUF_ARCHITECTURES", "GGUF_DTYPES", "GGUF_FILE", "GgufArchitecture", "GgufError", "gguf_architecture",
           "gguf_dtype", "permute_for_llama_rope", "write_gguf"]

GGUF_FILE = "model.gguf"


def _write_file(model: Any, tokenizer: Any, tokenizer_folder: Path, path: Path, row: GgufDtype,
                pre: str | None) -> int:
    """One GGUF file whose tensors the `gguf` package writes in `row`'s types."""
    import gguf
    import torch

    config = model.config.to_dict()
    architecture = gguf_architecture(config)
    arch = gguf.MODEL_ARCH[architecture.gguf_name]
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    state = model.state_dict()
    output_name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight"
    embedding_name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"
    tensors: dict[str, torch.Tensor] = {}
    for hf_name, weight in state.items():
        written = written_tensor(hf_name, weight, config, architecture)
        if written is None:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GgufError(f"--gguf: no GGUF name for tensor {hf_name!r} of {config['architectures'][0]}")
        tensors[name] = written
    tied = output_name not in tensors  # llama.cpp then reads token_embd as the output projection

    writer = gguf.GGUFWriter(os.fspath(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(Path(config.get("_name_or_path") or "model").name or "model")
    writer.add_file_type(gguf.LlamaFileType[row.file_type])
    write_hyperparameters(writer, config, architecture)
    write_vocab(writer, tokenizer, tokenizer_folder, config["vocab_size"], pre=pre)
    rope_tensors = extra_tensors(config)
    for name, factors in rope_tensors.items():
        writer.add_tensor(name, torch.tensor(factors, dtype=torch.float32).numpy())
    for name, weight in tensors.items():
        values = weight.detach().to(torch.float32).cpu().numpy()
        data, kind = tensor_data(name, values, row, output=name == output_name or (tied and name == embedding_name))
        writer.add_tensor(name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return len(tensors) + len(rope_tensors)


def write_gguf(model: Any, tokenizer: Any, tokenizer_folder: str | os.PathLike[str], path: str | os.PathLike[str],
               *, dtype: str = "f16", gguf_pre: str | None = None) -> int:
    """Write a plain (merged) causal LM as one GGUF file.

    Args:
        model (Any): the merged transformers model (no quantized layers).
        tokenizer (Any): its tokenizer, carrying the chat template to write.
        tokenizer_folder (str | PathLike): where that tokenizer is saved (tokenizer.json).
        path (str | PathLike): the file to write.
        dtype (str): a `GGUF_DTYPES` name for the matrices: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1,
            q4_0 (the gguf package), or a k-quant such as q4_k_m (llama.cpp's quantizer, from an
            f16 file written first beside `path`). Default: "f16"
        gguf_pre (str | None): llama.cpp's pre-tokenizer name, instead of the one found from the
            tokenizer's behaviour (`gguf_vocab.pre_tokenizer_name`). Default: None

    Returns:
        int: tensors written.

    Raises:
        GgufError: the architecture, its rope scaling, the tokenizer or a tensor has no GGUF form
            here, or a k-quant is asked for without llama-cpp-python.
    """
    row = gguf_dtype(dtype)
    path = Path(path)
    if not row.llama_cpp:
        return _write_file(model, tokenizer, Path(tokenizer_folder), path, row, gguf_pre)
    source = path.with_name(f"{path.stem}.f16-for-quantize.gguf")
    try:
        count = _write_file(model, tokenizer, Path(tokenizer_folder), source, GGUF_DTYPES["f16"], gguf_pre)
        for line in quantize_with_llama_cpp(source, path, row):
            warnings.warn(TENSOR_FALLBACK(f"--gguf-dtype {dtype}: llama.cpp's quantizer: {line}").as_warning(),
                          stacklevel=2)
    finally:
        source.unlink(missing_ok=True)
    return count
