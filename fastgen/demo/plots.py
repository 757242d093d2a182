"""Pictures of the samples."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def ring_plot(path: Path, panels: dict[str, Tensor]) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4))
    for ax, (title, pts) in zip(axes, panels.items()):
        pts = pts.detach().float().cpu()
        ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.3, rasterized=True)
        ax.set_title(title, fontsize=9)
        ax.set_xlim(-3.2, 3.2)
        ax.set_ylim(-3.2, 3.2)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def digits_grid(path: Path, panels: dict[str, Tensor], per_class: int = 6) -> None:
    """One row per class; a block of ``per_class`` columns per sampler, titled with its metrics.

    Each panel is ``[10 * per_class, 1, 8, 8]`` in [-1, 1], class-major (class c's samples are
    rows c * per_class ... (c + 1) * per_class - 1).
    """
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 4.4))
    for ax, (title, images) in zip(axes, panels.items()):
        grid = images.detach().float().cpu().reshape(10, per_class, 8, 8)
        grid = grid.permute(0, 2, 1, 3).reshape(10 * 8, per_class * 8)
        ax.imshow(grid, cmap="gray_r", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=130)
    plt.close(fig)
