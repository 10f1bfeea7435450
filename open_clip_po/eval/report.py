"""Result files: JSON and CSV written atomically, PNG plots with a fixed pixel size (matplotlib Agg)."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Iterable, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: clusters and CI have no display
import matplotlib.pyplot as plt  # noqa: E402

from ..atomic import write_bytes  # noqa: E402

FIGURE_DPI = 100
# Plots are saved without bbox_inches="tight" so their size in pixels is exactly size × FIGURE_DPI.
SINGLE_FIGSIZE = (6.4, 4.8)
WIDE_FIGSIZE = (12.8, 4.8)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; null reads as "not defined" (e.g. no crossing)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(obj, path) -> Path:
    return write_bytes(path, (json.dumps(_json_safe(obj), indent=2) + "\n").encode())


def write_csv(rows: Sequence[dict], path, columns: Iterable[str] | None = None) -> Path:
    columns = list(columns or (rows[0].keys() if rows else []))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return write_bytes(path, buffer.getvalue().encode())


def save_figure(fig, path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=FIGURE_DPI)
    plt.close(fig)
    return write_bytes(path, buffer.getvalue())


def figure_pixels(figsize) -> tuple[int, int]:
    return round(figsize[0] * FIGURE_DPI), round(figsize[1] * FIGURE_DPI)


def new_figure(figsize=SINGLE_FIGSIZE, ncols: int = 1):
    fig, axes = plt.subplots(1, ncols, figsize=figsize, dpi=FIGURE_DPI)
    return fig, axes
