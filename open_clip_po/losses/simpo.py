"""SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward")."""
from __future__ import annotations

import math

import torch

from .base import PreferenceLoss
from .dpo import check_label_smoothing, smoothed_sigmoid_loss
from .registry import register_loss


@register_loss("simpo")
class SimPOLoss(PreferenceLoss):
    """``−(1−ε) log σ(βh₀ − γ) − ε log σ(−(βh₀ − γ))`` per sample, ``h₀ = log π_θ(y_w|x) − log π_θ(y_l|x)``
    (TRL's CPO trainer, ``loss_type="simpo"``): a reference-free reward with a target margin γ.

    SimPO's reward is the *length-normalised* sequence log-probability; a contrastive policy scores each
    caption with one softmax over the candidates (one "token"), so the normalisation is the identity and
    ``h₀`` uses the log-probs as they are. ``requires_reference = False``. Like DPO it is a function of
    ``h₀`` alone: log Z(x) cancels and the candidate set does not matter.

    Hyper-parameters: ``beta`` (default 2.0, SimPO's recommended range 2–2.5; TRL's CPOConfig has 0.1),
    ``simpo_gamma`` γ ≥ 0 (default 1.0, γ/β = 0.5 as the paper recommends; TRL's is 0.5),
    ``label_smoothing`` ε ∈ [0, 0.5] (0).
    Gradient w.r.t. h₀ at ε = 0: ``−β σ(γ − βh₀)``.
    """

    requires_reference = False

    def __init__(self, beta: float = 2.0, simpo_gamma: float = 1.0, label_smoothing: float = 0.0):
        super().__init__(beta)
        if not (isinstance(simpo_gamma, (int, float)) and math.isfinite(simpo_gamma) and simpo_gamma >= 0):
            raise ValueError(f"simpo_gamma must be a finite number >= 0, got {simpo_gamma!r}")
        self.simpo_gamma = float(simpo_gamma)
        self.label_smoothing = check_label_smoothing(label_smoothing, 0.5, upper_open=False)

    def hparams(self):
        return {"beta": self.beta, "simpo_gamma": self.simpo_gamma, "label_smoothing": self.label_smoothing}

    def per_sample_losses(self, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                          ref_rejected_logps) -> torch.Tensor:
        logits = (policy_chosen_logps - policy_rejected_logps) - self.simpo_gamma / self.beta
        return smoothed_sigmoid_loss(logits, self.beta, self.label_smoothing)
