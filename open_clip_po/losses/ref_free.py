"""Reference-free DPO (TRL's ``reference_free=True``): the reference is the uniform policy."""
from __future__ import annotations

import torch

from .base import PreferenceLoss
from .dpo import check_label_smoothing, smoothed_sigmoid_loss
from .registry import register_loss


@register_loss("ref_free")
class RefFreeLoss(PreferenceLoss):
    """DPO with the reference terms dropped: ``h₀ = log π_θ(y_w|x) − log π_θ(y_l|x)``,
    loss ``−(1−ε) log σ(βh₀) − ε log σ(−βh₀)``.

    ``requires_reference = False``: the ref inputs may be None (the trainer can skip the reference
    forward); when given they only enter the reward metrics. Hyper-parameters: ``beta`` (default 1.0),
    ``label_smoothing`` ε ∈ [0, 0.5] (default 0).
    """

    requires_reference = False

    def __init__(self, beta: float = 1.0, label_smoothing: float = 0.0):
        super().__init__(beta)
        self.label_smoothing = check_label_smoothing(label_smoothing, 0.5, upper_open=False)

    def hparams(self):
        return {"beta": self.beta, "label_smoothing": self.label_smoothing}

    def per_sample_losses(self, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                          ref_rejected_logps) -> torch.Tensor:
        return smoothed_sigmoid_loss(policy_chosen_logps - policy_rejected_logps, self.beta, self.label_smoothing)
