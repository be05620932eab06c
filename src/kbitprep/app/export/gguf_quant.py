"""The GGUF file's tensor types: one row per --gguf-dtype, and the per-tensor choice.

    --gguf-dtype ──> GGUF_DTYPES row
        f32 / f16 / bf16 / q8_0 / q5_1 / q5_0 / q4_1 / q4_0: written by the `gguf` package
            (gguf.quants.quantize), tensor by tensor:
              1-D tensors and norms            float32 (as llama.cpp's converter writes them)
              output.weight (or a tied token_embd)  the row's output type (more bits, as llama.cpp)
              other matrices                   the row's type
              a row length the block does not divide   float16 (llama.cpp's fallback, said in a warning)
        k-quants (q2_k ... q6_k, the _s/_m/_l mixes): an f16 file written first, then llama.cpp's
            own quantizer (llama_cpp.llama_model_quantize), which chooses each tensor's type and
            its fallbacks; refused with the install line where llama-cpp-python is missing.

The `gguf` package cannot quantize to k-quants (its quantize raises NotImplementedError for
them), so llama.cpp's Q6_K output tensor of a 4-/5-bit file is Q8_0 here: the nearest type with
more bits that the package writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...diagnostics import warning_code
from .gguf_arch import GgufError

if TYPE_CHECKING:
    from collections.abc import Iterator

    import numpy as np

__all__ = ["GGUF_DTYPES", "LLAMA_CPP_INSTALL", "TENSOR_FALLBACK", "GgufDtype", "gguf_dtype", "llama_cpp_installed",
           "quantize_with_llama_cpp", "tensor_data"]

LLAMA_CPP_INSTALL = "pip install 'kbitprep[llama-cpp]' (it builds llama.cpp from source), or `make gguf-check`"

TENSOR_FALLBACK = warning_code("gguf-tensor-fallback",
                               "a GGUF tensor's rows do not fit its type's blocks; it is written as float16")


@dataclasses.dataclass(frozen=True)
class GgufDtype:
    """One --gguf-dtype.

    Args:
        name (str): the option's value, e.g. "q4_k_m".
        file_type (str): the `gguf.LlamaFileType` member (llama.cpp's llama_ftype of the same name).
        matrix_type (str): the `gguf.GGMLQuantizationType` of the matrices the `gguf` package
            writes (for a k-quant: of the f16 file llama.cpp's quantizer reads).
        output_type (str | None): the type of output.weight (or of token_embd where it is tied);
            None: `matrix_type`. Default: None
        llama_cpp (bool): quantized by llama.cpp's quantizer from an f16 file. Default: False
    """

    name: str
    file_type: str
    matrix_type: str
    output_type: str | None = None
    llama_cpp: bool = False


def _rows() -> dict[str, GgufDtype]:
    rows = [GgufDtype("f32", "ALL_F32", "F32"), GgufDtype("f16", "MOSTLY_F16", "F16"),
            GgufDtype("bf16", "MOSTLY_BF16", "BF16"), GgufDtype("q8_0", "MOSTLY_Q8_0", "Q8_0")]
    rows += [GgufDtype(name, f"MOSTLY_{name.upper()}", name.upper(), output_type="Q8_0")
             for name in ("q5_1", "q5_0", "q4_1", "q4_0")]
    rows += [GgufDtype(name, f"MOSTLY_{name.upper()}", "F16", llama_cpp=True)
             for name in ("q6_k", "q5_k_m", "q5_k_s", "q4_k_m", "q4_k_s", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k")]
    return {row.name: row for row in rows}


GGUF_DTYPES = _rows()


def llama_cpp_installed() -> bool:
    """Whether llama-cpp-python imports (its shared library loads)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def gguf_dtype(name: str) -> GgufDtype:
    """The row of a --gguf-dtype, checked before anything is loaded.

    Raises:
        GgufError: an unknown name (the message lists the known ones), or a k-quant without
            llama-cpp-python (the message gives the install line).
    """
    row = GGUF_DTYPES.get(name)
    if row is None:
        raise GgufError(f"--gguf-dtype must be one of {', '.join(GGUF_DTYPES)}, not {name!r}")
    if row.llama_cpp and not llama_cpp_installed():
        written = ", ".join(each.name for each in GGUF_DTYPES.values() if not each.llama_cpp)
        raise GgufError(f"--gguf-dtype {name} is a k-quant, which llama.cpp's own quantizer writes, and "
                        f"llama-cpp-python is not installed: {LLAMA_CPP_INSTALL}. Without it kbitprep writes {written}")
    return row


def tensor_data(name: str, values: np.ndarray, row: GgufDtype, *, output: bool) -> tuple[np.ndarray, Any]:
    """A tensor's bytes as GGUFWriter.add_tensor takes them, and its GGML type.

    Args:
        name (str): its GGUF name (named in the fallback warning).
        values (np.ndarray): its float32 values.
        row (GgufDtype): the file's dtype.
        output (bool): it is the output projection (output.weight, or token_embd where tied).

    Returns:
        tuple[np.ndarray, GGMLQuantizationType]: the data and its type.
    """
    import gguf

    kind = gguf.GGMLQuantizationType
    target = kind.F32 if values.ndim < 2 or name.endswith("_norm.weight") else \
        kind[row.output_type or row.matrix_type] if output else kind[row.matrix_type]
    block = gguf.GGML_QUANT_SIZES[target][0]
    if values.shape[-1] % block:
        warnings.warn(TENSOR_FALLBACK(
            f"--gguf-dtype {row.name}: {name} has rows of {values.shape[-1]} values, which {target.name}'s blocks of "
            f"{block} do not divide; written as F16, as llama.cpp does").as_warning(), stacklevel=3)
        target = kind.F16
    return gguf.quants.quantize(values, target), target


@contextlib.contextmanager
def _stderr_to(path: Path) -> Iterator[None]:
    """The process's file descriptor 2 (where llama.cpp's C code logs) redirected to a file."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "wb") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def quantize_with_llama_cpp(source: Path, path: Path, row: GgufDtype) -> list[str]:
    """Quantize an f16 GGUF file into `path` with llama.cpp's quantizer (llama_model_quantize).

    Returns:
        list[str]: llama.cpp's fallback lines (tensors whose shape the type cannot take).

    Raises:
        GgufError: llama-cpp-python is missing or its quantizer failed (its log's last lines).
    """
    try:
        import llama_cpp
    except ImportError as error:
        raise GgufError(f"--gguf-dtype {row.name} needs llama-cpp-python ({error}): {LLAMA_CPP_INSTALL}") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{row.file_type}")
    params.nthread = max(1, min(4, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "quantize.log"
        with _stderr_to(log):
            status = llama_cpp.llama_model_quantize(os.fsencode(source), os.fsencode(path), params)
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    if status != 0:
        raise GgufError(f"--gguf-dtype {row.name}: llama.cpp's quantizer failed ({status}): "
                        + " | ".join(lines[-3:]))
    return [re.sub(r"\s+", " ", line).strip() for line in lines if "falling back to" in line]
