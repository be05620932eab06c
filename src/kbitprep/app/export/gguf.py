"""GGUF export of a merged model, for llama.cpp and Ollama, with the `gguf` Python package alone.

    merged model (plain weights) ──> architecture row (GGUF_ARCHITECTURES)
        ──> hyperparameters from config.json ──> tensors renamed by gguf's own
            TensorNameMap (q/k rows permuted where llama.cpp's rope expects it)
        ──> tokenizer (tokens, types, merges, special ids) and chat template
        ──> one .gguf file, written inside merge's staging folder

The q/k permutation: HF Llama checkpoints order each head's rotary pairs as two halves
(rotate_half), llama.cpp's "llama" rope pairs adjacent values; llama.cpp's
convert_hf_to_gguf.py (LlamaModel.permute) reorders q_proj and k_proj rows per head so
that the pairs are adjacent. Qwen2 uses the NEOX (halves) rope in llama.cpp, so its
weights are written as they are.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import KbitPrepError

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = ["GGUF_ARCHITECTURES", "GGUF_DTYPES", "GGUF_FILE", "GgufArchitecture", "GgufError", "gguf_architecture",
           "permute_for_llama_rope", "write_gguf"]

GGUF_FILE = "model.gguf"


class GgufError(KbitPrepError, ValueError):
    """A model cannot be written as GGUF; the message names what is supported."""


@dataclasses.dataclass(frozen=True)
class GgufArchitecture:
    """How one transformers architecture is written as GGUF.

    Args:
        gguf_name (str): the `gguf.MODEL_ARCH` member name (llama.cpp's architecture).
        permute_qk (bool): reorder q/k rows per head for llama.cpp's adjacent-pair rope.
    """

    gguf_name: str
    permute_qk: bool


# transformers architecture class -> its GGUF form; first match wins. llama.cpp reads Mistral
# as "llama" (its converter does the same).
GGUF_ARCHITECTURES = {
    "LlamaForCausalLM": GgufArchitecture("LLAMA", permute_qk=True),
    "MistralForCausalLM": GgufArchitecture("LLAMA", permute_qk=True),
    "Qwen2ForCausalLM": GgufArchitecture("QWEN2", permute_qk=False),
}

# --gguf-dtype -> (gguf tensor type name, llama file type name) for 2-D weights; norms and
# other 1-D tensors stay float32, as llama.cpp's converter writes them.
GGUF_DTYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16")}


def gguf_architecture(config: dict[str, Any]) -> GgufArchitecture:
    """The GGUF row for a config.json's architecture.

    Raises:
        GgufError: no row; the message names the supported architectures.
    """
    names = config.get("architectures") or []
    row = next((GGUF_ARCHITECTURES[name] for name in names if name in GGUF_ARCHITECTURES), None)
    if row is None:
        raise GgufError(f"--gguf: {', '.join(names) or config.get('model_type', 'this architecture')} is not one "
                        f"kbitprep writes as GGUF; supported: {', '.join(GGUF_ARCHITECTURES)}. Merge without --gguf "
                        "and convert with llama.cpp's convert_hf_to_gguf.py")
    return row


def permute_for_llama_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows reordered per head from HF's halves to llama.cpp's adjacent rotary pairs.

    (heads * 2 * half, in) -> (heads, 2, half, in) -> (heads, half, 2, in) -> back.
    """
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _hyperparameters(writer: Any, config: dict[str, Any]) -> None:
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or {}
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)


def _tokenizer(writer: Any, tokenizer: Any, folder: Path, vocab_size: int) -> None:
    """Tokens, their types and merges (a BPE tokenizer.json, llama.cpp's "gpt2" model), special ids, template."""
    import gguf

    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")) \
        if (folder / "tokenizer.json").is_file() else {}
    model = data.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise GgufError(f"{folder}: --gguf writes BPE tokenizers (tokenizer.json, as Llama-3's and Qwen2's); this "
                        f"one is {model.get('type', 'not a tokenizer.json')}"
                        f"{' with byte fallback (sentencepiece)' if model.get('byte_fallback') else ''}. Merge "
                        "without --gguf and convert with llama.cpp's convert_hf_to_gguf.py")
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = {token.content: token.special for token in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:  # rows of the embedding no token uses (a vocabulary padded to a round size)
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL if token not in added else
                         gguf.TokenType.CONTROL if added[token] else gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    special.chat_template = tokenizer.chat_template  # the one the run trained with (merge saved it)
    special.add_to_gguf(writer)


def _tensor(weight: torch.Tensor, kind: str) -> tuple[np.ndarray, Any]:
    """A tensor as the array GGUFWriter takes, and its GGUF type (None: the array's own)."""
    import gguf
    import torch

    values = weight.detach().to(torch.float32).cpu().numpy()
    if values.ndim < 2 or kind == "F32":
        return values, None
    if kind == "F16":
        return values.astype("float16"), None
    return gguf.quants.quantize(values, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16


def write_gguf(model: Any, tokenizer: Any, tokenizer_folder: str | os.PathLike[str], path: str | os.PathLike[str],
               *, dtype: str = "f16") -> int:
    """Write a plain (merged) causal LM as one GGUF file.

    Args:
        model (Any): the merged transformers model (no quantized layers).
        tokenizer (Any): its tokenizer, carrying the chat template to write.
        tokenizer_folder (str | PathLike): where that tokenizer is saved (tokenizer.json).
        path (str | PathLike): the file to write.
        dtype (str): "f32", "f16" or "bf16" for 2-D weights. Default: "f16"

    Returns:
        int: tensors written.

    Raises:
        GgufError: the architecture, tokenizer or a tensor has no GGUF form here.
    """
    import gguf

    if dtype not in GGUF_DTYPES:
        raise GgufError(f"--gguf-dtype must be one of {', '.join(GGUF_DTYPES)}, not {dtype!r}")
    config = model.config.to_dict()
    row = gguf_architecture(config)
    arch = gguf.MODEL_ARCH[row.gguf_name]
    blocks = config["num_hidden_layers"]
    names = gguf.get_tensor_name_map(arch, blocks)
    kind, file_type = GGUF_DTYPES[dtype]
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]

    writer = gguf.GGUFWriter(os.fspath(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(Path(config.get("_name_or_path") or "model").name or "model")
    writer.add_file_type(gguf.LlamaFileType[file_type])
    _hyperparameters(writer, config)
    _tokenizer(writer, tokenizer, Path(tokenizer_folder), config["vocab_size"])
    written = 0
    for hf_name, weight in model.state_dict().items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GgufError(f"--gguf: no GGUF name for tensor {hf_name!r} of {config['architectures'][0]}")
        if row.permute_qk and hf_name.endswith("self_attn.q_proj.weight"):
            weight = permute_for_llama_rope(weight, heads)
        elif row.permute_qk and hf_name.endswith("self_attn.k_proj.weight"):
            weight = permute_for_llama_rope(weight, kv_heads)
        values, raw = _tensor(weight, kind)
        writer.add_tensor(name, values, raw_dtype=raw)
        written += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written
