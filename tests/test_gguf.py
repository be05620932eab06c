"""`kbitprep merge --gguf`: the merged model as one GGUF file, read back with gguf's own reader.

Checked for a finished tiny Llama run (the demo's) and a tiny Qwen2 run (built here with
the demo tokenizer): the tensor names are gguf's own mapping of every merged tensor
(`get_tensor_name_map`), the shapes are the merged ones, and the values equal the merged
safetensors at the written precision (f32 exactly, f16 and bf16 after the same rounding),
with llama.cpp's q/k row permutation undone for Llama (none for Qwen2); the metadata holds
the architecture, block count, heads, the chat template and the tokens. An architecture
llama.cpp's "llama"/"qwen2" readers do not take (GPT-2) is refused, naming the supported
ones, before anything is loaded or written.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from kbitprep.app.export.gguf import GGUF_ARCHITECTURES, GgufError, permute_for_llama_rope
from kbitprep.app.export.merge import merge_run

DEMO_DATA = Path(__file__).resolve().parents[1] / "src" / "kbitprep" / "data" / "demo.jsonl"


def _finetune(model: Path, out: Path) -> Path:
    from kbitprep.app.config.settings import FinetuneSettings
    from kbitprep.app.training.run import finetune

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        finetune(FinetuneSettings(str(model), str(DEMO_DATA), str(out), lora_r=4, lora_dropout=0.0, lr=1e-2,
                                  batch_size=4, max_steps=2, seq_len=32))
    return out


def _with_demo_tokenizer(folder: Path) -> Path:
    from kbitprep.app.demo import DEMO_MODEL

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(Path(str(DEMO_MODEL)) / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM, GPT2Config, Qwen2Config

    from kbitprep.app.demo import build_tiny_model

    root = tmp_path_factory.mktemp("gguf")
    llama = build_tiny_model(root / "llama")
    torch.manual_seed(0)
    qwen = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    AutoModelForCausalLM.from_config(qwen).save_pretrained(root / "qwen2")
    gpt2 = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    AutoModelForCausalLM.from_config(gpt2).save_pretrained(root / "gpt2")
    return {"llama": _finetune(llama, root / "run-llama"),
            "qwen2": _finetune(_with_demo_tokenizer(root / "qwen2"), root / "run-qwen2"),
            "gpt2": _finetune(_with_demo_tokenizer(root / "gpt2"), root / "run-gpt2")}


def _field(reader, key: str):
    return reader.fields[key].contents()


def _rounded(values: np.ndarray, dtype: str) -> np.ndarray:
    """The merged float32 values as the GGUF file stores them (1-D tensors stay float32)."""
    if values.ndim < 2 or dtype == "f32":
        return values
    if dtype == "f16":
        return values.astype(np.float16).astype(np.float32)
    return torch.from_numpy(values).to(torch.bfloat16).float().numpy()


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "dtype"), [("llama", "f32"), ("llama", "f16"), ("qwen2", "bf16")])
def test_the_gguf_file_holds_the_merged_weights_under_ggufs_names(runs: dict[str, Path], tmp_path: Path,
                                                                    arch: str, dtype: str) -> None:
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig

    # the demo tokenizer (characters, no pre-tokenizer) is in no llama.cpp table: named by hand
    report = merge_run(runs[arch], tmp_path / "merged", dtype="fp32", gguf=True, gguf_dtype=dtype, gguf_pre="default")
    assert report.gguf == str(tmp_path / "merged" / "model.gguf")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    config = AutoConfig.from_pretrained(tmp_path / "merged")
    reader = gguf.GGUFReader(tmp_path / "merged" / "model.gguf")

    gguf_arch = gguf.MODEL_ARCH[GGUF_ARCHITECTURES[config.architectures[0]].gguf_name]
    names = gguf.get_tensor_name_map(gguf_arch, config.num_hidden_layers)
    expected = {names.get_name(name, try_suffixes=(".weight", ".bias")): name for name in merged}
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == set(expected) and None not in expected
    if arch == "qwen2":
        assert "blk.0.attn_q.bias" in tensors  # Qwen2's q/k/v biases
    for gguf_name, hf_name in expected.items():
        tensor = tensors[gguf_name]
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(tuple(reversed(tensor.shape)))
        ours = torch.from_numpy(np.array(values, dtype=np.float32))
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in hf_name else config.num_key_value_heads
            # undo llama.cpp's permutation: applying the inverse reshape gives the HF rows back
            half = ours.shape[0] // heads // 2
            ours = ours.reshape(heads, half, 2, *ours.shape[1:]).swapaxes(1, 2).reshape(ours.shape)
        assert tuple(ours.shape) == tuple(merged[hf_name].shape), hf_name
        reference = _rounded(merged[hf_name].float().numpy(), dtype)
        assert np.array_equal(ours.numpy(), reference), hf_name

    assert _field(reader, "general.architecture") == gguf.MODEL_ARCH_NAMES[gguf_arch]
    prefix = gguf.MODEL_ARCH_NAMES[gguf_arch]
    assert _field(reader, f"{prefix}.block_count") == config.num_hidden_layers
    assert _field(reader, f"{prefix}.attention.head_count_kv") == config.num_key_value_heads
    assert _field(reader, f"{prefix}.embedding_length") == config.hidden_size
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert _field(reader, "tokenizer.chat_template") == tokenizer.chat_template
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == config.vocab_size and tokens[:3] == ["<pad>", "<s>", "</s>"]
    assert tokens[tokenizer.convert_tokens_to_ids("a")] == "a"
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id


def test_the_permutation_is_llama_cpps_per_head_pairing() -> None:
    # One head of 4 rows in HF's halves order (r0 r1 | r2 r3) -> adjacent pairs (r0 r2 r1 r3).
    weight = torch.arange(8.0).reshape(4, 2)
    assert permute_for_llama_rope(weight, 1)[:, 0].tolist() == [0.0, 4.0, 2.0, 6.0]


@pytest.mark.slow
def test_an_unsupported_architecture_is_refused_before_anything_is_written(runs: dict[str, Path],
                                                                           tmp_path: Path) -> None:
    with pytest.raises(GgufError, match="GPT2LMHeadModel is not one kbitprep writes as GGUF; supported: "
                                        "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        merge_run(runs["gpt2"], tmp_path / "merged", gguf=True)
    assert list(tmp_path.iterdir()) == []
