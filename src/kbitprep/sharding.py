"""Sizing a sharded run: what each of N processes holds when FSDP shards a prepared model.

kbitprep's `finetune --fsdp` shards with PyTorch's FSDP2: one unit per decoder block
(the classes a transformers model lists in `_no_split_modules`) and one for the rest,
each parameter cut into N row-chunks by `torch.chunk` on dim 0. A bitsandbytes 4-bit
weight is sharded as its packed bytes, its absmax and (double quantization) its nested
absmax; its small code tables, and every buffer, stay whole on every process::

    parameter (rows x cols, dtype after preparation) ──chunk(N, dim 0)──> rank r: rows_r x cols
    Params4bit ──> packed uint8 (numel/2) + absmax (numel/64) [+ nested absmax] ──> the same

`plan_sharding` computes those bytes from the model as it is (the meta device is
fine, so a 70B model is sized from its config in seconds) and names, with a diagnostic
code, the combinations that break flattening or change numbers under the wrapper the run
will use.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .backends import is_plain_tensor
from .diagnostics import Diagnostic, error_code, warning_code
from .errors import InvalidArgumentError
from .plan import PreparationPlan, plan_preparation

__all__ = [
    "FLAT_FLOAT_STORAGE",
    "FLAT_INTEGER_STORAGE",
    "FLAT_MIXED_DTYPES",
    "TIED_ACROSS_UNITS",
    "UNSHARDABLE_QUANTIZED",
    "WRAPPERS",
    "ShardingPlan",
    "plan_sharding",
    "sharding_units",
]

# "fsdp2": PyTorch's fully_shard, as `kbitprep finetune --fsdp` runs it (units of any dtype mix,
# gathered as raw bytes). "fsdp1": wrappers that flatten each unit into one tensor
# (FullyShardedDataParallel, accelerate's and the Trainer's FSDP version 1).
WRAPPERS = ("fsdp2", "fsdp1")

UNSHARDABLE_QUANTIZED = error_code(
    "fsdp-unshardable-quantized", "quantized tensors that FSDP's torch.chunk would strip of their quantization state")
TIED_ACROSS_UNITS = warning_code("fsdp-tied-across-units", "a parameter is shared by two FSDP units")
FLAT_MIXED_DTYPES = warning_code(
    "fsdp-mixed-dtype-unit", "an FSDP unit mixes dtypes that a flat-parameter wrapper (FSDP1) cannot flatten")
FLAT_INTEGER_STORAGE = warning_code(
    "fsdp-integer-storage", "uint8 4-bit storage, which a flat-parameter wrapper (FSDP1) cannot flatten")
FLAT_FLOAT_STORAGE = warning_code(
    "fsdp-float-storage", "4-bit bytes stored in a float dtype, which a cast or float copy can silently change")

_BNB_4BIT_BLOCKSIZE = 64  # bitsandbytes' 4-bit block size on CPU and CUDA
_NESTED_BLOCKSIZE = 256


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """The bytes each process holds once the prepared model is sharded.

    Args:
        processes (int): N, the number of processes.
        wrapper (str): "fsdp2" or "fsdp1".
        units (int): FSDP units (decoder blocks, plus the root).
        parameter_bytes (int): parameter bytes of the prepared model, unsharded.
        per_process (tuple[int, ...]): parameter bytes that process 0..N-1 holds.
        replicated_bytes (int): bytes every process holds whole (buffers, 4-bit code tables).
        diagnostics (tuple[Diagnostic, ...]): what breaks or changes numbers, each with its
            code and the fix (docs/diagnostics.md).
    """

    processes: int
    wrapper: str
    units: int
    parameter_bytes: int
    per_process: tuple[int, ...]
    replicated_bytes: int
    diagnostics: tuple[Diagnostic, ...] = ()

    @property
    def largest_share(self) -> int:
        """Parameter bytes on the most loaded process."""
        return max(self.per_process)

    @property
    def ratio(self) -> float:
        """The most loaded process's share of the unsharded parameter bytes."""
        return self.largest_share / self.parameter_bytes if self.parameter_bytes else 0.0

    @property
    def codes(self) -> tuple[str, ...]:
        return tuple(d.code for d in self.diagnostics)

    def to_dict(self) -> dict[str, Any]:
        return {"processes": self.processes, "wrapper": self.wrapper, "units": self.units,
                "parameter_bytes": self.parameter_bytes, "per_process": list(self.per_process),
                "largest_share": self.largest_share, "ratio": round(self.ratio, 4),
                "replicated_bytes": self.replicated_bytes, "diagnostics": [d.to_dict() for d in self.diagnostics]}


def sharding_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards one by one: the decoder (or encoder) blocks.

    transformers names them in each model class's `_no_split_modules` (the blocks that
    `device_map` never splits); a model without that list falls back to the items of its
    longest `nn.ModuleList`. Only the outermost match counts (a block inside a block is
    part of its parent's unit).
    """
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    units: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if type(module).__name__ in names:
            units.append(module)
            inside.update(id(child) for child in module.modules())
    if units:
        return units
    lists: list[nn.ModuleList] = [module for module in model.modules() if isinstance(module, nn.ModuleList)]
    return list(max(lists, key=lambda items: sum(1 for _ in items))) if lists else []


def chunk_rows(rows: int, processes: int) -> list[int]:
    """Rows of a dim-0 size that each process gets from `torch.chunk` (empty chunks at the end)."""
    if rows == 0:
        return [0] * processes
    size = math.ceil(rows / processes)
    return [max(0, min(size, rows - rank * size)) for rank in range(processes)]


def _shares(shape: tuple[int, ...], itemsize: int, processes: int) -> list[int]:
    """Bytes of a parameter of `shape` on each process."""
    if not shape:  # a 0-d parameter is sharded as one row
        return [itemsize if rank == 0 else 0 for rank in range(processes)]
    row = math.prod(shape[1:]) * itemsize
    return [rows * row for rows in chunk_rows(shape[0], processes)]


def _four_bit_tensors(param: torch.Tensor, model: nn.Module) -> tuple[list[tuple[tuple[int, ...], int]], int]:
    """A 4-bit weight as kbitprep shards it: ([(shape, itemsize) of each sharded tensor], replicated bytes)."""
    packed = param.numel() * param.element_size()
    state: Any = getattr(param, "quant_state")  # noqa: B009 - a bitsandbytes attribute torch does not declare
    if state.absmax is not None and state.absmax.numel():  # a real load: read the tensors
        sharded = [((packed,), 1), (tuple(state.absmax.shape), state.absmax.element_size())]
        replicated = state.code.numel() * state.code.element_size()
        if state.nested:
            sharded.append((tuple(state.state2.absmax.shape), state.state2.absmax.element_size()))
            replicated += state.state2.code.numel() * state.state2.code.element_size() + 4
        return sharded, replicated
    # A meta skeleton: bitsandbytes' layout for this many values.
    blocks = math.ceil(math.prod(state.shape) / (getattr(state, "blocksize", None) or _BNB_4BIT_BLOCKSIZE))
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    nested = bool(getattr(config, "bnb_4bit_use_double_quant", False))
    if not nested:
        return [((packed,), 1), ((blocks,), 4)], 16 * 4
    return [((packed,), 1), ((blocks,), 1), ((math.ceil(blocks / _NESTED_BLOCKSIZE),), 4)], 16 * 4 + 256 * 4 + 4


def _owned(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, nn.Module]]:
    seen: dict[int, str] = {}
    for module_name, module in model.named_modules():
        for local, param in module.named_parameters(recurse=False):
            if id(param) not in seen:
                seen[id(param)] = f"{module_name}.{local}" if module_name else local
                yield seen[id(param)], param, module


def _unit_of(model: nn.Module, units: list[nn.Module]) -> dict[int, int]:
    """id(parameter) -> index of its unit (len(units) for the root)."""
    owner: dict[int, int] = {}
    for index, unit in enumerate(units):
        for param in unit.parameters():
            owner.setdefault(id(param), index)
    for param in model.parameters():
        owner.setdefault(id(param), len(units))
    return owner


def plan_sharding(model: nn.Module, processes: int, *, plan: PreparationPlan | None = None,
                  upcast: str = "norms", wrapper: str = "fsdp2") -> ShardingPlan:
    """Plan how FSDP shards the prepared `model` over `processes` processes, changing nothing.

    Args:
        model (nn.Module): the model as loaded (before preparation); the meta device is fine.
        processes (int): N, the number of processes (1 or more).
        plan (PreparationPlan | None): the preparation; None plans one with `upcast`. Default: None
        upcast (str): the upcast policy when `plan` is None. Default: "norms"
        wrapper (str): "fsdp2" (kbitprep's --fsdp) or "fsdp1" (flat-parameter wrappers). Default: "fsdp2"

    Returns:
        ShardingPlan: bytes per process and the diagnostics.

    Raises:
        InvalidArgumentError: `processes` is below 1, or `wrapper` is not one of `WRAPPERS` (a ValueError).

    Example:
        >>> plan_sharding(build_meta_model("llama-3-70b"), 2).per_process
        (20_352_000_000, 20_352_000_000)
    """
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise InvalidArgumentError(f"processes must be a whole number >= 1, not {processes!r}")
    if wrapper not in WRAPPERS:
        raise InvalidArgumentError(f"wrapper must be one of {', '.join(WRAPPERS)}, not {wrapper!r}")
    plan = plan or plan_preparation(model, upcast=upcast)
    cast_to = {cast.name: cast.to_dtype for cast in plan.casts}
    units = sharding_units(model)
    per_process = [0] * processes
    whole = replicated = 0
    for name, param, _ in _owned(model):
        if getattr(param, "quant_state", None) is not None:
            tensors, extra = _four_bit_tensors(param, model)
            replicated += extra
        else:
            tensors = [(tuple(param.shape), cast_to.get(name, param.dtype).itemsize)]
        for shape, itemsize in tensors:
            shares = _shares(shape, itemsize, processes)
            whole += sum(shares)
            per_process = [a + b for a, b in zip(per_process, shares, strict=True)]
    replicated += sum(b.numel() * b.element_size() for b in model.buffers())
    return ShardingPlan(processes, wrapper, len(units) + 1, whole, tuple(per_process), replicated,
                        tuple(_diagnostics(model, units, cast_to, wrapper)))


def _diagnostics(model: nn.Module, units: list[nn.Module], cast_to: dict[str, torch.dtype],
             wrapper: str) -> list[Diagnostic]:
    found: list[Diagnostic] = []
    owned = list(_owned(model))
    unshardable = [(name, type(p)) for name, p, _ in owned
                   if not is_plain_tensor(p) and getattr(p, "quant_state", None) is None]
    if unshardable:
        name, cls = unshardable[0]
        found.append(UNSHARDABLE_QUANTIZED(
            f"{len(unshardable)} quantized parameter(s) (first: {name}, a {cls.__name__}) cannot be sharded: FSDP "
            "cuts parameters with torch.chunk, which returns plain tensors without their quantization state "
            "(bitsandbytes#1424). kbitprep shards bitsandbytes 4-bit weights only: load with --quantize nf4 or fp4."))
    found += _tied_across_units(model, units)
    if wrapper == "fsdp1":
        found += _flat_parameter_diagnostics(model, units, cast_to, owned)
    return found


def _tied_across_units(model: nn.Module, units: list[nn.Module]) -> list[Diagnostic]:
    unit_of_module = {id(child): index for index, unit in enumerate(units) for child in unit.modules()}
    users: dict[int, set[int]] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            users.setdefault(id(param), set()).add(unit_of_module.get(id(module), len(units)))
    crossing = {pid for pid, where in users.items() if len(where) > 1}
    name = next((n for n, p in model.named_parameters() if id(p) in crossing), None)
    if name is None:
        return []
    return [TIED_ACROSS_UNITS(
        f"{name} is shared by modules in different FSDP units, which FSDP cannot shard. "
        "Untie it (tie_word_embeddings=False) or keep every user of it in one unit.")]


def _flat_parameter_diagnostics(model: nn.Module, units: list[nn.Module], cast_to: dict[str, torch.dtype],
                            owned: list) -> list[Diagnostic]:
    """What flat-parameter wrappers (FSDP1) cannot do: mixed dtypes in a unit, integer storage."""
    found: list[Diagnostic] = []
    unit_of = _unit_of(model, units)
    dtypes: dict[int, set[torch.dtype]] = {}
    for name, param, _ in owned:
        dtypes.setdefault(unit_of[id(param)], set()).add(cast_to.get(name, param.dtype))
    mixed = sorted(index for index, kinds in dtypes.items() if len({d for d in kinds if d.is_floating_point}) > 1)
    if mixed:
        kinds = sorted(str(d).removeprefix("torch.") for d in dtypes[mixed[0]])
        found.append(FLAT_MIXED_DTYPES(
            f"{len(mixed)} FSDP unit(s) mix {', '.join(kinds)} after preparation; a flat-parameter wrapper fails with "
            "'Must flatten tensors with uniform dtype'. Prepare with upcast='none' for it, or use "
            "`kbitprep finetune --fsdp` (FSDP2 gathers mixed units as raw bytes)."))
    storage = {p.dtype for _, p, _ in owned if getattr(p, "quant_state", None) is not None}
    if any(not d.is_floating_point for d in storage):
        found.append(FLAT_INTEGER_STORAGE(
            "4-bit weights are stored as uint8: a flat-parameter wrapper fails with 'Cannot flatten integer dtype' "
            "or trains with loss 0 (accelerate#3983). Load with bnb_4bit_quant_storage=torch.bfloat16 for it, or "
            "use `kbitprep finetune --fsdp`, which shards uint8 storage exactly."))
    if any(d.is_floating_point for d in storage):
        found.append(FLAT_FLOAT_STORAGE(
            "4-bit weights are stored in a float dtype: any cast or float copy of them (a mixed-precision "
            "param_dtype, a NaN-normalising transfer) silently changes about 0.1% of the packed values "
            "(bitsandbytes#1945). Keep the wrapper's param_dtype unset for these units, or use "
            "`kbitprep finetune --fsdp`, which moves them as raw bytes."))
    return found
