"""How far a retrieval prompt's scores favour women over men, over t, and why it turns neutral where it does.

``retrieval_lean``: per prompt and t, (mean score of the women − of the men) / their pooled standard deviation
among a group of images (an activity prompt's: that activity's) — graded where a top-k's gender mix jumps — and
the t where it crosses zero. ``lean_split``: a neutral caption's pre-trained lean as the part read through the
gendered captions' direction (which a flip learned from those captions cancels at t*) plus the rest.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .features import apply_head, text_side
from .plots import SINGLE_FIGSIZE, legend_outside, new_figure, save_figure
from .tsweep import find_crossing


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


@torch.no_grad()
def retrieval_lean(heads: dict, images: torch.Tensor, is_man: torch.Tensor, prompt_text: torch.Tensor,
                   groups: Sequence[torch.Tensor], towers: str = "both") -> dict:
    """How much each prompt's scores favour women over men, per t: among the images of ``groups[p]`` (a mask; for
    an activity prompt, the images of that activity), (mean score of the women − mean of the men) / the pooled
    standard deviation. Graded where the top-k's mix jumps; it is zero where retrieval is gender-neutral, and
    ``t_neutral`` is where each prompt's lean crosses zero (NaN if it does not on the grid)."""

    ts = list(heads)
    lean = [[] for _ in groups]
    for t in ts:
        scores = apply_head(prompt_text, text_side(heads[t], towers)) @ apply_head(images, heads[t]).T   # [P, N]
        for p, mask in enumerate(groups):
            women, men = scores[p][mask & ~is_man], scores[p][mask & is_man]
            if len(women) < 2 or len(men) < 2:
                lean[p].append(float("nan"))
                continue
            pooled = ((women.var() + men.var()) / 2).sqrt().clamp_min(1e-12)
            lean[p].append(((women.mean() - men.mean()) / pooled).item())
    return {"t": ts, "lean": lean, "t_neutral": [find_crossing(ts, row) if all(map(math.isfinite, row))
                                                 else float("nan") for row in lean]}


@torch.no_grad()
def lean_split(images: torch.Tensor, is_man: torch.Tensor, activity: torch.Tensor, man_text: torch.Tensor,
               woman_text: torch.Tensor, neutral_text: torch.Tensor) -> list[dict]:
    """Per activity a, the base model's neutral caption split by how a head trained on the gendered captions sees it.

    With d_x = mean normalised image of the women − of the men doing a, and g = the unit vector from "The man is a"
    to "The woman is a" (normalised features), the neutral caption's image lean n·d_x is ``along`` = (n·g)(g·d_x),
    the part read through the gendered captions' direction — what a flip learned from them cancels at t* — plus
    ``rest``, read through the part of d_x the gendered captions do not see, which such a flip leaves in place.
    When ``rest`` is large and of the other sign, retrieval at t* is reversed rather than made neutral."""
    x = _normalize(images)
    man, woman, neutral = _normalize(man_text), _normalize(woman_text), _normalize(neutral_text)
    rows = []
    for a in range(neutral.shape[0]):
        women, men = x[(activity == a) & ~is_man], x[(activity == a) & is_man]
        if len(women) == 0 or len(men) == 0:
            rows.append({"image_lean": float("nan"), "along": float("nan"), "rest": float("nan")})
            continue
        d_x = women.mean(0) - men.mean(0)
        g = _normalize(woman[a] - man[a])
        lean, along = (neutral[a] @ d_x).item(), ((neutral[a] @ g) * (g @ d_x)).item()
        rows.append({"image_lean": lean, "along": along, "rest": lean - along})
    return rows


def plot_lean(lean: dict, t_star: float, path) -> Path:
    """Each prompt's retrieval lean over t (0: gender-neutral retrieval), with t*."""
    fig, ax = new_figure(SINGLE_FIGSIZE)
    for prompt, row in zip(lean["prompts"], lean["lean"]):
        ax.plot(lean["t"], row, "o-", ms=3, label=prompt)
    ax.axhline(0.0, color="gray", linewidth=1)
    if math.isfinite(t_star):
        ax.axvline(t_star, color="gray", linestyle=":", label=f"t* = {t_star:.3f}")
    ax.set_xlabel("t")
    ax.set_ylabel("lean: (women − men) mean score / pooled sd")
    legend_outside(ax)
    fig.tight_layout()
    return save_figure(fig, path)
