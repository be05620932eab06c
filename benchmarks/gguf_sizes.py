"""GGUF file sizes per --gguf-dtype and each type's logit error against the f16 file.

A seeded random Llama (hidden 256, 4 layers, GPT-2's vocabulary size: rows of 256 values, so the
k-quants' 256-value blocks fit) written with every --gguf-dtype. The error: with llama-cpp-python,
llama.cpp's logits on two rows against those of the f16 file (max |difference| / max |f16 logit|);
without it, the dequantized matrices against the f16 ones (gguf.quants.dequantize), k-quants left
out. Writes the section "GGUF sizes and error" of BENCHMARKS.md; run: `make gguf-bench`.
"""

from __future__ import annotations

import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.memory_sweep import write_section
from kbitprep.app.export.gguf import GGUF_DTYPES, write_gguf
from kbitprep.app.export.gguf_quant import llama_cpp_installed

BEGIN, END = "<!-- gguf-sizes: begin -->", "<!-- gguf-sizes: end -->"
VOCABS = Path("/tmp/lcpp/llama_cpp_python-0.3.36/vendor/llama.cpp/models")
ROWS = [[1, 5, 9, 17, 33, 2, 60, 61, 7, 8, 900, 30000, 12, 13, 14, 15], [3, 4, 110, 50000, 112, 40, 41, 42]]


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50257, hidden_size=256, intermediate_size=512,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256, pad_token_id=0)).eval()
    model.config.architectures = ["LlamaForCausalLM"]
    return model


def _logits(path: Path) -> list[np.ndarray]:
    from llama_cpp import Llama

    llm = Llama(str(path), logits_all=True, n_ctx=64, verbose=False)
    found = []
    for ids in ROWS:
        llm.reset()
        llm.eval(ids)
        found.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
    return found


def _matrices(path: Path) -> dict[str, np.ndarray]:
    import gguf

    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in gguf.GGUFReader(path).tensors
            if len(t.shape) == 2}


def main() -> int:
    from transformers import AutoTokenizer

    started = time.perf_counter()
    use_llama = llama_cpp_installed()
    model = _model()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        tok = Path(folder) / "tok"
        tokenizer = AutoTokenizer.from_pretrained(str(VOCABS), gguf_file="ggml-vocab-gpt-2.gguf")
        tokenizer.save_pretrained(tok)
        reference = None
        for name, row in GGUF_DTYPES.items():
            if row.llama_cpp and not use_llama:
                continue
            path = Path(folder) / f"{name}.gguf"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                write_gguf(model, tokenizer, tok, path, dtype=name)
            figures = _logits(path) if use_llama else _matrices(path)
            if name == "f16":
                reference = figures
            rows.append((name, path.stat().st_size, figures))
        table = []
        for name, size, figures in rows:
            if use_llama:
                error = max(float(np.abs(a - b).max() / np.abs(b).max())
                            for a, b in zip(figures, reference, strict=True))
            else:
                error = max(float(np.abs(figures[k] - reference[k]).max() / np.abs(reference[k]).max())
                            for k in reference)
            table.append(f"| {name} | {size / 2**20:,.2f} | {size / rows[1][1]:.3f} | {error:.2e} |")
    what = "llama.cpp's logits on two rows" if use_llama else "the dequantized matrices (no llama-cpp-python)"
    count = sum(p.numel() for p in model.parameters())
    text = "\n".join([BEGIN, "## GGUF sizes and error", "",
                      f"A seeded random Llama (hidden 256, 4 layers, vocabulary 50,257: {count:,} parameters) written "
                      f"with each --gguf-dtype; error: max |difference| / max |f16 value| of {what} "
                      "against the f16 file; the 4-/5-bit types of the gguf package keep output.weight at q8_0 "
                      "(llama.cpp's quantizer: q6_k), a large share of this small model. "
                      f"`make gguf-bench` (benchmarks/gguf_sizes.py), "
                      f"{time.perf_counter() - started:.0f} s.", "",
                      "| --gguf-dtype | MiB | size / f16 | error vs f16 |", "|---|---:|---:|---:|", *table, END])
    write_section(text, begin=BEGIN, end=END)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
