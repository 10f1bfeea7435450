"""DPO (paper Eq. 5) with cDPO label smoothing."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import PairwiseLoss


def check_label_smoothing(value: float, upper: float, upper_open: bool) -> float:
    ok = isinstance(value, (int, float)) and 0 <= value and (value < upper if upper_open else value <= upper)
    if not ok:
        raise ValueError(f"label_smoothing must be in [0, {upper}{')' if upper_open else ']'}, got {value!r}")
    return float(value)


class DPOLoss(PairwiseLoss):
    """``−(1−ε) log σ(βh) − ε log σ(−βh)`` per sample (ε = label_smoothing; ε = 0 is Eq. 5).

    Hyper-parameters: ``beta`` (default 1.0, the paper's typographic setting), ``label_smoothing``
    ε ∈ [0, 0.5] (cDPO, the probability that a preference label is flipped; default 0).
    Gradient w.r.t. h at ε = 0: ``−β σ(−βh)`` (Corollary 3.2).
    """

    def __init__(self, beta: float = 1.0, label_smoothing: float = 0.0):
        super().__init__(beta)
        self.label_smoothing = check_label_smoothing(label_smoothing, 0.5, upper_open=False)

    def hparams(self):
        return {"beta": self.beta, "label_smoothing": self.label_smoothing}

    def loss_of_ratio(self, h: torch.Tensor) -> torch.Tensor:
        eps = self.label_smoothing
        return -(1 - eps) * F.logsigmoid(self.beta * h) - eps * F.logsigmoid(-self.beta * h)
