"""The loss curve of a run, drawn with matplotlib (imported only when a plot is drawn)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["plot_loss"]


def plot_loss(history: Sequence[dict[str, float]], title: str,
              evaluations: Sequence[dict[str, float]] = ()) -> bytes:
    """The training loss curve, and the evaluation loss beside it when there is one, as PNG bytes."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot([h["step"] for h in history], [h["loss"] for h in history], color="tab:blue", linewidth=1.5,
              label="training loss")
    if evaluations:
        axes.plot([e["step"] for e in evaluations], [e["loss"] for e in evaluations], color="tab:orange",
                  linewidth=1.5, marker="o", markersize=4, label="eval loss")
        axes.legend()
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss" if evaluations else "training loss")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
