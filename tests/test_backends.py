"""Recognising quantization: the seed's methods against the reference, every method
transformers knows, and models quantized by hand (found from their tensors and layers)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from transformers.utils.quantization_config import QuantizationMethod

from conftest import attach_lora, model_state, run_reference
from kbitprep import (
    BACKENDS,
    KbitPrepWarning,
    detect_quantization,
    plan_preparation,
    prepare_model_for_kbit_training,
    verify_gradient_flow,
)

pytestmark = pytest.mark.usefixtures("single_thread")

# The methods the seed names: checkpointed, and never upcast.
SEED_MARKERS = {
    "gptq": {"quantization_method": "gptq"},
    "aqlm": {"quantization_method": "aqlm"},
    "eetq": {"quantization_method": "eetq"},
    "torchao": {"quantization_method": "torchao"},
    "hqq": {"quantization_method": "hqq"},
    "hqq-flag": {"hqq_quantized": True},
}


def test_every_transformers_method_has_a_backend_row() -> None:
    methods = {row.method for row in BACKENDS}
    assert {method.value for method in QuantizationMethod} <= methods
    assert len({row.name for row in BACKENDS}) == len(BACKENDS)
    # Only bitsandbytes computes in the dtype around it; every other backend keeps its own precision.
    assert {row.name for row in BACKENDS if row.upcast_allowed} == {"bitsandbytes-4bit", "bitsandbytes-8bit"}


@pytest.mark.parametrize("marker", SEED_MARKERS)
def test_seed_methods_match_reference(zoo, marker: str) -> None:
    """A (not really quantized) fp16 Llama marked the way transformers marks these backends."""
    ours, theirs = zoo.load("llama", "fp16"), zoo.load("llama", "fp16")
    for model in (ours, theirs):
        for attribute, value in SEED_MARKERS[marker].items():
            setattr(model, attribute, value)
    plan = plan_preparation(ours)
    assert plan.quantization == marker.removesuffix("-flag")
    assert plan.casts == () and plan.checkpointing.enabled
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_model_for_kbit_training(ours)
    run_reference(theirs)
    states = {name: (p.dtype, p.requires_grad) for name, p in ours.named_parameters()}
    assert states == {name: (p.dtype, p.requires_grad) for name, p in theirs.named_parameters()}
    assert {dtype for dtype, _ in states.values()} == {torch.float16}  # not upcast, as the seed says
    assert ours.is_activation_checkpointing and theirs.is_activation_checkpointing
    ids = zoo.batch("llama")["input_ids"]
    assert ours.get_input_embeddings()(ids).requires_grad and theirs.get_input_embeddings()(ids).requires_grad


def test_methods_beyond_the_seed_are_recognised_and_not_upcast(zoo) -> None:
    model = zoo.load("llama", "fp16")
    seed = {"gptq", "aqlm", "eetq", "torchao", "hqq", "bitsandbytes"}
    for method in QuantizationMethod:
        if method.value in seed:
            continue
        model.quantization_method = method  # transformers stores the enum member
        before = model_state(model)
        plan = plan_preparation(model)
        assert model_state(model) == before
        assert plan.detection.backend is not None and plan.detection.backend.method == method.value, method
        assert plan.casts == () and plan.checkpointing.enabled, method
        assert not any("not quantized" in message for message in plan.warnings)


def test_bitsandbytes_found_from_layers_without_flags(zoo) -> None:
    """Wrapped in a container, a loaded 4-/8-bit model has no flags or method; its tensors still tell."""
    for mode, name in (("nf4-dq", "bitsandbytes-4bit"), ("int8", "bitsandbytes-8bit")):
        wrapped = nn.ModuleDict({"inner": zoo.load("llama", mode)})
        detection = detect_quantization(wrapped)
        assert detection.name == name
        assert "inner." in detection.evidence
        plan = plan_preparation(wrapped, use_gradient_checkpointing=False)
        assert plan.casts and all(cast.from_dtype != torch.uint8 for cast in plan.casts)


def test_hand_quantized_quanto_model_prepares_and_trains(zoo) -> None:
    from optimum.quanto import freeze, qint8, quantize

    model = zoo.load("llama", "fp16")
    quantize(model, weights=qint8)
    freeze(model)
    detection = detect_quantization(model)
    assert detection.name == "quanto" and "WeightQBytesTensor" in detection.evidence
    quantized = {name: type(p) for name, p in model.named_parameters() if type(p) is not nn.Parameter}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_model_for_kbit_training(model)
    assert {name: type(p) for name, p in model.named_parameters() if name in quantized} == quantized
    assert verify_gradient_flow(attach_lora(model)).ok


class _ForeignParameter(nn.Parameter):
    """A tensor subclass no backend row claims."""


def test_unknown_tensor_subclass_is_never_cast() -> None:
    model = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 8)).to(torch.float16)
    model[1].weight = _ForeignParameter(model[1].weight.detach())
    detection = detect_quantization(model)
    assert detection.name == "unknown" and "_ForeignParameter" in detection.evidence
    plan = plan_preparation(model, use_gradient_checkpointing=False)
    assert plan.casts == ()
    with pytest.warns(KbitPrepWarning, match="tensor subclass"):
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    assert type(model[1].weight) is _ForeignParameter and model[1].weight.dtype == torch.float16
    assert not any(p.requires_grad for p in model.parameters())
