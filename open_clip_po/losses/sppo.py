"""SPPO, hard-label version (Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment")."""
from __future__ import annotations

import torch

from .base import PreferenceLoss
from .registry import register_loss


@register_loss("sppo_hard")
class SPPOHardLoss(PreferenceLoss):
    """``(r_w − 1/(2β))² + (r_l + 1/(2β))²`` per sample, ``r = log π_θ − log π_ref`` (TRL's ``sppo_hard``).

    SPPO's Eq. 4.7 with the win probability set to 1 for y_w and 0 for y_l: each log-ratio is regressed
    onto its own target ±1/(2β) (IPO regresses only their difference), so the loss is not a function
    of h and the candidate set matters.

    Hyper-parameter: ``beta`` (default 1.0: targets ±0.5; TRL's default 0.1 gives ±5).
    Gradient w.r.t. the log-ratios: chosen ``2 (r_w − 1/(2β))``, rejected ``2 (r_l + 1/(2β))`` (∓1/β at θ = ref).
    """

    def __init__(self, beta: float = 1.0):
        super().__init__(beta)

    def per_sample_losses(self, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                          ref_rejected_logps) -> torch.Tensor:
        target = 0.5 / self.beta
        chosen = policy_chosen_logps - ref_chosen_logps
        rejected = policy_rejected_logps - ref_rejected_logps
        return (chosen - target) ** 2 + (rejected + target) ** 2
