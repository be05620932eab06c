"""Numbers as people read them: bytes in binary units, parameter counts in short form."""

from __future__ import annotations

__all__ = ["format_bytes", "format_count"]


def format_bytes(count: int) -> str:
    """Bytes in binary units: 1536 -> '1.50 KiB'."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_count(count: int) -> str:
    """A parameter count in short form: 1_234_567 -> '1.23M'."""
    for size, suffix in ((10**9, "B"), (10**6, "M"), (10**3, "k")):
        if count >= size:
            return f"{count / size:.2f}{suffix}"
    return str(count)
