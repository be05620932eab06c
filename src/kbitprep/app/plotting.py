"""The loss curve of a run, drawn with matplotlib (imported only when a plot is drawn)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["plot_loss"]


def plot_loss(history: Sequence[dict[str, float]], title: str) -> bytes:
    """The loss curve as PNG bytes."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot([h["step"] for h in history], [h["loss"] for h in history], color="tab:blue", linewidth=1.5)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("training loss")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
