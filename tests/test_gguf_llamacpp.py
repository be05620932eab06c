"""Each GGUF_ARCHITECTURES row, loaded in llama.cpp: the same logits as the PyTorch model.

Slow and optional: marked `llamacpp` (deselected by default; `make gguf-check` installs
llama-cpp-python and runs them). Without llama-cpp-python they fail with the install line.
For each architecture a tiny random model (hidden 64, 2 layers, the demo's BPE tokenizer) is
written to GGUF and run in llama.cpp on the same token ids as in PyTorch; the max |logit
difference| relative to the largest |logit| is bounded: f32 by 1e-3, quantized types (against
the f32 model) by bounds that scale with their bits.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from kbitprep.app.export.gguf import write_gguf
from kbitprep.app.export.gguf_quant import LLAMA_CPP_INSTALL, llama_cpp_installed

pytestmark = pytest.mark.llamacpp

# llama.cpp's own vocab-only files (in the llama-cpp-python sdist); GPT-2's: a real BPE with merges
VOCABS = Path(os.environ.get("LLAMA_CPP_VOCABS", "/tmp/lcpp/llama_cpp_python-0.3.36/vendor/llama.cpp/models"))
IDS = [[1, 5, 9, 17, 33, 2, 60, 61, 7, 8, 900, 30000], [3, 4, 110, 50000, 112, 40, 41]]


def _configs() -> dict[str, object]:
    import transformers as t

    common = dict(vocab_size=50257,  # noqa: C408  (configs' keyword arguments)
                  hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return {
        "llama": t.LlamaConfig(**common),
        "llama-llama3": t.LlamaConfig(**common, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8}),
        "llama-linear": t.LlamaConfig(**common, rope_scaling={"rope_type": "linear", "factor": 4.0}),
        "llama-yarn": t.LlamaConfig(**common, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                            "original_max_position_embeddings": 64}),
        "mistral": t.MistralConfig(**common),
        "qwen2": t.Qwen2Config(**common),
        "qwen3": t.Qwen3Config(**common, head_dim=16),
        "gemma": t.GemmaConfig(**common, head_dim=16),
        "gemma2": t.Gemma2Config(**common, head_dim=16, query_pre_attn_scalar=16, sliding_window=128),
        "phi3": t.Phi3Config(**{**common, "num_key_value_heads": 4}, original_max_position_embeddings=256),
    }


def _model(name: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_configs()[name], attn_implementation="eager").eval()
    model.config.architectures = [type(model).__name__]  # as save_pretrained writes it
    with torch.no_grad():  # norms away from their init of 1 (0 for Gemma), so a missed shift shows
        for key, param in model.named_parameters():
            if "norm" in key:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def _llama_cpp_logits(path: Path, rows: list[list[int]]) -> list[np.ndarray]:
    if not llama_cpp_installed():
        pytest.fail(f"llama-cpp-python is not installed: {LLAMA_CPP_INSTALL}")
    from llama_cpp import Llama

    llm = Llama(str(path), logits_all=True, n_ctx=64, verbose=False)
    found = []
    for ids in rows:
        llm.reset()
        llm.eval(ids)
        found.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
    return found


def _relative(model, path: Path) -> float:
    with torch.no_grad():
        expected = [model(input_ids=torch.tensor([ids])).logits[0].numpy() for ids in IDS]
    got = _llama_cpp_logits(path, IDS)
    return max(float(np.abs(g - e).max() / np.abs(e).max()) for g, e in zip(got, expected, strict=True))


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo tokenizer saved as merge saves it (tokenizer.json with its merges)."""
    from transformers import AutoTokenizer

    if not (VOCABS / "ggml-vocab-gpt-2.gguf").is_file():
        pytest.fail(f"{VOCABS}: no ggml-vocab-gpt-2.gguf; set LLAMA_CPP_VOCABS to the models/ folder of llama.cpp's "
                    "source (inside the llama-cpp-python sdist: vendor/llama.cpp/models)")
    folder = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(str(VOCABS), gguf_file="ggml-vocab-gpt-2.gguf").save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", list(_configs()))
def test_llama_cpp_computes_the_models_logits_at_f32(name: str, tokenizer_folder: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    model = _model(name)
    path = tmp_path / "model.gguf"
    write_gguf(model, AutoTokenizer.from_pretrained(tokenizer_folder), tokenizer_folder, path, dtype="f32")
    relative = _relative(model, path)
    print(f"{name} f32: max relative logit error {relative:.2e}")
    assert relative < 1e-3


@pytest.mark.parametrize(("dtype", "bound"), [("f16", 5e-3), ("q8_0", 3e-2), ("q5_1", 0.1), ("q5_0", 0.1),
                                              ("q4_1", 0.2), ("q4_0", 0.2), ("q6_k", 5e-2), ("q5_k_m", 0.1),
                                              ("q4_k_m", 0.2)])
def test_quantized_files_stay_near_the_model(dtype: str, bound: float, tokenizer_folder: Path,
                                              tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    model = _model("llama")
    path = tmp_path / "model.gguf"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 64-wide rows: the k-quants fall back, as llama.cpp says
        write_gguf(model, AutoTokenizer.from_pretrained(tokenizer_folder), tokenizer_folder, path, dtype=dtype)
    relative = _relative(model, path)
    print(f"llama {dtype}: max relative logit error {relative:.2e}")
    assert relative < bound
