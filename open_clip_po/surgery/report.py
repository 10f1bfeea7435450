"""How close W (and W_t) is to orthogonal: JSON numbers and a PNG like the paper's Fig. 8."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..atomic import atomic_path, write_text
from .scaling import head_stats


def build_report(W: torch.Tensor, W_t: torch.Tensor, t: float, **context) -> dict:
    """``{"t", ..context, "head": stats(W), "scaled_head": stats(W_t)}``."""
    return {"t": float(t), **context, "head": head_stats(W), "scaled_head": head_stats(W_t)}


def format_singular_values(values, shown: int = 4) -> str:
    """Singular values, largest first; all of them for a small head, else the ``shown`` largest and smallest."""
    values = sorted(values, reverse=True)
    if len(values) > 2 * shown + 1:
        values = values[:shown] + ["…"] + values[-shown:]
    return " ".join(v if isinstance(v, str) else f"{v:.4g}" for v in values)


def format_report(report: dict) -> str:
    lines = []
    for key, label in (("head", "W"), ("scaled_head", f"W_t (t={report['t']:g})")):
        s = report[key]
        lines.append(f"{label:>14}: sigma in [{s['sigma_min']:.4f}, {s['sigma_max']:.4f}], "
                     f"||W^T W - I||_F = {s['gram_minus_identity_fro']:.4g}, "
                     f"||W^T W - I||_2 = {s['gram_minus_identity_spectral']:.4g}")
        lines.append(f"{'':>14}  singular values: {format_singular_values(s['singular_values'])}")
    return "\n".join(lines)


def write_report_json(report: dict, path: str | os.PathLike) -> Path:
    return write_text(path, json.dumps(report, indent=2) + "\n")


def plot_report(heads: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """One row per head: heat map of WᵀW, its residual WᵀW − I, histogram of singular values; and a last row with
    every head's singular values, sorted, on a log scale (before and after scaling, side by side)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(len(heads) + 1, 3, figsize=(13, 3.8 * (len(heads) + 1)), squeeze=False)
    sorted_panel = fig.add_subplot(len(heads) + 1, 1, len(heads) + 1)
    for ax in axes[-1]:
        ax.remove()
    for row, (label, W) in zip(axes, heads.items()):
        W = W.detach().to(torch.float64).cpu()
        gram = W.T @ W
        residual = gram - torch.eye(W.shape[0], dtype=W.dtype)
        image = row[0].imshow(gram.numpy(), cmap="viridis")
        row[0].set_title(f"{label}: $W^\\top W$")
        fig.colorbar(image, ax=row[0], fraction=0.046)
        # Symmetric limits so that white means "exactly the identity".
        limit = max(residual.abs().max().item(), 1e-12)
        image = row[1].imshow(residual.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit)
        row[1].set_title(f"{label}: $W^\\top W - I$ (Frobenius {torch.linalg.matrix_norm(residual).item():.3g})")
        fig.colorbar(image, ax=row[1], fraction=0.046)
        singular_values = torch.linalg.svdvals(W).numpy()
        row[2].hist(singular_values, bins=min(50, max(10, len(singular_values) // 4)), color="tab:blue")
        row[2].axvline(1.0, color="k", linestyle="--", linewidth=1)
        row[2].set_title(f"{label}: singular values")
        row[2].set_xlabel("σ")
        row[2].set_ylabel("count")
        sorted_panel.semilogy(range(1, len(singular_values) + 1), singular_values, ".-", label=label)
    sorted_panel.axhline(1.0, color="k", linestyle="--", linewidth=1)
    sorted_panel.set_xlabel("index (largest first)")
    sorted_panel.set_ylabel("σ (log scale)")
    sorted_panel.set_title("singular values, sorted")
    sorted_panel.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path
