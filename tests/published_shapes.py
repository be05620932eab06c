"""The config.json of published models, written from their model cards' numbers: one dict per model.

Only what decides the shapes and the step (sizes, heads, vocabulary, tying, rope, logit caps,
sliding windows, the dtype) is written; everything else is the transformers default. The
memory tests save each as a folder holding only config.json and size it on the meta device.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def _llama3(**sizes: Any) -> dict[str, Any]:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
            "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "rope_scaling": _LLAMA3_ROPE, "tie_word_embeddings": False, "hidden_act": "silu",
            "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16", **sizes}


def _qwen2(**sizes: Any) -> dict[str, Any]:
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "use_sliding_window": False, "sliding_window": 131072,
            "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151643, "torch_dtype": "bfloat16",
            **sizes}


def _gemma2(**sizes: Any) -> dict[str, Any]:
    return {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "vocab_size": 256000, "head_dim": 256,
            "query_pre_attn_scalar": 256, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
            "sliding_window": 4096, "max_position_embeddings": 8192, "rope_theta": 10000.0,
            "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
            "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "torch_dtype": "bfloat16", **sizes}


PUBLISHED: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": _llama3(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=8),
    "llama-3.1-70b": _llama3(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                             num_attention_heads=64, num_key_value_heads=8),
    "llama-3.2-1b": _llama3(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                            num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                            rope_scaling={**_LLAMA3_ROPE, "factor": 32.0}),
    "mistral-7b-v0.3": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
                        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                        "num_key_value_heads": 8, "vocab_size": 32768, "max_position_embeddings": 32768,
                        "rope_theta": 1000000.0, "sliding_window": None, "rms_norm_eps": 1e-5,
                        "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "bfloat16"},
    "mixtral-8x7b": {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
                     "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "vocab_size": 32000, "num_local_experts": 8,
                     "num_experts_per_tok": 2, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
                     "sliding_window": None, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                     "hidden_act": "silu", "router_aux_loss_coef": 0.02, "torch_dtype": "bfloat16"},
    "qwen2.5-0.5b": _qwen2(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                           num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                           max_position_embeddings=32768, max_window_layers=24),
    "qwen2.5-7b": _qwen2(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, max_window_layers=28),
    "qwen2.5-72b": _qwen2(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                          num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False, max_window_layers=80),
    "gemma-2-2b": _gemma2(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                          num_key_value_heads=4),
    "gemma-2-9b": _gemma2(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
                          num_key_value_heads=8),
    "phi-3-mini-4k": {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 3072,
                      "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32,
                      "num_key_value_heads": 32, "vocab_size": 32064, "max_position_embeddings": 4096,
                      "original_max_position_embeddings": 4096, "rope_theta": 10000.0, "sliding_window": 2047,
                      "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False,
                      "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000, "torch_dtype": "bfloat16"},
    "olmo-2-7b": {"architectures": ["Olmo2ForCausalLM"], "model_type": "olmo2", "hidden_size": 4096,
                  "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                  "num_key_value_heads": 32, "vocab_size": 100352, "max_position_embeddings": 4096,
                  "rope_theta": 500000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu", "attention_bias": False,
                  "tie_word_embeddings": False, "pad_token_id": 100277, "eos_token_id": 100257,
                  "torch_dtype": "bfloat16"},
    "smollm2-135m": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
                     "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                     "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192,
                     "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": True,
                     "bos_token_id": 0, "eos_token_id": 0, "torch_dtype": "bfloat16"},
}


def save_config(name: str, root: Path) -> Path:
    """The model `name` as a folder holding config.json only (no weights, no tokenizer)."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(PUBLISHED[name], indent=2), encoding="utf-8")
    return folder


def weight_bytes(estimate: Any) -> int:
    """The bytes of the model's own weights in an estimate: what any training step holds at least."""
    return sum(estimate.component(name) for name in ("quantized weights", "quantization state", "frozen weights"))


def generous_bound(config: dict[str, Any], batch_size: int, seq_len: int, *, checkpointed: bool = True) -> int:
    """A loose ceiling on what a step may add to the weights: 4x a hand count of its largest parts.

    Per token: every layer's kept input (bf16) when checkpointed, else every layer's whole
    working set (the preparation checkpoints only quantized models), one layer's working set
    (24 values of each of the hidden and intermediate widths, fp32), and the loss's (8 fp32
    copies of the logits, the full loss's worst); plus the LoRA parameters, gradients and
    AdamW state (a whole copy of the weights in fp32 is far above that), and 256 MiB.
    """
    hidden = config["hidden_size"]
    inner = config["intermediate_size"] * config.get("num_local_experts", 1)
    layer = 24 * (hidden + inner) * 4
    kept = hidden * 2 if checkpointed else layer
    per_token = config["num_hidden_layers"] * kept + layer + 8 * config["vocab_size"] * 4
    return 4 * batch_size * seq_len * per_token + 2**28
