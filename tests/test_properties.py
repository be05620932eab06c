"""Property-based tests of planning and preparing, over randomly generated module trees.

hypothesis draws a tree as plain data (a `Leaf` or a container of subtrees), so failures
shrink to a small readable example; `build` turns it into modules with seeded weights.
Trees mix nested Sequential/ModuleList/ModuleDict containers, Linear, LayerNorm,
Embedding, a custom RMSNorm and a norm look-alike, fp32/fp16/bf16 weights, integer and
half-precision buffers, integer parameters, tied parameters, a submodule shared by two
parents, two tensor subclasses kbitprep has never seen (a plain one and a wrapper that
packs int8 data and scales, like quanto's), and bitsandbytes 4-bit layers.

For every upcast policy:
- planning never mutates the model;
- preparing twice leaves the model exactly as preparing once;
- only plain floating tensors are ever cast, and exactly those the policy names;
- the plan's bytes before and after equal the bytes measured here, independently.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Union

import bitsandbytes as bnb
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from kbitprep import KbitPrepWarning, plan_preparation, prepare_model_for_kbit_training

POLICIES = ("all", "norms", "none")
HALF = (torch.float16, torch.bfloat16)
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# Test-only modules and tensor subclasses


class TagTensor(torch.Tensor):
    """A tensor subclass no backend claims (same storage as a plain tensor)."""


class PackedTensor(torch.Tensor):
    """A wrapper subclass, like quanto's: reports a float dtype, stores int8 data plus scales."""

    @staticmethod
    def __new__(cls, qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> PackedTensor:
        return torch.Tensor._make_wrapper_subclass(cls, qdata.shape, dtype=dtype, device=qdata.device)

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
        self.qdata = qdata
        self.scale = scale

    def __tensor_flatten__(self) -> tuple[list[str], torch.dtype]:
        return ["qdata", "scale"], self.dtype

    @staticmethod
    def __tensor_unflatten__(inner: dict, dtype: torch.dtype, outer_size: Any, outer_stride: Any) -> PackedTensor:
        return PackedTensor(inner["qdata"], inner["scale"], dtype)

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func in (torch.ops.aten.detach.default, torch.ops.aten.alias.default):  # nn.Parameter() detaches
            packed = args[0]
            return PackedTensor(func(packed.qdata), func(packed.scale), packed.dtype)
        # Anything else, a cast above all, would be a bug in kbitprep: fail loudly.
        raise NotImplementedError(f"PackedTensor does not support {func}")


class TinyRMSNorm(nn.Module):
    """A model-specific norm class, recognised by name and 1-D parameters (like LlamaRMSNorm)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))


class NormHead(nn.Module):
    """Says "Norm" but holds a 2-D weight (like Baichuan's NormHead): not a norm layer."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, size))


class Holder(nn.Module):
    """Holds tensors as given: tied parameters, subclass parameters, integer parameters, buffers."""


NORM_KINDS = ("layernorm", "rmsnorm")


# ---------------------------------------------------------------------------------------------
# Trees as data


@dataclasses.dataclass(frozen=True)
class Leaf:
    kind: str  # linear, layernorm, rmsnorm, normhead, embedding, buffers, int_param, tag, packed, bnb4, tie, share
    size: int
    dtype: torch.dtype
    flag: bool  # bias / elementwise affine / ... depending on kind
    pick: int  # which earlier parameter a "tie" reuses, or earlier module a "share" reuses


@dataclasses.dataclass(frozen=True)
class Container:
    kind: str  # sequential, modulelist, moduledict
    children: tuple[Tree, ...]


Tree = Union[Leaf, Container]

LEAF_KINDS = ("linear", "linear", "layernorm", "rmsnorm", "normhead", "embedding", "buffers", "int_param",
              "tag", "packed", "bnb4", "bnb4", "tie", "tie", "share")

leaves = st.builds(Leaf, kind=st.sampled_from(LEAF_KINDS), size=st.sampled_from((8, 16, 24)),
                   dtype=st.sampled_from(FLOATS), flag=st.booleans(), pick=st.integers(0, 50))

def containers(children: st.SearchStrategy[Tree], min_size: int = 1) -> st.SearchStrategy[Container]:
    return st.builds(Container, kind=st.sampled_from(("sequential", "modulelist", "moduledict")),
                     children=st.lists(children, min_size=min_size, max_size=5).map(tuple))


# A container at the top, so most trees hold several leaves at more than one depth.
trees = containers(st.recursive(leaves, containers, max_leaves=8), min_size=2)


@dataclasses.dataclass
class Built:
    """A generated model plus what the generator knows about it."""

    model: nn.Module
    norm_params: set[int] = dataclasses.field(default_factory=set)  # ids of parameters owned by norm layers


def build(tree: Tree, seed: int = 0) -> Built:
    torch.manual_seed(seed)
    built = Built(nn.Module())
    made: list[nn.Module] = []
    params: list[nn.Parameter] = []
    built.model.body = _build(tree, built, made, params)
    return built


def _build(tree: Tree, built: Built, made: list[nn.Module], params: list[nn.Parameter]) -> nn.Module:
    if isinstance(tree, Container):
        children = [_build(child, built, made, params) for child in tree.children]
        if tree.kind == "sequential":
            return nn.Sequential(*children)
        if tree.kind == "modulelist":
            return nn.ModuleList(children)
        return nn.ModuleDict({f"c{i}": child for i, child in enumerate(children)})
    module = _leaf(tree, params, made)
    if tree.kind in NORM_KINDS:
        built.norm_params |= {id(p) for p in module.parameters()}
    made.append(module)
    params.extend(p for p in module.parameters(recurse=False) if all(p is not q for q in params))
    return module


def _leaf(leaf: Leaf, params: list[nn.Parameter], made: list[nn.Module]) -> nn.Module:
    size, dtype = leaf.size, leaf.dtype
    if leaf.kind == "linear":
        return nn.Linear(size, 8, bias=leaf.flag).to(dtype)
    if leaf.kind == "layernorm":
        return nn.LayerNorm(size, elementwise_affine=True, bias=leaf.flag).to(dtype)
    if leaf.kind == "rmsnorm":
        return TinyRMSNorm(size).to(dtype)
    if leaf.kind == "normhead":
        return NormHead(size).to(dtype)
    if leaf.kind == "embedding":
        return nn.Embedding(size, 8).to(dtype)
    holder = Holder()
    if leaf.kind == "buffers":  # buffers are never cast, whatever their dtype
        holder.register_buffer("positions", torch.arange(size, dtype=torch.int64))
        holder.register_buffer("mask", torch.ones(size, dtype=torch.bool))
        holder.register_buffer("scale", torch.randn(size).to(dtype))
    elif leaf.kind == "int_param":
        holder.codes = nn.Parameter(torch.randint(-8, 8, (size,), dtype=torch.int8), requires_grad=False)
    elif leaf.kind == "tag":
        holder.weight = nn.Parameter(torch.randn(size).to(dtype).as_subclass(TagTensor), requires_grad=leaf.flag)
    elif leaf.kind == "packed":
        qdata = torch.randint(-128, 128, (size, 4), dtype=torch.int8)
        holder.weight = nn.Parameter(PackedTensor(qdata, torch.rand(size).to(dtype), dtype), requires_grad=False)
    elif leaf.kind == "bnb4":
        layer = bnb.nn.Linear4bit(size, 8, bias=leaf.flag, compute_dtype=torch.float16).to("cpu")  # .to quantizes
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias.detach().to(dtype))
        return layer
    elif leaf.kind == "tie" and params:  # reuse an earlier parameter object: tied weights
        holder.tied = params[leaf.pick % len(params)]
    elif leaf.kind == "share" and made:  # reuse an earlier module: one submodule under two parents
        return made[leaf.pick % len(made)]
    return holder


# ---------------------------------------------------------------------------------------------
# Observations, made here without kbitprep's helpers


def unique_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer once, however many modules hold it."""
    found: dict[int, torch.Tensor] = {}
    for _, tensor in model.named_parameters(remove_duplicate=False):
        found.setdefault(id(tensor), tensor)
    for _, tensor in model.named_buffers(remove_duplicate=False):
        found.setdefault(id(tensor), tensor)
    return list(found.values())


def measured_bytes(model: nn.Module) -> int:
    total = 0
    for tensor in unique_tensors(model):
        if isinstance(tensor, PackedTensor):  # the bytes it stores, not the fp16 it pretends to be
            total += sum(inner.numel() * inner.element_size() for inner in (tensor.qdata, tensor.scale))
        else:
            total += tensor.numel() * tensor.element_size()
    return total


def storage(tensor: torch.Tensor) -> tuple:
    if isinstance(tensor, PackedTensor):
        return (tensor.qdata.data_ptr(), tensor.scale.data_ptr(), tensor.scale.dtype)
    return (tensor.data_ptr(),)


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Identity, type, dtype, grad flag, storage and values of every tensor, and every hook."""
    tensors = {}
    for kind, named in (("param", model.named_parameters(remove_duplicate=False)),
                        ("buffer", model.named_buffers(remove_duplicate=False))):
        for name, tensor in named:
            values = (tensor.qdata.clone(), tensor.scale.clone()) if isinstance(tensor, PackedTensor) \
                else (tensor.detach().as_subclass(torch.Tensor).clone(),)
            tensors[f"{kind}:{name}"] = (id(tensor), type(tensor), tensor.dtype, tensor.requires_grad,
                                         storage(tensor), values)
    hooks = {name: (tuple(module._forward_hooks), tuple(module._forward_pre_hooks))
             for name, module in model.named_modules(remove_duplicate=False)}
    return {"tensors": tensors, "hooks": hooks}


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["hooks"] == b["hooks"]
    assert a["tensors"].keys() == b["tensors"].keys()
    for key, (*meta_a, values_a) in a["tensors"].items():
        *meta_b, values_b = b["tensors"][key]
        assert meta_a == meta_b, key
        assert all(torch.equal(x, y) for x, y in zip(values_a, values_b)), key


def prepare(model: nn.Module, upcast: str) -> nn.Module:
    # Generated trees cannot checkpoint; plain ones are not quantized (NotQuantizedWarning, expected).
    assume(next(model.parameters(), None) is not None)  # else PreparationError, as test_bad_inputs checks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KbitPrepWarning)
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False, upcast=upcast)


def expected_casts(built: Built, upcast: str) -> set[int]:
    """Ids of the parameters that must go to float32, from what the generator knows."""
    tensors = unique_tensors(built.model)
    has_bnb = any(isinstance(t, bnb.nn.Params4bit) for t in tensors)
    has_unknown = any(isinstance(t, (TagTensor, PackedTensor)) for t in tensors)
    if upcast == "none" or (has_unknown and not has_bnb):  # an unknown backend keeps its own precision
        return set()
    return {id(p) for p in built.model.parameters()
            if type(p) is nn.Parameter and p.dtype in HALF and (upcast == "all" or id(p) in built.norm_params)}


# ---------------------------------------------------------------------------------------------
# Properties

policies = pytest.mark.parametrize("upcast", POLICIES)


@policies
@SETTINGS
@given(tree=trees)
def test_planning_never_mutates(tree: Tree, upcast: str) -> None:
    model = build(tree).model
    before = snapshot(model)
    plan = plan_preparation(model, use_gradient_checkpointing=False, upcast=upcast)
    str(plan), plan.to_dict()
    assert_same(snapshot(model), before)


@policies
@SETTINGS
@given(tree=trees)
def test_preparing_twice_equals_preparing_once(tree: Tree, upcast: str) -> None:
    model = prepare(build(tree).model, upcast)
    once = snapshot(model)
    assert plan_preparation(model, use_gradient_checkpointing=False, upcast=upcast).casts == ()
    prepare(model, upcast)
    assert_same(snapshot(model), once)
    assert not any(p.requires_grad for p in model.parameters())


@policies
@SETTINGS
@given(tree=trees)
def test_only_plain_floating_tensors_are_cast(tree: Tree, upcast: str) -> None:
    built = build(tree)
    model = built.model
    cast_ids = expected_casts(built, upcast)
    before = {id(t): (t, t.dtype, storage(t)) for t in unique_tensors(model)}

    plan = plan_preparation(model, use_gradient_checkpointing=False, upcast=upcast)
    prepare(model, upcast)

    names = {id(p): name for name, p in model.named_parameters()}
    assert {cast.name for cast in plan.casts} == {names[i] for i in cast_ids}
    after = {id(t): t for t in unique_tensors(model)}
    assert after.keys() == before.keys()  # no tensor replaced, none added, ties kept
    for key, (tensor, dtype, place) in before.items():
        assert after[key] is tensor
        if key in cast_ids:
            assert tensor.dtype is torch.float32
        else:  # subclasses, integer tensors, buffers, fp32 and uncast half tensors: untouched storage
            assert tensor.dtype is dtype and storage(tensor) == place, (type(tensor), dtype)


@policies
@SETTINGS
@given(tree=trees)
def test_byte_accounting_matches_measured_bytes(tree: Tree, upcast: str) -> None:
    model = build(tree).model
    plan = plan_preparation(model, use_gradient_checkpointing=False, upcast=upcast)
    assert plan.bytes_before == measured_bytes(model)

    prepare(model, upcast)

    assert plan.bytes_after == measured_bytes(model)
    assert plan.bytes_after - plan.bytes_before == sum(2 * cast.numel for cast in plan.casts)  # 2 more bytes a value
