"""``pareto.png``: top-1 against trainable parameters and against training memory, one labelled point per strategy."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_pareto(table: list[dict[str, Any]], path: Path) -> bool:
    """Accuracy against trainable parameters and against training memory, one labelled point per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in table if r["top1_mean"] is not None]
    if not points:
        return False
    memory_key = "cuda_peak_mb" if all(r.get("cuda_peak_mb") for r in points) else "saved_for_backward_mb"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = ((axes[0], "trainable_params", "trainable parameters"),
              (axes[1], memory_key, f"training memory ({memory_key}, MiB)"))
    for ax, key, label in panels:
        for r in points:
            if r.get(key):
                ax.errorbar(r[key], 100 * r["top1_mean"], yerr=100 * (r["top1_std"] or 0), fmt="o", capsize=3)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    for ax, key, _ in panels:  # after the layout: the labels are placed where the points finally are
        place_labels(ax, [(r[key], 100 * r["top1_mean"], r["strategy"]) for r in points if r.get(key)])
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def place_labels(ax: Any, points: list[tuple[float, float, str]], max_moves: int = 40) -> list[Any]:
    """Label each point beside it; where that would overlap a label placed before, try just above or below, then
    further away, with a leader line to the point.

    Returns the labels' text boxes in display coordinates, none overlapping another (up to ``max_moves`` tries)."""
    from matplotlib.text import Text

    renderer = ax.figure.canvas.get_renderer()
    placed: list[Any] = []
    for x, y, text in sorted(points, key=lambda p: p[1]):
        for move in range(max_moves + 1):
            rise = 3 + (move + 1) // 2 * 7 * (1 if move % 2 else -1) if move else 3  # 3, 10, -4, 17, -11, ...
            lead = {"arrowstyle": "-", "lw": 0.5, "color": "0.5"} if move > 2 else None
            label = ax.annotate(text, (x, y), textcoords="offset points", xytext=(6, rise), fontsize=9,
                                va="bottom" if rise >= 0 else "top", arrowprops=lead)
            label.update_positions(renderer)  # where the offset puts the text (otherwise done when drawing)
            box = Text.get_window_extent(label, renderer)  # the text alone, not its leader line
            if move == max_moves or not any(box.overlaps(other) for other in placed):
                break
            label.remove()
        placed.append(box)
    return placed
