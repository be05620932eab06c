"""upcast="norms": only normalisation layers go to float32, and the forward pass keeps the model's dtype.

The norm layers are recognised here by the test's own rule (the class name says "Norm"),
independent of kbitprep's `is_norm_layer`, so a layer the library misses shows up.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import ARCHS, QUANT_MODES, attach_lora, bnb_mode, run_reference, save_tiny_model
from kbitprep import model_bytes, plan_preparation, prepare_model_for_kbit_training, verify_gradient_flow

pytestmark = pytest.mark.usefixtures("single_thread")

# 4-bit NF4 with each half-precision compute dtype (the model loaded in the same dtype).
NORM_MODES = {
    "nf4-bf16": QUANT_MODES["nf4-dq"],
    "nf4-fp16": (torch.float16, bnb_mode(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                     bnb_4bit_compute_dtype=torch.float16)),
}


def is_norm(module: torch.nn.Module) -> bool:
    return "norm" in type(module).__name__.lower() and any(True for _ in module.parameters(recurse=False))


@pytest.mark.parametrize("mode", NORM_MODES)
@pytest.mark.parametrize("arch", ARCHS)
def test_norms_policy_trains_in_model_dtype(zoo, arch: str, mode: str) -> None:
    dtype, extra = NORM_MODES[mode]
    model = zoo.load(arch, "fp32", dtype=dtype, **extra())
    loaded = {name: param.dtype for name, param in model.named_parameters()}
    plan = plan_preparation(model, upcast="norms")
    prepare_model_for_kbit_training(model, upcast="norms")
    assert plan.bytes_after == model_bytes(model)

    norms = {name: module for name, module in model.named_modules() if is_norm(module)}
    assert norms, f"{arch} has no norm layer?"
    norm_params = {f"{name}.{local}" for name, module in norms.items()
                   for local, _ in module.named_parameters(recurse=False)}
    cast = {c.name for c in plan.casts}
    assert cast == {name for name in norm_params if dict(model.named_parameters())[name].is_floating_point()}
    for name, param in model.named_parameters():
        if name in norm_params:
            assert param.dtype == torch.float32, name
        else:
            # Embeddings, LM head, biases of quantized layers, quantized storage: as loaded
            # (the model's dtype; T5 keeps its `wo` in float32 on its own).
            assert param.dtype == loaded[name], name
    assert model.get_input_embeddings().weight.dtype == dtype

    seen: dict[str, torch.dtype] = {}
    for name, module in norms.items():
        # Registered after kbitprep's own hooks, so these see what the next layer will get.
        module.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, out.dtype))
    model = attach_lora(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a dtype mismatch anywhere would surface as an error or warning
        loss, grads = zoo.train_step(arch, model)
    assert torch.isfinite(loss)
    assert grads and all(grad is not None and torch.isfinite(grad).all() for grad in grads.values())
    assert seen.keys() == norms.keys()
    assert set(seen.values()) == {dtype}
    assert verify_gradient_flow(model, zoo.batch(arch, seed=1) if ARCHS[arch].kind == "encoder" else None).ok


@pytest.fixture(scope="module")
def qwen2_large_vocab(tmp_path_factory: pytest.TempPathFactory):
    """A Qwen2-shaped model with Qwen2's real 151,936-token vocabulary, tied, otherwise tiny (bf16)."""
    from transformers import Qwen2Config

    config = Qwen2Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return save_tiny_model(tmp_path_factory.mktemp("qwen2-151936"), config, dtype=torch.bfloat16)


def _load_qwen2(path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    dtype, extra = QUANT_MODES["nf4-dq"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes' torch.jit deprecations on load
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra())


def test_norms_footprint_on_qwen2_vocabulary(qwen2_large_vocab) -> None:
    ours = _load_qwen2(qwen2_large_vocab)
    plan = plan_preparation(ours, upcast="norms")
    prepare_model_for_kbit_training(ours, upcast="norms")
    measured = model_bytes(ours)
    assert plan.bytes_after == measured

    theirs = _load_qwen2(qwen2_large_vocab)
    predicted_reference = plan_preparation(theirs).bytes_after  # upcast="all" is the seed's rule
    run_reference(theirs)
    assert predicted_reference == model_bytes(theirs)
    assert measured <= 0.70 * model_bytes(theirs), (measured, model_bytes(theirs))
    # The 151,936 x 64 embedding (tied with the head) stays bf16 under "norms".
    assert ours.get_input_embeddings().weight.dtype == torch.bfloat16
    assert theirs.get_input_embeddings().weight.dtype == torch.float32

    model = attach_lora(ours)
    batch = {"input_ids": torch.randint(0, 151936, (1, 4), generator=torch.Generator().manual_seed(0))}
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss)
