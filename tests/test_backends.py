"""Recognising quantization: the seed's methods against the reference, every method
transformers knows, and models quantized by hand (found from their tensors and layers)."""

from __future__ import annotations

import ast
import pathlib
import warnings

import pytest
import torch
from torch import nn
from transformers.utils.quantization_config import QuantizationMethod

import kbitprep.backends
from conftest import attach_lora, model_state, run_reference
from kbitprep import (
    BACKENDS,
    KbitPrepWarning,
    detect_quantization,
    plan_preparation,
    prepare_model_for_kbit_training,
    verify_gradient_flow,
)
from kbitprep.backends import Backend, BackendBehaviour
from kbitprep.diagnostics import warning_code

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
        assert "not-quantized" not in plan.codes


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
    with pytest.warns(KbitPrepWarning) as caught:
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    assert [w.message.code for w in caught] == ["unknown-tensor-subclass"]
    assert type(model[1].weight) is _ForeignParameter and model[1].weight.dtype == torch.float16
    assert not any(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------- behaviour behind the table


class _ToyBehaviour(BackendBehaviour):
    """A backend with behaviour: a warning of its own and a training-layout fix on one layer."""

    def diagnostics(self, model, parameters, *, upcast, casts):
        return [_TOY_WARNING(f"toy layers: {len(parameters)} parameters, upcast={upcast}, {casts} casts")]

    def training_layout(self, model):
        return tuple(name for name, module in model.named_modules() if isinstance(module, nn.Linear))

    def describe_training_layout(self, layers):
        return "toy layout", f"{len(layers)} toy layers"

    def restore_training_layout(self, model, layers):
        modules = dict(model.named_modules())
        for name in layers:
            modules[name].toy_training_layout = True


_TOY_WARNING = warning_code("toy-backend-test", "a test backend's own warning (tests/test_backends.py only)")


def test_a_new_backend_is_a_row_and_plan_and_apply_call_its_behaviour(monkeypatch: pytest.MonkeyPatch) -> None:
    row = Backend("toy", "toy", upcast_allowed=True, flags=("is_toy_quantized",), behaviour=_ToyBehaviour())
    monkeypatch.setattr(kbitprep.backends, "BACKENDS", (*kbitprep.backends.BACKENDS, row))
    model = nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 4)).to(torch.float16)
    model.is_toy_quantized = True

    plan = plan_preparation(model, use_gradient_checkpointing=False)
    assert plan.detection.backend is row and len(plan.casts) == 3
    assert plan.codes == ("toy-backend-test",)
    assert plan.warnings == ("toy layers: 3 parameters, upcast=all, 3 casts",)
    assert plan.training_layout == ("1",) and "toy layout" in str(plan)
    assert not hasattr(model[1], "toy_training_layout")  # planning only reads
    with pytest.warns(KbitPrepWarning, match="toy layers") as caught:
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    assert [w.message.code for w in caught] == ["toy-backend-test"]
    assert model[1].toy_training_layout is True
    assert not hasattr(model[0], "toy_training_layout")


@pytest.mark.parametrize("module", ["plan", "apply"])
def test_plan_and_apply_never_name_a_backend(module: str) -> None:
    """Backend-specific code lives in kbitprep/backends/: plan and apply ask the detected row."""
    source = (pathlib.Path(kbitprep.__file__).parent / f"{module}.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    imported = {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    names |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    names |= {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    assert not [name for name in imported if "bitsandbytes" in name], imported
    assert not [name for name in names if "bnb" in name.lower() or "bitsandbytes" in name.lower()]
