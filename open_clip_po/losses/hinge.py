"""SLiC-style hinge loss on the policy ratio (TRL's ``loss_type="hinge"``)."""
from __future__ import annotations

import torch

from .base import PairwiseLoss
from .registry import register_loss


@register_loss("hinge")
class HingeLoss(PairwiseLoss):
    """``max(0, 1 − βh)`` per sample; 1/β is the margin h must clear.

    Hyper-parameter: ``beta`` (default 1.0, like our DPO default; TRL's default is 0.1).
    """

    def __init__(self, beta: float = 1.0):
        super().__init__(beta)

    def loss_of_ratio(self, h: torch.Tensor) -> torch.Tensor:
        return torch.relu(1 - self.beta * h)
