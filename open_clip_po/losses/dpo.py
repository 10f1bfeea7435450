"""DPO (paper Eq. 5) with cDPO label smoothing and TRL's f-divergence variants."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import PairwiseLoss
from .fdivergence import check_f_divergence, f_divergence_logits
from .registry import register_loss


def check_label_smoothing(value: float, upper: float, upper_open: bool) -> float:
    ok = isinstance(value, (int, float)) and 0 <= value and (value < upper if upper_open else value <= upper)
    if not ok:
        raise ValueError(f"label_smoothing must be in [0, {upper}{')' if upper_open else ']'}, got {value!r}")
    return float(value)


def smoothed_sigmoid_loss(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """``−(1−ε) log σ(β·logits) − ε log σ(−β·logits)``: TRL's ``sigmoid`` loss (ε = 0: DPO)."""
    return (-(1 - label_smoothing) * F.logsigmoid(beta * logits)
            - label_smoothing * F.logsigmoid(-beta * logits))


@register_loss("dpo", "sigmoid")
class DPOLoss(PairwiseLoss):
    """``−(1−ε) log σ(βh) − ε log σ(−βh)`` per sample (ε = label_smoothing; ε = 0 is Eq. 5).

    Hyper-parameters: ``beta`` (default 1.0, the paper's typographic setting; TRL's is 0.1),
    ``label_smoothing`` ε ∈ [0, 0.5] (cDPO, the probability that a preference label is flipped; default 0),
    ``f_divergence_type`` (``reverse_kl`` default = DPO, ``js_divergence``, ``alpha_divergence``) and
    ``f_alpha_divergence_coef`` α > 0 (default 1.0): h is then replaced by the f-divergence logit of
    ``fdivergence.py`` (Wang et al. 2023), which depends on each log-ratio, not on h alone.
    Gradient w.r.t. h at ε = 0 (reverse KL): ``−β σ(−βh)`` (Corollary 3.2). Also registered as
    ``sigmoid``, TRL's ``loss_type`` for it.
    """

    def __init__(self, beta: float = 1.0, label_smoothing: float = 0.0, f_divergence_type: str = "reverse_kl",
                 f_alpha_divergence_coef: float = 1.0):
        super().__init__(beta)
        self.label_smoothing = check_label_smoothing(label_smoothing, 0.5, upper_open=False)
        self.f_divergence_type, self.f_alpha_divergence_coef = check_f_divergence(
            f_divergence_type, f_alpha_divergence_coef)

    def hparams(self):
        return {"beta": self.beta, "label_smoothing": self.label_smoothing,
                "f_divergence_type": self.f_divergence_type, "f_alpha_divergence_coef": self.f_alpha_divergence_coef}

    def per_sample_losses(self, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                          ref_rejected_logps) -> torch.Tensor:
        if self.f_divergence_type == "reverse_kl":
            return super().per_sample_losses(policy_chosen_logps, policy_rejected_logps,
                                             ref_chosen_logps, ref_rejected_logps)
        return self.loss_of_ratio(f_divergence_logits(
            policy_chosen_logps - ref_chosen_logps, policy_rejected_logps - ref_rejected_logps,
            self.f_divergence_type, self.f_alpha_divergence_coef))

    def loss_of_ratio(self, h: torch.Tensor) -> torch.Tensor:
        return smoothed_sigmoid_loss(h, self.beta, self.label_smoothing)
