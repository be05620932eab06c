"""The GGUF table rows, read back with gguf's own reader (fast, no llama.cpp).

Checked: each row's architecture keys (Gemma-2's soft-capping and window, Phi-3's window and
original context) and tensor changes (Gemma's norms + 1, a tied lm_head left out); llama3's
rope_freqs against transformers' own llama3 rope (`ROPE_INIT_FUNCTIONS["llama3"]`); the gguf
package's quantized types dequantize near the weights; a k-quant without llama-cpp-python is
refused with the install line; an unsupported rope kind is refused naming the supported ones.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kbitprep.app.export.gguf import GgufError, gguf_dtype, write_gguf
from kbitprep.app.export.gguf_arch import gguf_architecture, llama3_rope_factors

COMMON = dict(vocab_size=128,  # noqa: C408  (configs' keyword arguments)
              hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _written(config, tmp_path: Path, dtype: str = "f32"):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kbitprep.app.demo import DEMO_MODEL

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.config.architectures = [type(model).__name__]
    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    tokenizer.save_pretrained(tmp_path / "tok")
    # the demo tokenizer (characters, no pre-tokenizer) is in no llama.cpp table: named by hand
    write_gguf(model, tokenizer, tmp_path / "tok", tmp_path / "m.gguf", dtype=dtype, gguf_pre="default")
    return model, gguf.GGUFReader(tmp_path / "m.gguf")


def _tensor(reader, name: str) -> np.ndarray:
    import gguf

    tensor = next(t for t in reader.tensors if t.name == name)
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(
        [int(n) for n in reversed(tensor.shape)])


def test_gemma2_keys_and_shifted_norms(tmp_path: Path) -> None:
    from transformers import Gemma2Config

    model, reader = _written(Gemma2Config(**COMMON, head_dim=16, sliding_window=128), tmp_path)
    assert reader.fields["gemma2.attn_logit_softcapping"].contents() == pytest.approx(50.0)
    assert reader.fields["gemma2.final_logit_softcapping"].contents() == pytest.approx(30.0)
    assert reader.fields["gemma2.attention.sliding_window"].contents() == 128
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names  # tied: llama.cpp reads token_embd
    norm = model.state_dict()["model.layers.0.post_feedforward_layernorm.weight"].numpy()
    np.testing.assert_allclose(_tensor(reader, "blk.0.post_ffw_norm.weight"), norm + 1)


def test_phi3_fused_tensors_and_keys(tmp_path: Path) -> None:
    from transformers import Phi3Config

    _, reader = _written(Phi3Config(**{**COMMON, "num_key_value_heads": 4}, original_max_position_embeddings=64),
                         tmp_path)
    assert reader.fields["phi3.attention.sliding_window"].contents() == 0
    assert reader.fields["phi3.rope.scaling.original_context_length"].contents() == 64
    names = {t.name for t in reader.tensors}
    assert {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight"} <= names


def test_llama3_rope_freqs_are_transformers_scaling(tmp_path: Path) -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(**COMMON, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    _, reader = _written(config, tmp_path)
    plain = LlamaConfig(**COMMON)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    base = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    expected = (base / scaled.double()).numpy()
    assert len(set(np.round(expected, 3))) > 2  # the test's figures cover all three regimes
    np.testing.assert_allclose(_tensor(reader, "rope_freqs.weight"), expected, rtol=1e-4)
    np.testing.assert_allclose(llama3_rope_factors(config.to_dict()), expected, rtol=1e-4)
    assert "rope_freqs.weight" not in {t.name for t in _written(plain, tmp_path / "plain")[1].tensors}


@pytest.mark.parametrize(("dtype", "bound"), [("q8_0", 0.01), ("q5_0", 0.05), ("q4_0", 0.1)])
def test_quantized_matrices_dequantize_near_the_weights(dtype: str, bound: float, tmp_path: Path) -> None:
    from transformers import Qwen2Config

    model, reader = _written(Qwen2Config(**COMMON), tmp_path, dtype)
    weight = model.state_dict()["model.layers.0.mlp.down_proj.weight"].numpy()
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.ffn_down.weight"] == dtype.upper()
    assert kinds["blk.0.attn_norm.weight"] == "F32"
    assert kinds["output.weight"] == ("Q8_0")  # more bits for the output projection, as llama.cpp
    error = np.abs(_tensor(reader, "blk.0.ffn_down.weight") - weight).max() / np.abs(weight).max()
    assert 0 < error < bound


def test_a_k_quant_without_llama_cpp_is_refused_with_the_install_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(GgufError, match=r"pip install 'kbitprep\[llama-cpp\]'"):
        gguf_dtype("q4_k_m")
    assert gguf_dtype("q4_0").name == "q4_0"


def test_a_rope_kind_llama_cpp_does_not_read_is_refused() -> None:
    from transformers import Qwen2Config

    config = Qwen2Config(**COMMON, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    config.architectures = ["Qwen2ForCausalLM"]
    with pytest.raises(GgufError, match="linear, yarn"):
        gguf_architecture(config.to_dict())
