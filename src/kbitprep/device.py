"""Which accelerator this process computes on: the one answer every part of kbitprep asks.

torch's own `torch.accelerator` (torch >= 2.6) knows every device type torch was built
for (CUDA and ROCm, XPU, MPS, ...); before it existed, CUDA and XPU are asked in turn.
"""

from __future__ import annotations

import torch

__all__ = ["accelerator", "empty_accelerator_cache", "has_accelerator"]

_LEGACY_BACKENDS = ("cuda", "xpu")


def accelerator() -> torch.device | None:
    """The accelerator this process can use, or None on a machine without one.

    Example:
        >>> accelerator()  # on a CUDA machine
        device(type='cuda')
    """
    api = getattr(torch, "accelerator", None)
    if api is not None and hasattr(api, "current_accelerator"):
        return api.current_accelerator() if api.is_available() else None
    for name in _LEGACY_BACKENDS:
        backend = getattr(torch, name, None)
        if backend is not None and backend.is_available():
            return torch.device(name)
    return None


def has_accelerator() -> bool:
    """Whether this process can compute on an accelerator."""
    return accelerator() is not None


def empty_accelerator_cache() -> None:
    """Give the accelerator's cached, unused memory back; nothing to do without an accelerator."""
    device = accelerator()
    if device is None:
        return
    api = getattr(torch, "accelerator", None)
    if api is not None and hasattr(api, "empty_cache"):
        api.empty_cache()
        return
    backend = getattr(torch, device.type, None)
    if backend is not None and hasattr(backend, "empty_cache"):
        backend.empty_cache()
