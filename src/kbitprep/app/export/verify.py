"""`kbitprep merge --verify`: the merged model computes what the run trained, on the run's own rows.

    run's data (report.json: data, data format, seq_len, chat template) ──> first rows,
        tokenized as the run tokenized them
    4-bit base + adapter, loaded and prepared as the run did ──> reference logits
    merged folder, loaded with from_pretrained from the files written ──> logits
    model.gguf in llama.cpp, where llama-cpp-python is installed ──> logits
        ──> max |logit difference| (absolute, and relative to the largest reference logit),
            greedy next-token agreement ──> MergeReport.verify, and a failure past tolerance

The merged weights are the dequantized 4-bit weights plus the adapter's update, so the two
models differ only by rounding: the run multiplies by the dequantized weight in its
compute dtype and adds the LoRA path separately, the merged model multiplies once by
their sum stored in the output dtype. The tolerances are measured (`VERIFY_TOLERANCES`);
a merge onto the wrong weights, a dropped layer or a damaged file is far beyond them.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import KbitPrepError
from ..model.loading import error_summary
from ..model.quiet import without_log_notes

if TYPE_CHECKING:
    import torch

__all__ = ["GGUF_QUANT_TOLERANCES", "VERIFY_ROWS", "VERIFY_TOLERANCES", "VerifyError", "VerifyFigures",
           "check_figures", "gguf_tolerance", "verify_merged"]

VERIFY_ROWS = 4  # rows of the run's data compared

# Largest |logit difference| allowed, relative to the largest |reference logit|, by the
# coarser of two dtypes: the one the run computed in (its reference logits carry that
# rounding) and the compared weights' (the merged folder's, the GGUF file's matrices).
# Largest relative figures measured on 4 rows each (docs/cli.md, "merge --verify"): bfloat16
# 0.0076 (the demo's bf16 Llama) and 0.013 (a float32 Qwen2-like tiny model merged to bf16);
# float16 0.0011; float32 5e-7 (the same arithmetic in another order). bfloat16's tolerance
# is 2.3 times its largest figure, float16's 4 times; float32's is raised to 1e-4 for the
# longer sums of larger models. A merge onto the original 16-bit weights (the error merge
# exists to avoid) gives 0.25, one layer doubled 0.2. A GGUF in llama.cpp is judged at least
# at float16 (its KV cache): measured 0.00038 for an f32 file, 0.00069 for f16 (a tiny Llama
# with Llama-3's vocabulary).
VERIFY_TOLERANCES = {"bfloat16": 0.03, "float16": 0.005, "float32": 1e-4}
GGUF_DTYPE_NAMES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}  # --gguf-dtype -> torch dtype
# Quantized GGUF types: the largest relative logit error measured for each (BENCHMARKS.md,
# "GGUF sizes and error": a random 28M-parameter Llama, llama.cpp's logits against its f16
# file; and tests/test_gguf_llamacpp.py's tiny Llama against the float32 model, which is
# below these for every type), and twice it as the tolerance. Random weights spread the
# logits less than trained ones, so a trained model sits further inside. A merge onto the
# wrong weights (0.25) is caught at q8_0 and q6_k only; the 4-bit and coarser types round
# more than that. Greedy agreement is not judged for them (quantization flips near-ties).
GGUF_QUANT_MEASURED = {"q8_0": 0.0232, "q6_k": 0.0647, "q5_1": 0.110, "q5_0": 0.143, "q5_k_m": 0.120,
                       "q5_k_s": 0.133, "q4_1": 0.233, "q4_0": 0.246, "q4_k_m": 0.230, "q4_k_s": 0.213,
                       "q3_k_l": 0.232, "q3_k_m": 0.280, "q3_k_s": 0.439, "q2_k": 0.628}
GGUF_QUANT_TOLERANCES = {name: round(2 * figure, 2) for name, figure in GGUF_QUANT_MEASURED.items()}
# The least share of positions whose greedy next token must agree: a few near-ties may flip
# under rounding (1 of 90 positions at bf16 on the demo), a wrong merge changes most.
VERIFY_AGREEMENT = 0.9


class VerifyError(KbitPrepError, RuntimeError):
    """The merged model does not compute what the run trained; the message names the figure and the tolerance."""


@dataclasses.dataclass(frozen=True)
class VerifyFigures:
    """How one exported model compares with the run's 4-bit base + adapter.

    Args:
        model (str): "merged" (the safetensors folder) or "gguf".
        dtype (str): the dtype the compared model computed in (the GGUF's: its --gguf-dtype).
        rows (int): rows of the run's data compared.
        positions (int): token positions compared.
        max_abs (float): the largest |logit difference|.
        scale (float): the largest |reference logit|.
        relative (float): `max_abs / scale`.
        agreement (float): the share of positions whose greedy next token agrees.
        tolerance (float | None): the largest `relative` allowed; None where none is measured
            (a GGUF type with no figure in `GGUF_QUANT_TOLERANCES`): then reported, not judged.
        min_agreement (float | None): the least `agreement` allowed (None: not judged).
    """

    model: str
    dtype: str
    rows: int
    positions: int
    max_abs: float
    scale: float
    relative: float
    agreement: float
    tolerance: float | None
    min_agreement: float | None

    @property
    def failures(self) -> list[str]:
        """Each figure past its tolerance, worded for the error message."""
        found = []
        if self.tolerance is not None and not self.relative <= self.tolerance:
            found.append(f"max |logit difference| {self.max_abs:.4g} is {self.relative:.3g} of the logit scale "
                         f"{self.scale:.4g}, beyond the tolerance {self.tolerance:g}")
        if self.min_agreement is not None and not self.agreement >= self.min_agreement:
            found.append(f"greedy next-token agreement {self.agreement:.3f} is below the tolerance "
                         f"{self.min_agreement:g}")
        return found

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "passed": not self.failures}

    def summary(self) -> str:
        judged = f"tolerance {self.tolerance:g}" if self.tolerance is not None else "not judged"
        return (f"{self.model} ({self.dtype}) vs the run's base + adapter on {self.rows} row(s), {self.positions} "
                f"positions: max |logit difference| {self.max_abs:.4g} ({self.relative:.3g} of {self.scale:.4g}, "
                f"{judged}), greedy agreement {self.agreement:.3f}")


def _rows(settings: dict[str, Any], tokenizer: Any, count: int) -> list[list[int]]:
    """The token ids of the run's first `count` rows, tokenized as the run did (its seq_len, its template)."""
    from ..data.files import read_data
    from ..data.rows import DataError
    from ..data.tokenize import tokenize_rows

    data = settings.get("data")
    if not data or not Path(data).is_file():
        raise VerifyError(f"{data}: --verify compares on rows of the run's data, which is no longer there; put it "
                          "back where the run read it, or merge without --verify")
    try:
        rows = read_data(data, settings.get("data_format") or "auto")
        with without_log_notes("long-row-tokens"):  # rows are cut at the run's --seq-len
            tokenized = tokenize_rows(rows[:count], tokenizer, int(settings.get("seq_len") or 512), source=data)
    except DataError as error:
        raise VerifyError(f"--verify cannot read the run's rows: {error}") from None
    return [example["input_ids"] for example in tokenized.examples]


def _forward(model: Any, rows: list[list[int]]) -> tuple[list[torch.Tensor], str]:
    """The float32 logits of each row, and the dtype the model computed them in."""
    import torch

    device = next(p.device for p in model.parameters())
    with torch.no_grad():
        logits = [model(input_ids=torch.tensor([ids], device=device)).logits[0] for ids in rows]
    return [each.float().cpu() for each in logits], str(logits[0].dtype).removeprefix("torch.")


def _tolerance(*dtypes: str) -> float | None:
    """The tolerance of the coarsest of `dtypes` (by machine epsilon); None if one has no measured tolerance."""
    import torch

    if any(dtype not in VERIFY_TOLERANCES for dtype in dtypes):
        return None
    return VERIFY_TOLERANCES[max(dtypes, key=lambda name: torch.finfo(getattr(torch, name)).eps)]


def gguf_tolerance(gguf_dtype: str, computed: str) -> float | None:
    """The tolerance of a GGUF file of `gguf_dtype` against a run that computed in `computed`.

    llama.cpp keeps its KV cache in f16 by default, so an f32 file is judged at float16 at
    best; a quantized type by its measured tolerance (`GGUF_QUANT_TOLERANCES`), or the run's
    compute dtype's where that is coarser. None for a type with no measured tolerance.
    """
    if gguf_dtype in GGUF_QUANT_TOLERANCES:
        floor = _tolerance(computed, "float16")
        return max(GGUF_QUANT_TOLERANCES[gguf_dtype], floor if floor is not None else 0.0)
    return _tolerance(computed, GGUF_DTYPE_NAMES.get(gguf_dtype, gguf_dtype), "float16")


def _gguf_logits(path: Path, rows: list[list[int]]) -> list[torch.Tensor]:
    """llama.cpp's logits at every position of each row (llama-cpp-python)."""
    import numpy as np
    import torch
    from llama_cpp import Llama

    try:
        llm = Llama(model_path=os.fspath(path), n_ctx=max(len(ids) for ids in rows) + 8, logits_all=True,
                    verbose=False, n_threads=max(1, (os.cpu_count() or 2) // 2))
    except ValueError as error:  # llama-cpp-python's only word for "llama.cpp refused the file"
        raise VerifyError(f"merge --verify: gguf: llama.cpp cannot load {path.name} ({error_summary(error)}); the "
                          "GGUF file would not run in llama.cpp or Ollama (merge without --verify to keep it and see "
                          "llama.cpp's log: llama_cpp.Llama(model_path, verbose=True))") from None
    found = []
    for ids in rows:
        llm.reset()
        llm.eval(ids)
        found.append(torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32)))
    return found


def _figures(model: str, dtype: str, reference: list[torch.Tensor], other: list[torch.Tensor],
             tolerance: float | None, min_agreement: float | None) -> VerifyFigures:
    import torch

    ref, got = torch.cat(reference), torch.cat(other)
    vocab = min(ref.shape[-1], got.shape[-1])  # a GGUF may pad the vocabulary; compare what both have
    ref, got = ref[:, :vocab], got[:, :vocab]
    max_abs = (got - ref).abs().max().item()
    scale = ref.abs().max().item()
    agreement = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return VerifyFigures(model, dtype, len(reference), int(ref.shape[0]), max_abs, scale,
                         max_abs / scale if scale > 0 else float("inf"), agreement, tolerance, min_agreement)


def verify_merged(settings: dict[str, Any], adapter: Path, tokenizer: Any, folder: str | os.PathLike[str], *,
                  gguf: str | os.PathLike[str] | None = None, gguf_dtype: str = "f16",
                  rows: int = VERIFY_ROWS) -> list[VerifyFigures]:
    """Compare the merged folder (and its GGUF, where llama-cpp-python is installed) with the run's model.

    Args:
        settings (dict): the run's settings (report.json).
        adapter (Path): the run's adapter folder.
        tokenizer (Any): the run's tokenizer, with its chat template.
        folder (str | PathLike): the merged model folder, as written.
        gguf (str | PathLike | None): its GGUF file, if one was written. Default: None
        gguf_dtype (str): the GGUF file's matrix dtype, for its tolerance. Default: "f16"
        rows (int): rows of the run's data to compare on. Default: VERIFY_ROWS

    Returns:
        list[VerifyFigures]: the merged folder's figures, then the GGUF's where it was compared.

    Raises:
        VerifyError: the run's data is gone or no longer reads.
    """
    import gc

    from transformers import AutoModelForCausalLM

    from .run_model import load_run_model

    ids = _rows(settings, tokenizer, rows)
    run_model = load_run_model(settings, adapter)
    reference, computed = _forward(run_model, ids)
    del run_model
    gc.collect()
    merged_model = AutoModelForCausalLM.from_pretrained(os.fspath(folder), local_files_only=True,
                                                        trust_remote_code=False).eval()
    merged, dtype = _forward(merged_model, ids)
    found = [_figures("merged", dtype, reference, merged, _tolerance(computed, dtype), VERIFY_AGREEMENT)]
    del merged_model
    gc.collect()
    if gguf is not None and _has_llama_cpp():
        tolerance = gguf_tolerance(gguf_dtype, computed)
        judge_agreement = tolerance is not None and gguf_dtype not in GGUF_QUANT_TOLERANCES
        found.append(_figures("gguf", gguf_dtype, reference, _gguf_logits(Path(gguf), ids), tolerance,
                              VERIFY_AGREEMENT if judge_agreement else None))
    return found


def _has_llama_cpp() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def check_figures(figures: list[VerifyFigures]) -> None:
    """Raise `VerifyError` naming every figure past its tolerance.

    Raises:
        VerifyError: the exported model does not compute what the run trained.
    """
    failures = [f"{f.model}: {failure}" for f in figures for failure in f.failures]
    if failures:
        raise VerifyError("merge --verify: " + "; ".join(failures) + ": the merged model does not compute what the "
                          "run trained (merge without --verify to keep the folder and inspect it)")
