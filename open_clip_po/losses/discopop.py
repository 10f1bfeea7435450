"""DiscoPOP (Chris Lu et al. 2024, "Discovering Preference Optimization Algorithms with and for LLMs", Eq. 5)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import PairwiseLoss
from .registry import register_loss


@register_loss("discopop")
class DiscoPOPLoss(PairwiseLoss):
    """The log-ratio modulated loss: with ``x = βh`` and ``m = σ(x/τ)``, ``(1 − m) (−log σ(x)) + m e^{−x}``
    per sample (TRL's ``discopop``): logistic (DPO) for x ≪ 0, exponential for x ≫ 0, blended near 0.

    Hyper-parameters: ``beta`` (default 1.0, as DPO; TRL's is 0.1), ``discopop_tau`` τ > 0 (default 0.05,
    the paper's and TRL's).
    Gradient w.r.t. h: ``β [−(1−m) σ(−x) − m e^{−x} + m (1−m) (e^{−x} − softplus(−x)) / τ]``. The loss is not
    monotone: at θ = ref (h = 0) the gradient is ``β ((1 − log 2)/(4τ) − 3/4)``, which is *positive* for
    τ < (1 − log 2)/3 ≈ 0.102 — with the default τ the loss has a local maximum at βh ≈ 0.07 and a local
    minimum at βh ≈ −0.12, so a policy that starts exactly at its reference first moves h the wrong way
    and can stay there; use τ above that bound (or a warm start) to learn the preference from θ = ref.
    """

    def __init__(self, beta: float = 1.0, discopop_tau: float = 0.05):
        super().__init__(beta)
        if not (isinstance(discopop_tau, (int, float)) and math.isfinite(discopop_tau) and discopop_tau > 0):
            raise ValueError(f"discopop_tau must be a finite number > 0, got {discopop_tau!r}")
        self.discopop_tau = float(discopop_tau)

    def hparams(self):
        return {"beta": self.beta, "discopop_tau": self.discopop_tau}

    def loss_of_ratio(self, h: torch.Tensor) -> torch.Tensor:
        x = self.beta * h
        modulation = torch.sigmoid(x / self.discopop_tau)
        return -F.logsigmoid(x) * (1 - modulation) + torch.exp(-x) * modulation
