"""Counting live tensor bytes: every storage from its allocation to its release.

`LiveBytes` is a `TorchDispatchMode`: each operator's outputs pass through it, and a
storage it has not seen is counted (its `nbytes`) and given a weak reference whose
callback uncounts it when the storage is freed. Tensors that exist before the block
(the model's weights) are counted by `LiveBytes.add`. The running total is what the
program holds in tensors, not what the process holds: no interpreter, allocator slack,
CUDA context or kernel scratch space.

The same counter runs a real CPU training step (the measurement `finetune` records and
the fit benchmark checks) and a step on the meta device, where nothing is allocated but
every storage still has its size (the memory model, `kbitprep.app.memory.estimate`). With
`record=True` it also keeps a log of allocations and frees, tagged with the phase the
caller names (`LiveBytes.phase`), from which the live set at the peak is rebuilt.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["Allocation", "LiveBytes", "PeakMeter", "measured_peak", "model_tensors", "quant_state_tensors",
           "quantization_state"]


@dataclasses.dataclass
class Allocation:
    """One storage in a recorded log.

    Args:
        nbytes (int): its size.
        phase (str): the phase named when it was allocated.
        born (int): the event index of its allocation.
        died (int | None): the event index of its release; None while alive.
    """

    nbytes: int
    phase: str
    born: int
    died: int | None = None

    def alive_at(self, event: int) -> bool:
        return self.born <= event and (self.died is None or self.died > event)


class LiveBytes(TorchDispatchMode):
    """Within the block, the bytes of tensor storage alive now (`live`) and at most (`peak`).

    Args:
        record (bool): keep a log of every allocation (`allocations`) for analysis. Default: False

    Example:
        >>> with LiveBytes() as counter:
        ...     counter.add(model.parameters())
        ...     model(**batch).loss.backward()
        >>> counter.peak
    """

    def __init__(self, *, record: bool = False) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.peak_event = 0
        self.phase = ""
        self.record = record
        self.allocations: list[Allocation] = []
        self._events = 0
        self._alive: dict[int, tuple[weakref.ref, Allocation]] = {}  # id(storage) -> (ref, its allocation)

    def add(self, tensors: Iterable[Any]) -> None:
        """Count tensors that exist already (weights, buffers); each storage once."""
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                self._count(tensor)

    def allocation_of(self, tensor: torch.Tensor) -> Allocation | None:
        """The allocation record of a live tensor's storage, if it was counted."""
        entry = self._alive.get(id(_storage(tensor)))
        return entry[1] if entry is not None else None

    def _count(self, tensor: torch.Tensor) -> None:
        storage = _storage(tensor)
        if storage is None:
            return
        key = id(storage)
        entry = self._alive.get(key)
        if entry is not None:
            grown = storage.nbytes() - entry[1].nbytes  # an op resized a storage it was handed (out=, resize_)
            if grown > 0:
                entry[1].nbytes += grown
                self._change(grown)
            return
        self._events += 1
        allocation = Allocation(storage.nbytes(), self.phase, self._events)
        if self.record:
            self.allocations.append(allocation)
        self._alive[key] = (weakref.ref(storage, self._release(key, allocation)), allocation)
        self._change(allocation.nbytes)

    def _release(self, key: int, allocation: Allocation) -> Callable[[weakref.ref], None]:
        def release(_ref: weakref.ref) -> None:
            self._events += 1
            allocation.died = self._events
            self._alive.pop(key, None)
            self._change(-allocation.nbytes)
        return release

    def _change(self, delta: int) -> None:
        self.live += delta
        if self.live > self.peak:
            self.peak, self.peak_event = self.live, self._events

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._count(leaf)
        return out

    def alive_at_peak(self) -> Iterator[Allocation]:
        """The recorded allocations alive at the peak (needs `record=True`)."""
        return (allocation for allocation in self.allocations if allocation.alive_at(self.peak_event))


def _storage(tensor: torch.Tensor) -> torch.UntypedStorage | None:
    if tensor.is_sparse or tensor.layout != torch.strided:
        return None
    try:
        return tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage of their own
        return None


def model_tensors(model: torch.nn.Module) -> Iterator[torch.Tensor]:
    """Every tensor a model holds: parameters, buffers and bitsandbytes quantization state."""
    yield from model.parameters()
    yield from model.buffers()
    yield from quantization_state(model)


def quantization_state(model: torch.nn.Module) -> Iterator[torch.Tensor]:
    """The tensors bitsandbytes keeps beside its quantized weights: 4-bit block scales, int8 row scales."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        yield from quant_state_tensors(getattr(weight, "quant_state", None))
        # int8 layers keep their row scales on the weight until the first forward moves them to `state`
        for holder in (weight, getattr(module, "state", None)):
            value = getattr(holder, "SCB", None)
            if isinstance(value, torch.Tensor):
                yield value


def quant_state_tensors(state: Any) -> Iterator[torch.Tensor]:
    """The tensors of a bitsandbytes 4-bit `QuantState` (absmax, code, offset, nested state)."""
    if state is None:
        return
    for name in ("absmax", "code", "offset"):
        value = getattr(state, name, None)
        if isinstance(value, torch.Tensor):
            yield value
    yield from quant_state_tensors(getattr(state, "state2", None))


class PeakMeter:
    """The most bytes of live tensors between `start()` and `stop()`, on the device a model trains on.

    On a CUDA device: torch's allocator statistics (`torch.cuda.max_memory_allocated`, which
    also sees kernels' scratch space). On a CPU: `LiveBytes`, entered at `start()` with the
    model's tensors already counted.

    Args:
        model (nn.Module): the model; its tensors count from the start.

    Example:
        >>> meter = PeakMeter(model).start()
        >>> trainer.train()
        >>> meter.stop()
        123456789
    """

    def __init__(self, model: torch.nn.Module) -> None:
        param = next(model.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")
        self.method = ("torch.cuda.max_memory_allocated" if self.device.type == "cuda"
                       else "live tensor storages, counted as allocated and freed")
        self._model: torch.nn.Module | None = model
        self._counter: LiveBytes | None = None
        self.peak: int | None = None

    def start(self) -> PeakMeter:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._counter = LiveBytes()
            self._counter.__enter__()
            if self._model is not None:  # None only once started: a meter starts once
                self._counter.add(model_tensors(self._model))
        self._model = None  # the meter must not keep the model alive
        return self

    def stop(self) -> int:
        """End the measurement (idempotent); the peak in bytes."""
        if self.peak is None:
            if self._counter is not None:
                self._counter.__exit__(None, None, None)
                self.peak = self._counter.peak
            else:
                self.peak = int(torch.cuda.max_memory_allocated(self.device))
        return self.peak


def measured_peak(device: torch.device) -> dict[str, Any]:
    """A process's peak memory so far: CUDA's allocator peak on a GPU, else the process's peak RSS (VmHWM)."""
    if device.type == "cuda":
        return {"bytes": int(torch.cuda.max_memory_allocated(device)), "by": "torch.cuda.max_memory_allocated"}
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return {"bytes": None, "by": "unavailable (no /proc/self/status)"}
    return {"bytes": kib * 1024, "by": "VmHWM (the process's peak resident memory, loading included)"}
