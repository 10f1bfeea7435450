"""ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model")."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import PreferenceLoss, reward_metrics
from .precision import autocast_off
from .registry import register_loss

_LOG_HALF = -math.log(2.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − e^x)`` for x ≤ 0, accurate at both ends (Mächler 2012); x is clamped just below 0, so a
    probability that rounded to 1 gives a large finite value instead of −inf."""
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    # each branch sees only its own range: no inf/nan in the branch torch.where discards (nor in its gradient)
    near_zero = torch.log(-torch.expm1(x.clamp(min=_LOG_HALF)))
    far = torch.log1p(-torch.exp(x.clamp(max=_LOG_HALF)))
    return torch.where(x > _LOG_HALF, near_zero, far)


@register_loss("orpo")
class ORPOLoss(PreferenceLoss):
    """``−log π_θ(y_w|x) − β log σ(log odds_θ(y_w|x) − log odds_θ(y_l|x))`` per sample, with
    ``odds(y|x) = π(y|x) / (1 − π(y|x))`` (TRL's ORPO trainer: NLL plus β times the odds-ratio term).

    The odds are defined for a categorical probability, so ORPO transfers as is to a softmax over
    captions: ``log odds = log π − log(1 − π)``, computed with a stable ``log1mexp``. ORPO's length
    normalisation of sequence log-probs is the identity here (one softmax per caption).
    ``requires_reference = False``. Not a function of h: the odds depend on π itself, so the candidate set
    matters. Output adds TRL's ``nll_loss``, ``log_odds_ratio`` (mean log σ(·)) and ``log_odds_chosen``
    (mean log-odds difference); rewards are ``β log π_θ`` as in TRL.

    Hyper-parameter: ``beta`` λ (default 0.1, the paper's and TRL's).
    Gradient w.r.t. the log-probs: chosen ``−1 − β σ(−d) / (1 − π_w)``, rejected ``β σ(−d) / (1 − π_l)``
    with d the log-odds difference.
    """

    requires_reference = False

    def __init__(self, beta: float = 0.1):
        super().__init__(beta)

    def forward(self, policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                ref_chosen_logps: torch.Tensor | None = None, ref_rejected_logps: torch.Tensor | None = None,
                kl: torch.Tensor | float | None = None) -> dict[str, torch.Tensor]:
        pc, pr, _, _ = self.prepare_inputs(policy_chosen_logps, policy_rejected_logps,
                                           ref_chosen_logps, ref_rejected_logps)
        with autocast_off(pc):
            log_odds = (pc - pr) - (log1mexp(pc) - log1mexp(pr))
            ratio = F.logsigmoid(log_odds)
            nll = -pc
            out = {"loss": (nll - self.beta * ratio).mean()}
            out.update(reward_metrics(self.beta, pc, pr, None, None))
        out.update({"nll_loss": nll.detach().mean(), "log_odds_ratio": ratio.detach().mean(),
                    "log_odds_chosen": log_odds.detach().mean()})
        return out
