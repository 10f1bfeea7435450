"""PNG plots with a fixed pixel size (matplotlib Agg), written atomically."""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: clusters and CI have no display
import matplotlib.pyplot as plt  # noqa: E402

from ..atomic import write_bytes  # noqa: E402

FIGURE_DPI = 100
# Plots are saved without bbox_inches="tight" so their size in pixels is exactly size × FIGURE_DPI.
SINGLE_FIGSIZE = (6.4, 4.8)
WIDE_FIGSIZE = (12.8, 4.8)


def save_figure(fig, path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=FIGURE_DPI)
    plt.close(fig)
    return write_bytes(path, buffer.getvalue())


def legend_outside(ax, **kwargs):
    """The axes' legend to their right, off the data; ``fig.tight_layout()`` then narrows the axes to make room."""
    return ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8, **kwargs)


def run_label(pretrained: str) -> str:
    """What a plot calls the model in ``pretrained``: the run's name for an open_clip checkpoint
    (``LOGS/NAME/checkpoints/epoch_3.pt`` → ``NAME epoch_3``), else the file's stem, else the pretrained tag."""
    path = Path(pretrained)
    if path.parent.name == "checkpoints" and path.parent.parent.name:
        return f"{path.parent.parent.name} {path.stem}"
    return path.stem if path.suffix else str(pretrained)


def figure_pixels(figsize) -> tuple[int, int]:
    return round(figsize[0] * FIGURE_DPI), round(figsize[1] * FIGURE_DPI)


def new_figure(figsize=SINGLE_FIGSIZE, ncols: int = 1):
    fig, axes = plt.subplots(1, ncols, figsize=figsize, dpi=FIGURE_DPI)
    return fig, axes
