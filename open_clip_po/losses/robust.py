"""Robust DPO (Chowdhury et al. 2024; TRL's ``loss_type="robust"``): unbiased under label noise ε."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import PairwiseLoss
from .dpo import check_label_smoothing
from .registry import register_loss


@register_loss("robust")
class RobustDPOLoss(PairwiseLoss):
    """``[−(1−ε) log σ(βh) + ε log σ(−βh)] / (1 − 2ε)`` per sample.

    Hyper-parameters: ``beta`` (default 1.0, as DPO), ``label_smoothing`` ε ∈ [0, 0.5), the assumed
    rate of flipped preference labels (default 0.1: at ε = 0 this is plain DPO, so a robust default
    has to assume some noise).
    """

    def __init__(self, beta: float = 1.0, label_smoothing: float = 0.1):
        super().__init__(beta)
        self.label_smoothing = check_label_smoothing(label_smoothing, 0.5, upper_open=True)

    def hparams(self):
        return {"beta": self.beta, "label_smoothing": self.label_smoothing}

    def loss_of_ratio(self, h: torch.Tensor) -> torch.Tensor:
        eps = self.label_smoothing
        return (-(1 - eps) * F.logsigmoid(self.beta * h) + eps * F.logsigmoid(-self.beta * h)) / (1 - 2 * eps)
