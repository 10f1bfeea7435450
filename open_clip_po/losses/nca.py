"""NCA (Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards")."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import PreferenceLoss
from .registry import register_loss


@register_loss("nca_pair")
class NCAPairLoss(PreferenceLoss):
    """``−log σ(r_w) − ½ log σ(−r_w) − ½ log σ(−r_l)`` per sample, with the rewards ``r = β (log π_θ − log π_ref)``
    (TRL's ``nca_pair``). Each reward is judged on its own, not only their difference: y_w is pulled up in
    absolute terms and y_l pushed down, so the loss is not a function of h and the candidate set matters.

    Hyper-parameter: ``beta`` (default 1.0, as DPO; TRL's is 0.1).
    Gradient w.r.t. the log-ratios: chosen ``β (½ σ(r_w) − σ(−r_w))`` (−β/4 at θ = ref), rejected ``β ½ σ(r_l)``.
    """

    def __init__(self, beta: float = 1.0):
        super().__init__(beta)

    def per_sample_losses(self, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                          ref_rejected_logps) -> torch.Tensor:
        chosen = self.beta * (policy_chosen_logps - ref_chosen_logps)
        rejected = self.beta * (policy_rejected_logps - ref_rejected_logps)
        return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)
