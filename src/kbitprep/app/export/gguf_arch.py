"""How each transformers architecture is written as GGUF: one table row per architecture.

    config.json ──> GGUF_ARCHITECTURES row (first listed architecture with a row wins)
        ──> hyperparameters: the common ones, then the row's own keys (soft-capping, window)
        ──> rope: theta, rotary dimensions, scaling (linear / yarn keys, llama3's rope_freqs
            tensor, longrope's factor tensors), only the kinds llama.cpp reads for that architecture
        ──> tensors: gguf's TensorNameMap names; q/k rows permuted for llama.cpp's adjacent-pair
            rope; norm weights shifted where HF computes x * (1 + w); a tied lm_head not written

The figures follow llama.cpp's own converter (convert_hf_to_gguf.py and its conversion/
package: LlamaModel.permute and generate_extra_tensors, GemmaModel/Gemma2Model.modify_tensors,
Phi3MiniModel.set_gguf_parameters, TextModel.set_gguf_parameters for the rope keys); the code
here is kbitprep's. Transformers 5 keeps the rope settings in `rope_parameters` (`rope_type`,
`rope_theta` inside), older versions in `rope_scaling` (`type` or `rope_type`) beside a top-level
`rope_theta`: both are read.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

from ...errors import KbitPrepError

if TYPE_CHECKING:
    import torch

__all__ = ["GGUF_ARCHITECTURES", "GgufArchitecture", "GgufError", "HyperparameterKey", "extra_tensors",
           "gguf_architecture", "llama3_rope_factors", "permute_for_llama_rope", "rope_settings",
           "write_hyperparameters", "written_tensor"]


class GgufError(KbitPrepError, ValueError):
    """A model cannot be written as GGUF; the message names what is supported."""


@dataclasses.dataclass(frozen=True)
class HyperparameterKey:
    """One architecture-specific GGUF key, read from config.json.

    Args:
        writer_method (str): the `gguf.GGUFWriter` method that writes it, e.g. "add_sliding_window".
        config_key (str): the config.json key it is read from.
        default (float | int | None): written when the config has no value; None: the config must
            have one (llama.cpp would use its own default, not the model's). Default: None
    """

    writer_method: str
    config_key: str
    default: float | int | None = None


@dataclasses.dataclass(frozen=True)
class GgufArchitecture:
    """How one transformers architecture is written as GGUF.

    Args:
        gguf_name (str): the `gguf.MODEL_ARCH` member name (llama.cpp's architecture).
        permute_qk (bool): reorder q/k rows per head for llama.cpp's adjacent-pair ("normal") rope;
            False where llama.cpp ropes halves (NEOX), as HF does.
        rope_types (frozenset[str]): the rope scaling kinds llama.cpp reads for this architecture,
            besides "default". Default: linear, yarn
        norm_shift (float): added to every norm weight: HF Gemma's RMSNorm computes x * (1 + w),
            llama.cpp's x * w. Default: 0.0
        keys (tuple[HyperparameterKey, ...]): the architecture's own GGUF keys. Default: ()
    """

    gguf_name: str
    permute_qk: bool
    rope_types: frozenset[str] = frozenset({"linear", "yarn"})
    norm_shift: float = 0.0
    keys: tuple[HyperparameterKey, ...] = ()


_GEMMA2_KEYS = (HyperparameterKey("add_attn_logit_softcapping", "attn_logit_softcapping"),
                HyperparameterKey("add_final_logit_softcapping", "final_logit_softcapping"),
                HyperparameterKey("add_sliding_window", "sliding_window"))

# transformers architecture class -> its GGUF form; the first of config.json's architectures with a
# row wins. llama.cpp reads Mistral as "llama" (its converter does the same). Gemma's embedding
# scale (sqrt(hidden)) is applied by llama.cpp's gemma graphs themselves: no tensor changes for it.
# Phi-3's fused qkv_proj and gate_up_proj are written fused (llama.cpp splits them); its sliding
# window is written as 0 where the config has none, and its original context always (llama.cpp
# picks the long or short rope factors by it), as llama.cpp's converter does.
GGUF_ARCHITECTURES = {
    "LlamaForCausalLM": GgufArchitecture("LLAMA", permute_qk=True, rope_types=frozenset({"linear", "yarn", "llama3"})),
    "MistralForCausalLM": GgufArchitecture("LLAMA", permute_qk=True,
                                           rope_types=frozenset({"linear", "yarn", "llama3"})),
    "Qwen2ForCausalLM": GgufArchitecture("QWEN2", permute_qk=False),
    "Qwen3ForCausalLM": GgufArchitecture("QWEN3", permute_qk=False),
    "GemmaForCausalLM": GgufArchitecture("GEMMA", permute_qk=False, rope_types=frozenset({"linear"}), norm_shift=1.0),
    "Gemma2ForCausalLM": GgufArchitecture("GEMMA2", permute_qk=False, rope_types=frozenset({"linear"}),
                                          norm_shift=1.0, keys=_GEMMA2_KEYS),
    "Phi3ForCausalLM": GgufArchitecture("PHI3", permute_qk=False, rope_types=frozenset({"longrope"}),
                                        keys=(HyperparameterKey("add_sliding_window", "sliding_window", 0),
                                              HyperparameterKey("add_rope_scaling_orig_ctx_len",
                                                                "original_max_position_embeddings"))),
}


def gguf_architecture(config: dict[str, Any]) -> GgufArchitecture:
    """The GGUF row for a config.json's architecture, its rope settings checked.

    Raises:
        GgufError: no row (the message names the supported architectures), or a rope scaling
            kind llama.cpp does not read for this architecture.
    """
    names = config.get("architectures") or []
    row = next((GGUF_ARCHITECTURES[name] for name in names if name in GGUF_ARCHITECTURES), None)
    if row is None:
        raise GgufError(f"--gguf: {', '.join(names) or config.get('model_type', 'this architecture')} is not one "
                        f"kbitprep writes as GGUF; supported: {', '.join(GGUF_ARCHITECTURES)}. Merge without --gguf "
                        "and convert with llama.cpp's convert_hf_to_gguf.py")
    kind = rope_settings(config)["rope_type"]
    if kind != "default" and kind not in row.rope_types:
        raise GgufError(f"--gguf: rope scaling {kind!r} of {names[0]} is not one llama.cpp's {row.gguf_name.lower()} "
                        f"architecture reads; it reads {', '.join(sorted(row.rope_types))} (or none). Merge without "
                        "--gguf, or remove the scaling from config.json if the model does not need it")
    return row


def rope_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The rope settings of a config.json, the same for transformers 4 and 5.

    Returns:
        dict: at least rope_type ("default" for none), rope_theta and partial_rotary_factor;
            the scaling's own keys (factor, original_max_position_embeddings, ...) as written.
    """
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params = dict(params.get("full_attention", params))  # per-layer-type settings: the global layers'
    params["rope_type"] = str(params.get("rope_type") or params.get("type") or "default").lower()
    if params["rope_type"] == "su":  # Phi-3's first name for longrope
        params["rope_type"] = "longrope"
    params.setdefault("rope_theta", config.get("rope_theta") or 10000.0)
    params.setdefault("partial_rotary_factor", config.get("partial_rotary_factor") or 1.0)
    if params.get("original_max_position_embeddings") is None:
        params["original_max_position_embeddings"] = config.get("original_max_position_embeddings")
    return params


def _head_dim(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def _rope_dimensions(config: dict[str, Any]) -> int:
    return int(_head_dim(config) * float(rope_settings(config)["partial_rotary_factor"]))


def write_hyperparameters(writer: Any, config: dict[str, Any], row: GgufArchitecture) -> None:
    """The common GGUF keys, the rope keys, then the row's own keys.

    Raises:
        GgufError: a key the row needs is missing from the config.
    """
    heads = config["num_attention_heads"]
    head_dim = _head_dim(config)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    _write_rope(writer, config)
    for key in row.keys:
        value = config.get(key.config_key, key.default)
        if value is None:
            value = key.default
        if value is None:
            raise GgufError(f"--gguf: config.json has no {key.config_key!r}, which llama.cpp's "
                            f"{row.gguf_name.lower()} architecture reads (it would use its own default)")
        getattr(writer, key.writer_method)(value)


def _write_rope(writer: Any, config: dict[str, Any]) -> None:
    """Rope keys as llama.cpp's converter writes them (TextModel.set_gguf_parameters, Phi3MiniModel)."""
    import gguf

    rope = rope_settings(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_rope_dimension_count(_rope_dimensions(config))
    kind, factor = rope["rope_type"], rope.get("factor")
    original = rope.get("original_max_position_embeddings")
    if kind == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(factor))
    elif kind == "yarn" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(factor))
        # HF falls back to max_position_embeddings where the original context is not given
        writer.add_rope_scaling_orig_ctx_len(int(original or config["max_position_embeddings"]))
        for method, names in (("add_rope_scaling_yarn_ext_factor", ("extrapolation_factor",)),
                              ("add_rope_scaling_yarn_attn_factor", ("attention_factor", "attn_factor")),
                              ("add_rope_scaling_yarn_beta_fast", ("beta_fast",)),
                              ("add_rope_scaling_yarn_beta_slow", ("beta_slow",))):
            value = next((rope[name] for name in names if rope.get(name) is not None), None)
            if value is not None:
                getattr(writer, method)(float(value))
    elif kind == "longrope" and rope.get("long_factor"):
        # Phi-3's converter writes no scaling type here: llama.cpp's phi3 graph reads the factor
        # tensors and this attention factor (HF's longrope attention_factor default)
        original = original or config["max_position_embeddings"]
        scale = config["max_position_embeddings"] / original
        attention = rope.get("attention_factor") or (
            math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0)
        writer.add_rope_scaling_attn_factors(float(attention))


def llama3_rope_factors(config: dict[str, Any]) -> list[float]:
    """Llama-3.1's rope scaling as the per-frequency divisors llama.cpp reads from `rope_freqs`.

    Each rotary frequency's wavelength is compared with the original context: short waves
    (< original / high_freq_factor) keep their frequency (1), long waves (> original /
    low_freq_factor) are divided by `factor`, and the ones between are blended smoothly; the
    figures and defaults are those of llama.cpp's converter (LlamaModel.generate_extra_tensors)
    and transformers' `_compute_llama3_parameters`.
    """
    rope = rope_settings(config)
    dim = _head_dim(config)
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    original = float(rope.get("original_max_position_embeddings") or 8192)
    factors = []
    for index in range(0, dim, 2):
        wavelength = 2 * math.pi * float(rope["rope_theta"]) ** (index / dim)
        if wavelength < original / high:
            factors.append(1.0)
        elif wavelength > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return factors


def extra_tensors(config: dict[str, Any]) -> dict[str, list[float]]:
    """The rope tensors a config adds (gguf tensor name -> float32 values): llama3's rope_freqs,
    longrope's long and short factors."""
    import gguf

    rope = rope_settings(config)
    if rope["rope_type"] == "llama3":
        return {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight": llama3_rope_factors(config)}
    if rope["rope_type"] == "longrope" and rope.get("long_factor"):
        half = _rope_dimensions(config) // 2
        long, short = list(rope["long_factor"]), list(rope.get("short_factor") or [])
        if len(long) != half or len(short) != half:
            raise GgufError(f"--gguf: longrope long_factor and short_factor must hold {half} values each (half the "
                            f"rotary dimensions), not {len(long)} and {len(short)}")
        return {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight": long,
                gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight": short}
    return {}


def permute_for_llama_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows reordered per head from HF's halves to llama.cpp's adjacent rotary pairs.

    (heads * 2 * half, in) -> (heads, 2, half, in) -> (heads, half, 2, in) -> back; a bias
    (heads * 2 * half,) the same way.
    """
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def written_tensor(hf_name: str, weight: torch.Tensor, config: dict[str, Any],
                   row: GgufArchitecture) -> torch.Tensor | None:
    """A merged tensor as the GGUF file holds it; None where it is not written (a tied lm_head)."""
    if hf_name == "lm_head.weight" and (config.get("tie_word_embeddings") or row.norm_shift):
        return None  # llama.cpp reads token_embd as the output (Gemma's converter always drops it)
    heads = config["num_attention_heads"]
    if row.permute_qk and hf_name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        return permute_for_llama_rope(weight, heads)
    if row.permute_qk and hf_name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
        return permute_for_llama_rope(weight, config.get("num_key_value_heads") or heads)
    if row.norm_shift and hf_name.endswith("norm.weight"):
        return weight.float() + row.norm_shift
    return weight
