"""FSDP-QLoRA: a prepared 4-bit model sharded across processes with PyTorch's FSDP2.

How a model gets onto N processes, each holding about 1/N of its parameter bytes::

    rank 0: load 4-bit (host) ─> prepare ─> LoRA ─> 4-bit layers as plain tensors ─┐ (the source)
    every rank: skeleton on meta ─> prepare ─> LoRA ─> same layers, shapes from rank 0
                 ─> fully_shard(each decoder layer), fully_shard(root) ─> empty local shards
    module by module, rank 0 scatters each parameter's rows (each rank gets only its own)
    and broadcasts each buffer, freeing each source tensor once sent  ──> sharded model

FSDP2 shards a parameter by `torch.chunk` on dim 0, which drops tensor subclasses such
as bitsandbytes' `Params4bit` (and its `quant_state`): the packed weight would reach the
forward pass as a bare tensor. So each `bnb.nn.Linear4bit` is swapped for a
`ShardableLinear4bit` whose packed bytes (uint8) and quantization statistics (absmax,
nested absmax) are ordinary parameters that FSDP shards like any other, and whose
forward rebuilds the `QuantState` from the gathered tensors. Because a unit mixes
dtypes (uint8, float32, bfloat16), FSDP2 all-gathers it as raw bytes: what a rank
computes with is bit-identical to the unsharded weights (the tests check the bytes).
Rank 0 also sends tensors as raw bytes, so no float normalisation can touch a packed
value on the way (bitsandbytes#1945).

Only rank 0 ever holds the whole model, and it frees each tensor once sent, so the
host never holds N copies while loading. The LoRA adapters stay trainable; the
adapter is gathered whole (`adapter_state`) for saving.
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ...errors import KbitPrepError
from ...plan import PreparationPlan

__all__ = [
    "FsdpError",
    "Packed4bitLayout",
    "ShardStats",
    "ShardableLinear4bit",
    "adapter_state",
    "load_sharded",
    "packed_4bit_bytes",
    "plan_for_sharding",
    "prepare_for_sharding",
    "send_rows",
    "shard_stats",
    "swap_4bit_layers",
    "training_device",
]


class FsdpError(KbitPrepError, RuntimeError):
    """The model cannot be sharded as asked; the message names the problem and the fix."""


# --- the 4-bit layer in a shardable form ------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Packed4bitLayout:
    """The non-tensor part of a bitsandbytes 4-bit layer, and the shapes of its tensors.

    Sent from rank 0, it lets a meta skeleton build the same `ShardableLinear4bit`.

    Args:
        shape (tuple[int, int]): the unpacked weight's shape (out_features, in_features).
        packed_bytes (int): bytes of the packed weight.
        quant_type (str): "nf4" or "fp4".
        blocksize (int): values per absmax block.
        dtype (str): the dtype the weight dequantizes to.
        compute_dtype (str | None): the layer's compute dtype.
        absmax (tuple[tuple[int, ...], str]): shape and dtype of absmax.
        code (tuple[int, ...]): shape of the quantization map.
        nested (tuple | None): for double quantization: blocksize, dtype, absmax shape, code shape.
    """

    shape: tuple[int, int]
    packed_bytes: int
    quant_type: str
    blocksize: int
    dtype: str
    compute_dtype: str | None
    absmax: tuple[tuple[int, ...], str]
    code: tuple[int, ...]
    nested: tuple[int, str, tuple[int, ...], tuple[int, ...]] | None

    @classmethod
    def of(cls, layer: Any) -> Packed4bitLayout:  # a bnb.nn.Linear4bit (bitsandbytes ships no types)
        """The layout of a quantized `bnb.nn.Linear4bit`."""
        state = layer.weight.quant_state
        nested = None
        if state.nested:
            nested = (state.state2.blocksize, _name(state.state2.dtype), tuple(state.state2.absmax.shape),
                      tuple(state.state2.code.shape))
        return cls(shape=tuple(state.shape), packed_bytes=layer.weight.numel() * layer.weight.element_size(),
                   quant_type=state.quant_type, blocksize=state.blocksize, dtype=_name(state.dtype),
                   compute_dtype=_name(layer.compute_dtype) if layer.compute_dtype is not None else None,
                   absmax=(tuple(state.absmax.shape), _name(state.absmax.dtype)), code=tuple(state.code.shape),
                   nested=nested)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


class ShardableLinear4bit(nn.Module):
    """A bitsandbytes 4-bit linear layer whose packed bytes and statistics are plain parameters.

    `weight` holds the packed 4-bit values as a 1-D uint8 tensor, `absmax` (and, with
    double quantization, `nested_absmax`) the block scales: FSDP shards all three
    like any parameter. The small code tables and offset stay whole, as buffers. The
    forward pass computes exactly what `bnb.nn.Linear4bit` computes with the same bytes.
    """

    def __init__(self, layout: Packed4bitLayout, bias: nn.Parameter | None, device: Any = "meta") -> None:
        super().__init__()
        self.layout = layout
        self.in_features, self.out_features = layout.shape[1], layout.shape[0]
        self.weight = _frozen(torch.empty(layout.packed_bytes, dtype=torch.uint8, device=device))
        self.absmax = _frozen(torch.empty(layout.absmax[0], dtype=_dtype(layout.absmax[1]), device=device))
        self.register_buffer("code", torch.empty(layout.code, dtype=torch.float32, device=device))
        self.bias = bias
        if layout.nested is not None:
            _, nested_dtype, nested_absmax, nested_code = layout.nested
            self.nested_absmax = _frozen(torch.empty(nested_absmax, dtype=_dtype(nested_dtype), device=device))
            self.register_buffer("nested_code", torch.empty(nested_code, dtype=torch.float32, device=device))
            self.register_buffer("offset", torch.empty((), dtype=torch.float32, device=device))

    @classmethod
    def from_linear4bit(cls, layer: Any) -> ShardableLinear4bit:  # layer: a bnb.nn.Linear4bit
        """The same layer, sharing its tensors (no copy)."""
        layout = Packed4bitLayout.of(layer)
        state = layer.weight.quant_state
        module = cls(layout, layer.bias, device="meta")
        module.weight = _frozen(layer.weight.data.view(torch.uint8).reshape(-1))
        module.absmax = _frozen(state.absmax)
        module.code = state.code
        if layout.nested is not None:
            module.nested_absmax = _frozen(state.state2.absmax)
            module.nested_code = state.state2.code
            module.offset = state.offset.reshape(())
        return module

    def quant_state(self):
        """The bitsandbytes `QuantState` over this module's current (gathered) tensors."""
        from bitsandbytes.functional import QuantState

        layout = self.layout
        nested = None
        if layout.nested is not None:
            nested = QuantState(absmax=self.nested_absmax, code=self.nested_code, blocksize=layout.nested[0],
                                dtype=_dtype(layout.nested[1]))
        return QuantState(absmax=self.absmax, shape=torch.Size(layout.shape), code=self.code,
                          blocksize=layout.blocksize, quant_type=layout.quant_type, dtype=_dtype(layout.dtype),
                          offset=self.offset if nested is not None else None, state2=nested)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        input_dtype = x.dtype
        compute = _dtype(self.layout.compute_dtype) if self.layout.compute_dtype else x.dtype
        bias = self.bias.to(compute) if self.bias is not None else None
        # The packed bytes as bitsandbytes stores them: a column of (N*K+1)//2 bytes.
        packed = self.weight.view(-1, 1)
        return bnb.matmul_4bit(x.to(compute), packed, bias=bias, quant_state=self.quant_state()).to(input_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"quant_type={self.layout.quant_type}, bias={self.bias is not None}")


def swap_4bit_layers(model: nn.Module,
                     layouts: dict[str, Packed4bitLayout] | None = None) -> dict[str, Packed4bitLayout]:
    """Replace every `bnb.nn.Linear4bit` in `model` by a `ShardableLinear4bit`, in place.

    Args:
        model (nn.Module): the model (LoRA wrappers keep their base layer's new class).
        layouts (dict | None): name -> layout, for a meta skeleton whose layers hold no
            quantization state; None takes each layer's own. Default: None

    Returns:
        dict[str, Packed4bitLayout]: the layout of each swapped layer, by module name.

    Raises:
        FsdpError: a 4-bit layer holds no quantized weight, or `layouts` names other layers.
    """
    import bitsandbytes as bnb

    found = [(name, module) for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)]
    if layouts is not None and sorted(layouts) != sorted(name for name, _ in found):
        raise FsdpError("this process built a model with other 4-bit layers than rank 0 loaded; "
                        "every process must run the same kbitprep, transformers and bitsandbytes")
    swapped: dict[str, Packed4bitLayout] = {}
    for name, layer in found:
        if layouts is not None:
            new = ShardableLinear4bit(layouts[name], layer.bias, device="meta")
        elif getattr(layer.weight, "quant_state", None) is None:
            raise FsdpError(f"{name}: a bitsandbytes 4-bit layer with no quantized weight cannot be sharded; "
                            f"keep it out of quantization (BitsAndBytesConfig(llm_int8_skip_modules=[...]))")
        else:
            new = ShardableLinear4bit.from_linear4bit(layer)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, new)
        swapped[name] = new.layout
    return swapped


def packed_4bit_bytes(model: nn.Module) -> dict[str, bytes]:
    """Each `ShardableLinear4bit`'s packed weight and absmax bytes as this process holds them now.

    Called inside a forward (or on an unsharded model) it gives the bytes the layer computes with.
    """
    return {name: _local(module.weight).numpy().tobytes() + _local(module.absmax).view(-1).view(torch.uint8).numpy()
            .tobytes() for name, module in model.named_modules() if isinstance(module, ShardableLinear4bit)}


def _local(tensor: torch.Tensor) -> torch.Tensor:
    to_local = getattr(tensor, "to_local", None)
    return (to_local() if to_local is not None else tensor).detach().cpu().clone()  # a copy: numpy pins storage


# --- sharding -------------------------------------------------------------------------


def _shard(model: nn.Module, mesh: Any) -> None:
    from torch.distributed.fsdp import fully_shard

    from ...sharding import sharding_units

    for unit in sharding_units(model):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)


# --- loading: rank 0 reads, every rank keeps its shard --------------------------------


def plan_for_sharding(model: nn.Module, *, upcast: str) -> PreparationPlan:
    """kbitprep's preparation plan as a sharded run needs it (pure: nothing changes).

    Checkpointing is non-reentrant: FSDP2 gathers a unit again when the backward pass
    recomputes its forward, through the module hooks that reentrant checkpointing hides
    from autograd. A meta skeleton is planned like the loaded model, less its "weights
    never loaded" error (that is what a skeleton is), so both end up with the same structure.
    """
    from ...plan import META_DEVICE, plan_preparation

    plan = plan_preparation(model, upcast=upcast, gradient_checkpointing_kwargs={"use_reentrant": False})
    return dataclasses.replace(plan, diagnostics=tuple(d for d in plan.diagnostics if d.code != META_DEVICE.code))


def prepare_for_sharding(model: nn.Module, *, upcast: str) -> PreparationPlan:
    """Apply `plan_for_sharding`'s plan to `model` (for a caller without a run); returns the plan."""
    from ...apply import apply_plan

    plan = plan_for_sharding(model, upcast=upcast)
    apply_plan(model, plan)
    return plan


def _own_tensor_attributes(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Tensors a module keeps as plain attributes (neither parameter nor buffer), e.g. rotary caches."""
    return [(key, value) for key, value in vars(module).items()
            if isinstance(value, torch.Tensor) and not key.startswith("_")]


def _tensor_attributes(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    for module_name, module in model.named_modules():
        for key, _ in _own_tensor_attributes(module):
            yield (f"{module_name}.{key}" if module_name else key), module, key


def _manifest(model: nn.Module) -> list[tuple[str, str, tuple[int, ...], str, bool]]:
    """(kind, name, shape, dtype, requires_grad) of every tensor a process must receive."""
    rows = [("param", name, tuple(p.shape), _name(p.dtype), p.requires_grad) for name, p in model.named_parameters()]
    rows += [("buffer", name, tuple(b.shape), _name(b.dtype), False) for name, b in model.named_buffers()]
    rows += [("attr", name, tuple(getattr(m, key).shape), _name(getattr(m, key).dtype), False)
             for name, m, key in _tensor_attributes(model)]
    return rows


def _send_bytes(tensor: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    """Broadcast one tensor from rank 0 as raw bytes (exact for every dtype); every rank gets it whole."""
    numel = int(torch.Size(shape).numel())
    if tensor is not None:
        flat = tensor.detach().reshape(-1).to(device).contiguous()
        wire = flat.view(torch.uint8) if numel else torch.empty(0, dtype=torch.uint8, device=device)
    else:
        wire = torch.empty(numel * dtype.itemsize, dtype=torch.uint8, device=device)
    if wire.numel():
        dist.broadcast(wire, src=0)
    return wire.view(dtype).reshape(shape) if numel else torch.empty(shape, dtype=dtype, device=device)


def send_rows(tensor: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
    """Scatter one parameter from rank 0 as raw bytes: each rank receives only its own rows.

    The rows are FSDP2's split (`torch.chunk` on dim 0, empty chunks at the end), so no
    rank ever holds more of a parameter than its shard.
    """
    from ...sharding import chunk_rows

    rank, world = dist.get_rank(), dist.get_world_size()
    if not shape:  # a 0-d parameter: FSDP2 keeps it on the first rank
        whole = _send_bytes(tensor, shape, dtype, device)
        return whole.reshape(1) if rank == 0 else whole.reshape(1)[:0]
    rows = chunk_rows(shape[0], world)
    row_bytes = math.prod(shape[1:]) * dtype.itemsize
    size = rows[0] * row_bytes  # the first chunk is the largest
    received = torch.empty(size, dtype=torch.uint8, device=device)
    if size:
        parts = _split_rows(tensor, rows, row_bytes, size, device) if tensor is not None else None
        dist.scatter(received, parts, src=0)
    mine = received[:rows[rank] * row_bytes]
    return mine.view(dtype).reshape(rows[rank], *shape[1:]) if mine.numel() else \
        torch.empty((0, *shape[1:]), dtype=dtype, device=device)


def _split_rows(tensor: torch.Tensor, rows: list[int], row_bytes: int, size: int,
                device: torch.device) -> list[torch.Tensor]:
    """Rank 0's tensor as one equal-sized byte block per rank (the short last blocks zero-padded)."""
    flat = tensor.detach().reshape(-1).to(device).contiguous().view(torch.uint8)
    parts, start = [], 0
    for count in rows:
        part = flat[start:start + count * row_bytes]
        start += count * row_bytes
        parts.append(part if part.numel() == size else torch.cat([part, part.new_zeros(size - part.numel())]))
    return parts


def _post_order(module: nn.Module, name: str = "", seen: set[int] | None = None) -> Iterator[tuple[str, nn.Module]]:
    """(name, module), children before their parent, each module once."""
    seen = set() if seen is None else seen
    for child_name, child in module.named_children():
        if id(child) not in seen:
            yield from _post_order(child, f"{name}.{child_name}" if name else child_name, seen)
    seen.add(id(module))
    yield name, module


def _receive(model: nn.Module, source: nn.Module | None, device: torch.device) -> None:
    """Materialise the sharded `model` module by module and fill it from rank 0's `source`.

    Each module gets its storage only when its turn comes (children before the FSDP unit
    that owns them, so FSDP re-pads complete shards), and rank 0 frees each source tensor
    once sent: rank 0 holds about one model plus one module, the others their shards.
    """
    done: set[int] = set()
    for name, module in _post_order(model):
        module.to_empty(device=device, recurse=False)
        origin = source.get_submodule(name) if source is not None else None
        for key, param in module.named_parameters(recurse=False):
            if id(param) in done:  # a tied parameter, filled where it was met first
                continue
            done.add(id(param))
            sent = getattr(origin, key) if origin is not None else None
            mine = send_rows(sent, tuple(param.shape), param.dtype, device)  # a DTensor's shape is the whole one
            with torch.no_grad():
                _local_view(param).copy_(mine.reshape(_local_view(param).shape))
            if sent is not None:
                sent.data = torch.empty(0, dtype=sent.dtype)  # free rank 0's copy now
        for key, buffer in module.named_buffers(recurse=False):
            with torch.no_grad():
                buffer.copy_(_send_bytes(getattr(origin, key) if origin is not None else None, tuple(buffer.shape),
                                         buffer.dtype, device))
        for key, value in _own_tensor_attributes(module):
            sent = getattr(origin, key) if origin is not None else None
            setattr(module, key, _send_bytes(sent, tuple(value.shape), value.dtype, device))


def _local_view(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if hasattr(param, "to_local") else param.data


def load_sharded(
    load: Callable[[], nn.Module],
    skeleton: Callable[[], nn.Module],
    build: Callable[[nn.Module], nn.Module],
    *,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Load a 4-bit model on rank 0 and shard it over every process with FSDP2.

    Args:
        load (Callable[[], nn.Module]): loads the real model; called on rank 0 only.
        skeleton (Callable[[], nn.Module]): builds the same model on the meta device
            (e.g. `kbitprep.sizing.build_meta_model`); called on every rank.
        build (Callable[[nn.Module], nn.Module]): prepares a model and attaches the adapters
            (the same function the one-process run uses); applied to both, so both match.
        device (torch.device | str | None): where the shards live; None: this rank's
            CUDA device when there is one, else the CPU. Default: None

    Returns:
        nn.Module: the model, sharded (decoder blocks and root), in training mode.

    Raises:
        FsdpError: torch.distributed is not initialised, or the processes built different models.

    Example:
        >>> model = load_sharded(lambda: load_quantized_model(path, "nf4"),
        ...                      lambda: build_meta_model(path, quantize="nf4"), prepare_and_add_lora)
    """
    from torch.distributed.device_mesh import init_device_mesh

    if not (dist.is_available() and dist.is_initialized()):
        raise FsdpError("--fsdp needs torch.distributed: start the command with "
                        "`torchrun --nproc_per_node N -m kbitprep finetune ... --fsdp`")
    device = torch.device(device) if device is not None else training_device()
    source = _build_source(load, build) if dist.get_rank() == 0 else None
    shared: list[Any] = [source[1] if source is not None else None]
    dist.broadcast_object_list(shared, src=0)
    layouts, manifest = shared[0]
    model = build(skeleton())
    swap_4bit_layers(model, layouts)
    _check_same_model(model, manifest)
    _shard(model, init_device_mesh(device.type, (dist.get_world_size(),)))
    _receive(model, source[0] if source is not None else None, device)
    del source
    model.train()
    return model


def _build_source(load: Callable[[], nn.Module], build: Callable[[nn.Module], nn.Module]) -> tuple[Any, Any]:
    model = build(load())
    layouts = swap_4bit_layers(model)
    return model, (layouts, _manifest(model))


def _check_same_model(model: nn.Module, manifest: list) -> None:
    mine = _manifest(model)
    if mine != manifest:
        padded = max(len(mine), len(manifest))
        first = next((a, b) for a, b in zip(mine + [None] * (padded - len(mine)),
                                            manifest + [None] * (padded - len(manifest)), strict=True) if a != b)
        raise FsdpError(f"this process built a different model than rank 0 loaded (first difference: {first[0]} "
                        f"here, {first[1]} on rank 0); every process must run the same model folder and versions")


def training_device() -> torch.device:
    """Where this process's shards live: its accelerator (by LOCAL_RANK) when there is one, else the CPU."""
    from ...device import accelerator

    found = accelerator()  # one device per process: this one's index is its rank on the node
    return torch.device(found.type, int(os.environ.get("LOCAL_RANK", "0"))) if found is not None else \
        torch.device("cpu")


# --- what each process holds ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShardStats:
    """Bytes of a sharded model on one process.

    Args:
        rank (int): the process.
        local_parameter_bytes (int): bytes of this process's parameter shards.
        full_parameter_bytes (int): bytes of all parameters, unsharded.
        buffer_bytes (int): bytes of buffers (kept whole on every process).
        peak_rss_bytes (int): this process's peak resident host memory so far.
    """

    rank: int
    local_parameter_bytes: int
    full_parameter_bytes: int
    buffer_bytes: int
    peak_rss_bytes: int

    @property
    def fraction(self) -> float:
        """The share of the parameter bytes this process holds."""
        return self.local_parameter_bytes / self.full_parameter_bytes if self.full_parameter_bytes else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "fraction": round(self.fraction, 4)}


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def shard_stats(model: nn.Module) -> ShardStats:
    """What this process holds of `model` (sharded or not)."""

    local = full = 0
    for param in model.parameters():
        full += param.numel() * param.element_size()
        local += _local(param).numel() * param.element_size() if hasattr(param, "to_local") else \
            param.numel() * param.element_size()
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return ShardStats(rank, local, full, buffers, peak_rss_bytes())


# --- the adapter, gathered -------------------------------------------------------------


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter, whole, on the CPU: a collective, so every process must call it.

    Returns:
        dict[str, torch.Tensor]: name (as `model.named_parameters()` gives it) -> tensor.
    """
    state = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            full = param.full_tensor() if hasattr(param, "full_tensor") else param
            state[name] = full.detach().cpu().clone()
    return state
