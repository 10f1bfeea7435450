"""EXO-pref (Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment", Eq. 16)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import PairwiseLoss
from .registry import register_loss

EXO_MIN_LABEL_SMOOTHING = 1e-3  # TRL's stand-in for ε = 0, where log ε is -inf


@register_loss("exo_pair")
class EXOPairLoss(PairwiseLoss):
    """``KL(q ‖ p_ε)`` between the policy's preference ``q = (σ(βh), σ(−βh))`` and the labels ``p_ε = (1−ε, ε)``:
    ``σ(βh) (log σ(βh) − log(1−ε)) + σ(−βh) (log σ(−βh) − log ε)`` per sample (TRL's ``exo_pair``).

    Hyper-parameters: ``beta`` (default 1.0, as DPO; TRL's is 0.1), ``label_smoothing`` ε ∈ [0, 0.5]
    (default 1e-3; ε = 0 is replaced by 1e-3 as TRL does, since log ε must be finite).
    Gradient w.r.t. h: ``β σ(βh) σ(−βh) (βh − log((1−ε)/ε))``: negative until βh reaches log((1−ε)/ε),
    where EXO stops (it matches the label distribution instead of pushing σ(βh) to 1 as DPO does).
    """

    def __init__(self, beta: float = 1.0, label_smoothing: float = EXO_MIN_LABEL_SMOOTHING):
        super().__init__(beta)
        if not (isinstance(label_smoothing, (int, float)) and 0 <= label_smoothing <= 0.5):
            raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing!r}")
        self.label_smoothing = float(label_smoothing) if label_smoothing > 0 else EXO_MIN_LABEL_SMOOTHING

    def hparams(self):
        return {"beta": self.beta, "label_smoothing": self.label_smoothing}

    def loss_of_ratio(self, h: torch.Tensor) -> torch.Tensor:
        eps, x = self.label_smoothing, self.beta * h
        return (torch.sigmoid(x) * (F.logsigmoid(x) - math.log(1 - eps))
                + torch.sigmoid(-x) * (F.logsigmoid(-x) - math.log(eps)))
