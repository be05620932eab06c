"""Rendering plans as text. Formatting only reads the plan; it never rewrites it."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .plan import PreparationPlan

__all__ = ["format_bytes", "format_count", "format_plan"]

_MAX_CAST_ROWS = 12


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


def format_plan(plan: PreparationPlan) -> str:
    """A plan as a two-column table, with the casts listed underneath."""
    counts = plan.parameter_counts
    ratio = plan.bytes_after / plan.bytes_before if plan.bytes_before else 1.0
    ckpt = plan.checkpointing
    if ckpt.enabled:
        extras = [f"kwargs {dict(ckpt.kwargs)}"]
        if ckpt.every_n_layers != 1:
            extras.append(f"every {ckpt.every_n_layers} layers")
        if ckpt.offload:
            extras.append("offloaded to host")
        extras.append("input-grad hook" if ckpt.input_grad_hook else "no input-grad hook")
        checkpointing = f"on via {ckpt.method}, " + ", ".join(extras)
    else:
        checkpointing = f"off ({ckpt.reason})"
    rows = [
        ("quantization", f"{plan.quantization or 'none'} ({plan.detection.evidence})"),
        ("parameters", " | ".join(f"{kind} {format_count(n)}" for kind, n in counts.items())),
        ("frozen", f"{len(plan.frozen)} parameter tensors"
                   + (f"; {len(plan.kept_trainable)} kept trainable" if plan.kept_trainable else "")),
        ("upcast", plan.cast_reason),
        ("casts", f"{len(plan.casts)} parameters, +{format_bytes(sum(c.bytes_added for c in plan.casts))}"),
        ("bytes", f"{format_bytes(plan.bytes_before)} -> {format_bytes(plan.bytes_after)} (x{ratio:.3f})"),
        ("checkpointing", checkpointing),
    ]
    if plan.training_layout:
        rows.append(plan.detection.behaviour.describe_training_layout(plan.training_layout))
    rows += [("warning", message) for message in plan.warnings]
    rows += [("error", message) for message in plan.errors]
    width = max(len(key) for key, _ in rows)
    lines = ["kbitprep preparation plan"] + [f"  {key:<{width}}  {value}" for key, value in rows]
    if plan.casts:
        name_width = min(60, max(len(cast.name) for cast in plan.casts))
        lines.append(f"  {'':<{width}}  {'parameter':<{name_width}}  {'from':<9} {'to':<8} {'added':>11}")
        for cast in plan.casts[:_MAX_CAST_ROWS]:
            lines.append(f"  {'':<{width}}  {cast.name:<{name_width}}  {str(cast.from_dtype)[6:]:<9} "
                         f"{str(cast.to_dtype)[6:]:<8} {'+' + format_bytes(cast.bytes_added):>11}")
        if len(plan.casts) > _MAX_CAST_ROWS:
            lines.append(f"  {'':<{width}}  ... and {len(plan.casts) - _MAX_CAST_ROWS} more (to_dict() lists all)")
    return "\n".join(lines)
