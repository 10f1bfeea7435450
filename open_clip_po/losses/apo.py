"""APO (D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions", Eqs. 7–8)."""
from __future__ import annotations

import torch

from .base import PreferenceLoss
from .registry import register_loss


class _AnchoredLoss(PreferenceLoss):
    def __init__(self, beta: float = 1.0):
        super().__init__(beta)

    def rewards(self, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps):
        return (self.beta * (policy_chosen_logps - ref_chosen_logps),
                self.beta * (policy_rejected_logps - ref_rejected_logps))


@register_loss("apo_zero")
class APOZeroLoss(_AnchoredLoss):
    """``1 − σ(r_w) + σ(r_l)`` per sample, ``r = β (log π_θ − log π_ref)`` (TRL's ``apo_zero``): for data whose
    y_w is better than what the model already prefers — raise y_w and lower y_l, each in absolute terms.

    Hyper-parameter: ``beta`` (default 1.0, as DPO; TRL's is 0.1).
    Gradient w.r.t. the log-ratios: chosen ``−β σ'(r_w)``, rejected ``+β σ'(r_l)`` (∓β/4 at θ = ref).
    """

    def per_sample_losses(self, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                          ref_rejected_logps) -> torch.Tensor:
        chosen, rejected = self.rewards(policy_chosen_logps, policy_rejected_logps,
                                        ref_chosen_logps, ref_rejected_logps)
        return torch.sigmoid(-chosen) + torch.sigmoid(rejected)  # 1 − σ(a) = σ(−a), without cancellation


@register_loss("apo_down")
class APODownLoss(_AnchoredLoss):
    """``σ(r_w) + 1 − σ(r_w − r_l)`` per sample, ``r = β (log π_θ − log π_ref)`` (TRL's ``apo_down``): for data
    whose y_w is worse than what the model already prefers — lower y_w, and y_l more.

    Hyper-parameter: ``beta`` (default 1.0, as DPO; TRL's is 0.1).
    Gradient w.r.t. the log-ratios: chosen ``β (σ'(r_w) − σ'(r_w − r_l))`` — exactly 0 at θ = ref, where
    the two anchors balance — and rejected ``+β σ'(r_w − r_l)``.
    """

    def per_sample_losses(self, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                          ref_rejected_logps) -> torch.Tensor:
        chosen, rejected = self.rewards(policy_chosen_logps, policy_rejected_logps,
                                        ref_chosen_logps, ref_rejected_logps)
        return torch.sigmoid(chosen) + torch.sigmoid(rejected - chosen)
