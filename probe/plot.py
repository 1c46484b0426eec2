"""Accuracy-vs-ε plots (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


def plot_accuracy(lines: dict[str, dict[str, float]], path, title: str) -> Path:
    """``lines``: label → {eps: accuracy}. Writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, points in lines.items():
        eps = sorted(points, key=float)
        ax.plot([float(e) for e in eps], [points[e] * 100 for e in eps], marker="o", label=label)
    ax.set_xlabel("ε (L∞, pixels in [0, 1])")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
