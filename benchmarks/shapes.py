"""Model shapes the benchmarks use: published configs, written out because there is no hub here.

Each `PUBLISHED_CONFIGS` entry is the model's `config.json` as published on the Hugging
Face Hub (huggingface.co/<repo>/blob/main/config.json), keeping every field that shapes
the weights (sizes, heads, vocabulary, tying) and dropping only token ids of no
consequence here. All are loaded in bfloat16, as a QLoRA user passes
`dtype=torch.bfloat16`: four of the five configs say `"torch_dtype": "bfloat16"`;
Gemma-2-2B's says `"float32"`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["LOAD_DTYPE", "LOSS_MEMORY_CONFIGS", "PUBLISHED_CONFIGS", "QWEN_LOSS_LAYERS", "REAL_SHAPE", "TINY_CONFIG",
           "TRAINING_CONFIG", "published_source"]

LOAD_DTYPE = torch.bfloat16

PUBLISHED_CONFIGS: Mapping[str, Mapping[str, Any]] = {
    # https://huggingface.co/Qwen/Qwen2-0.5B/blob/main/config.json
    "Qwen2-0.5B": {
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
        "max_position_embeddings": 131072, "max_window_layers": 24, "sliding_window": 131072,
        "use_sliding_window": False, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06,
        "hidden_act": "silu", "attention_dropout": 0.0, "initializer_range": 0.02,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
    },
    # https://huggingface.co/meta-llama/Llama-3.2-1B/blob/main/config.json
    "Llama-3.2-1B": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "initializer_range": 0.02, "pretraining_tp": 1,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
    },
    # https://huggingface.co/google/gemma-2-2b/blob/main/config.json
    # (tie_word_embeddings is not in the file: Gemma2Config's default, True, applies)
    "Gemma-2-2B": {
        "model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"],
        "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 256000,
        "max_position_embeddings": 8192, "sliding_window": 4096, "query_pre_attn_scalar": 256,
        "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "rope_theta": 10000.0,
        "rms_norm_eps": 1e-06, "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02,
        "cache_implementation": "hybrid", "pad_token_id": 0, "torch_dtype": "float32", "use_cache": True,
    },
    # https://huggingface.co/mistralai/Mistral-7B-v0.1/blob/main/config.json
    "Mistral-7B": {
        "model_type": "mistral", "architectures": ["MistralForCausalLM"],
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
        "max_position_embeddings": 32768, "sliding_window": 4096, "rope_theta": 10000.0,
        "rms_norm_eps": 1e-05, "hidden_act": "silu", "initializer_range": 0.02,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    },
    # https://huggingface.co/meta-llama/Meta-Llama-3-8B/blob/main/config.json
    "Llama-3-8B": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
        "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-05,
        "rope_scaling": None, "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0,
        "initializer_range": 0.02, "pretraining_tp": 1,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    },
}

_SOURCES: Mapping[str, str] = {
    "Qwen2-0.5B": "Qwen/Qwen2-0.5B",
    "Llama-3.2-1B": "meta-llama/Llama-3.2-1B",
    "Gemma-2-2B": "google/gemma-2-2b",
    "Mistral-7B": "mistralai/Mistral-7B-v0.1",
    "Llama-3-8B": "meta-llama/Meta-Llama-3-8B",
}


def published_source(name: str) -> str:
    """The Hub repository whose config.json a `PUBLISHED_CONFIGS` entry copies."""
    return _SOURCES[name]


# The shape that is also materialised for real (random weights) to validate the meta sizing.
REAL_SHAPE = "Qwen2-0.5B"

# The training benchmark's model: Llama-shaped, ~110M parameters (untied 32,000-token
# embeddings and LM head: 49M; 12 layers: 61M), small enough for a CPU run of minutes.
TRAINING_CONFIG: Mapping[str, Any] = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"],
    "hidden_size": 768, "intermediate_size": 1536, "num_hidden_layers": 12,
    "num_attention_heads": 12, "num_key_value_heads": 4, "vocab_size": 32000,
    "max_position_embeddings": 512, "rms_norm_eps": 1e-05, "hidden_act": "silu",
    "attention_dropout": 0.0, "initializer_range": 0.02,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
}

# A few-kilobyte Qwen2 for smoke tests and --quick runs: same architecture as REAL_SHAPE
# (tied embeddings, q/k/v biases), so every code path of the full run is exercised.
TINY_CONFIG: Mapping[str, Any] = {
    **PUBLISHED_CONFIGS["Qwen2-0.5B"],
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024,
    "max_position_embeddings": 512, "max_window_layers": 2, "sliding_window": 512,
}

# The chunked-loss memory benchmark: the training model above, and Qwen2-0.5B's real head
# (151,936 x 896, tied to the embeddings) on 4 of its 24 layers, which keeps a CPU step within
# seconds while the head, the part the loss changes, is the real one.
QWEN_LOSS_LAYERS = 4
LOSS_MEMORY_CONFIGS: Mapping[str, Mapping[str, Any]] = {
    "110M model (section 2)": {**TRAINING_CONFIG, "max_position_embeddings": 1024},
    f"Qwen2-0.5B shape, {QWEN_LOSS_LAYERS} of 24 layers": {
        **PUBLISHED_CONFIGS["Qwen2-0.5B"], "num_hidden_layers": QWEN_LOSS_LAYERS, "max_window_layers": QWEN_LOSS_LAYERS,
    },
}
