"""Which floating-point precisions a device computes fast, so work can be done in one of them.

Devices differ in what half precision costs. A CPU with AVX512 runs a bfloat16 matmul
through oneDNN faster than a float32 one; a CPU with only AVX2 falls back to torch's
generic kernels, where the same bf16 matmul is 5-170x *slower* than fp32 (a frozen
`nn.Linear(256, 32000)` on 512 tokens: 750 ms forward and 23 s backward in bf16 against
136 ms and 135 ms in fp32). float16 on most CPUs is as slow. On CUDA, bf16 needs
compute capability 8.0 (Ampere) and fp16 runs well from 7.0 (Volta) on.

The decision is read from what the device reports, never timed where it can be read:

    cpu   ->  float16 / bfloat16 fast when oneDNN has kernels for them on this CPU
              (torch.ops.mkldnn._is_mkldnn_{bf16,fp16}_supported; torch's reported
              CPU capability, e.g. "AVX2" or "AVX512", is shown beside it)
    cuda  ->  the compute capability: bf16 from 8.0, fp16 from 7.0
    other ->  a cheap timing probe: a 256 x 256 matmul per dtype, best of three,
              fast when it takes at most 1.5x the float32 time

Answers are cached per device type. `override_fast_dtypes` replaces the answer (tests
use it to cover both branches on any machine; users may use it on hardware the rules
do not know). Nothing here imports the application.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

__all__ = [
    "HALF_PRECISIONS",
    "DevicePrecision",
    "SlowLayer",
    "compute_dtype_for",
    "computes_fast",
    "device_precision",
    "override_fast_dtypes",
    "planned_compute_dtype",
    "slow_layers",
]

HALF_PRECISIONS: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)

# A half-precision matmul no slower than this multiple of the float32 one counts as fast.
_PROBE_SLOWDOWN_LIMIT = 1.5
_PROBE_SIZE = 256


@dataclasses.dataclass(frozen=True)
class DevicePrecision:
    """What a device computes fast, and how that was decided.

    Args:
        device_type (str): "cpu", "cuda", ...
        fast (frozenset[torch.dtype]): the floating-point dtypes it computes fast; always
            holds float32.
        source (str): how this was decided, for plans and reports (e.g. "cpu capability
            AVX2, oneDNN bf16: no, fp16: no").
    """

    device_type: str
    fast: frozenset[torch.dtype]
    source: str

    def to_dict(self) -> dict[str, object]:
        return {"device_type": self.device_type, "source": self.source,
                "fast_dtypes": sorted(str(dtype).removeprefix("torch.") for dtype in self.fast)}


def _cpu_precision() -> DevicePrecision:
    mkldnn = torch.backends.mkldnn.is_available()
    bf16 = mkldnn and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    fp16 = mkldnn and bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    fast = {torch.float32} | ({torch.bfloat16} if bf16 else set()) | ({torch.float16} if fp16 else set())
    capability = torch.backends.cpu.get_cpu_capability()
    source = (f"cpu capability {capability}, oneDNN bf16: {'yes' if bf16 else 'no'}, "
              f"fp16: {'yes' if fp16 else 'no'}")
    return DevicePrecision("cpu", frozenset(fast), source)


def _cuda_precision() -> DevicePrecision:
    major, minor = torch.cuda.get_device_capability()
    fast = {torch.float32} | ({torch.float16} if major >= 7 else set()) | ({torch.bfloat16} if major >= 8 else set())
    return DevicePrecision("cuda", frozenset(fast), f"cuda compute capability {major}.{minor}")


def _time_matmul(device_type: str, dtype: torch.dtype) -> float:
    """Best of three timings of one square matmul in `dtype` on the device."""
    a = torch.randn(_PROBE_SIZE, _PROBE_SIZE, device=device_type).to(dtype)
    (a @ a).sum().item()  # warm-up: the first call loads kernels
    times = []
    for _ in range(3):
        started = time.perf_counter()
        (a @ a).sum().item()  # .item() waits for an asynchronous device
        times.append(time.perf_counter() - started)
    return min(times)


def _probed_precision(device_type: str) -> DevicePrecision:
    try:
        reference = _time_matmul(device_type, torch.float32)
        fast = {torch.float32} | {dtype for dtype in HALF_PRECISIONS
                                  if _time_matmul(device_type, dtype) <= _PROBE_SLOWDOWN_LIMIT * reference}
    except (RuntimeError, TypeError) as error:  # a dtype the device has no kernel for
        return DevicePrecision(device_type, frozenset({torch.float32}), f"timing probe failed ({error}); fp32 only")
    return DevicePrecision(device_type, frozenset(fast),
                           f"timing probe: {_PROBE_SIZE}x{_PROBE_SIZE} matmul within {_PROBE_SLOWDOWN_LIMIT}x of fp32")


# device type -> how to find out what it computes fast; any other type is timed.
_DETECTORS: Mapping[str, Callable[[], DevicePrecision]] = {
    "cpu": _cpu_precision,
    "cuda": _cuda_precision,
}

_overrides: dict[str, DevicePrecision] = {}


@functools.cache
def _detected(device_type: str) -> DevicePrecision:
    detector = _DETECTORS.get(device_type)
    return detector() if detector is not None else _probed_precision(device_type)


def device_precision(device: torch.device | str = "cpu") -> DevicePrecision:
    """What `device` computes fast (cached per device type).

    Args:
        device (torch.device | str): the device, e.g. "cpu" or torch.device("cuda", 0). Default: "cpu"

    Returns:
        DevicePrecision: the fast dtypes and how they were found.

    Example:
        >>> device_precision("cpu").fast  # on an AVX512 CPU with oneDNN
        frozenset({torch.float32, torch.bfloat16})
    """
    device_type = torch.device(device).type
    return _overrides.get(device_type) or _detected(device_type)


def computes_fast(dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    """Whether `device` computes matmuls in `dtype` fast; float32 always counts as fast.

    Args:
        dtype (torch.dtype): a floating-point dtype.
        device (torch.device | str): the device. Default: "cpu"

    Returns:
        bool: True for float32 and for any half precision the device handles well.
    """
    return dtype == torch.float32 or dtype in device_precision(device).fast


def compute_dtype_for(dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype to compute a matmul of `dtype` tensors in: `dtype` itself if fast, else float32.

    Args:
        dtype (torch.dtype): the stored dtype (bfloat16, float16, float32, ...).
        device (torch.device | str): the device. Default: "cpu"

    Returns:
        torch.dtype: `dtype` when the device computes it fast or it is not a half
        precision, float32 otherwise.

    Example:
        >>> compute_dtype_for(torch.bfloat16, "cpu")  # on an AVX2-only CPU
        torch.float32
    """
    if dtype not in HALF_PRECISIONS or computes_fast(dtype, device):
        return dtype
    return torch.float32


def planned_compute_dtype(dtype: torch.dtype, device: str) -> torch.dtype:
    """The dtype `device` will multiply `dtype` tensors in, for a run planned here (`compute_dtype_for`'s rule).

    A GPU run planned on a machine without one is taken to run on an Ampere-or-later GPU,
    which computes bf16 and fp16 fast.
    """
    from .device import accelerator

    here = accelerator()
    if device != "cpu" and (here is None or here.type != torch.device(device).type):
        return dtype  # no such device to probe here: assume one that computes half precision fast
    return compute_dtype_for(dtype, device)


@contextlib.contextmanager
def override_fast_dtypes(device_type: str, fast: set[torch.dtype] | frozenset[torch.dtype]) -> Iterator[None]:
    """Within the block, treat `device_type` as computing exactly `fast` (plus float32) fast.

    Args:
        device_type (str): "cpu", "cuda", ...
        fast (set[torch.dtype]): the dtypes to treat as fast.

    Example:
        >>> with override_fast_dtypes("cpu", set()):  # as on an AVX2-only CPU
        ...     compute_dtype_for(torch.bfloat16, "cpu")
        torch.float32
    """
    previous = _overrides.get(device_type)
    names = ", ".join(sorted(str(d).removeprefix("torch.") for d in fast)) or "none"
    _overrides[device_type] = DevicePrecision(device_type, frozenset({torch.float32, *fast}),
                                              f"set by override_fast_dtypes (half precisions: {names})")
    try:
        yield
    finally:
        if previous is None:
            _overrides.pop(device_type, None)
        else:
            _overrides[device_type] = previous


@dataclasses.dataclass(frozen=True)
class SlowLayer:
    """A layer whose matmul will run in a precision its device computes slowly.

    Args:
        name (str): the module's name in the model.
        dtype (torch.dtype): the precision it computes in.
        device (torch.device): where it computes.
        numel (int): values of its weight (what upcasting it to float32 doubles).
        quantized (bool): a quantized layer, whose compute dtype (not its storage) is the slow one.
    """

    name: str
    dtype: torch.dtype
    device: torch.device
    numel: int
    quantized: bool


def slow_layers(model: nn.Module, stored: Callable[[torch.Tensor], torch.dtype]) -> list[SlowLayer]:
    """The linear layers of `model` that would compute in a precision their device computes slowly.

    A plain linear layer (torch's `nn.Linear`, transformers' `Conv1D`) computes in its weight's
    dtype, `stored(weight)` (the dtype after a planned cast); a quantized one with a
    `compute_dtype` (bitsandbytes 4-bit) in that. Embedding lookups are not matmuls and are
    not listed; neither is anything on the meta device.

    Args:
        model (nn.Module): the model.
        stored (Callable[[torch.Tensor], torch.dtype]): the dtype a parameter will have.

    Returns:
        list[SlowLayer]: in `named_modules` order.
    """
    found = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.device.type == "meta" or weight.dim() != 2:
            continue
        compute = getattr(module, "compute_dtype", None)
        if isinstance(compute, torch.dtype):
            dtype, quantized = compute, True
        elif isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            dtype, quantized = stored(weight), False
        else:
            continue
        if dtype in HALF_PRECISIONS and not computes_fast(dtype, weight.device):
            found.append(SlowLayer(name, dtype, weight.device, weight.numel(), quantized))
    return found
