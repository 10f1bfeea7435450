"""IPO (paper Eq. 6)."""
from __future__ import annotations

import torch

from .base import PairwiseLoss
from .registry import register_loss


@register_loss("ipo")
class IPOLoss(PairwiseLoss):
    """``(h − 1/(2β))²`` per sample: regresses the policy ratio onto the target 1/(2β).

    Hyper-parameter: ``beta`` (default 0.01, the paper's IPO setting, i.e. target h = 50).
    Gradient w.r.t. h: ``−2 (1/(2β) − h)`` (Corollary 3.2).
    """

    def __init__(self, beta: float = 0.01):
        super().__init__(beta)

    def loss_of_ratio(self, h: torch.Tensor) -> torch.Tensor:
        return (h - 1 / (2 * self.beta)) ** 2
