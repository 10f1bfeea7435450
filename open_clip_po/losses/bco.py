"""BCO on pairs (Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment")."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import PreferenceLoss, reward_metrics
from .distributed import global_moments
from .precision import autocast_off
from .registry import register_loss


@register_loss("bco_pair")
class BCOPairLoss(PreferenceLoss):
    """``−log σ(r_w − δ) − log σ(−(r_l − δ))`` per sample, ``r = β (log π_θ − log π_ref)`` (TRL's ``bco_pair``):
    a binary classifier of desirable (y_w) vs undesirable (y_l) with logit ``r − δ``.

    δ is the running mean of the batch-mean reward ``mean(r_w ∪ r_l)``, kept as TRL's ``RunningMoments``
    does (Welford's update, starting from mean 0, variance 1 and count 1e-24, one observation per rank
    per step, so δ is the average of all batch means so far) and updated *before* it is used, on every
    call in training mode (``.eval()`` freezes it; TRL also updates during evaluation). Under
    torch.distributed the batch statistics are pooled over ranks (``global_moments``), so δ is identical
    everywhere. δ lives in buffers (``running_mean``, ``running_var``, ``running_count``, float64): save the
    objective's ``state_dict`` with a checkpoint to resume it. Output adds ``"delta"``.
    Not a function of h (each reward is compared with δ), so the candidate set matters.

    Hyper-parameter: ``beta`` (default 1.0, as DPO; TRL's is 0.1).
    Gradient w.r.t. the log-ratios: chosen ``−β σ(δ − r_w)``, rejected ``β σ(r_l − δ)`` (δ is detached).
    """

    def __init__(self, beta: float = 1.0):
        super().__init__(beta)
        self.register_buffer("running_mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("running_var", torch.ones((), dtype=torch.float64))
        self.register_buffer("running_count", torch.full((), 1e-24, dtype=torch.float64))

    @torch.no_grad()
    def update_baseline(self, batch_reward: torch.Tensor) -> None:
        """TRL's ``RunningMoments.update`` with this step's (rank-pooled) batch-mean rewards."""
        mean, var, count = global_moments(batch_reward)
        mean, var = mean.to(self.running_mean.device), var.to(self.running_mean.device)
        delta = mean - self.running_mean
        total = self.running_count + count
        old_sum = self.running_var * self.running_count + delta ** 2 * self.running_count * count / total
        self.running_mean += delta * count / total
        self.running_var.copy_((old_sum + var * count) / total)
        self.running_count.copy_(total)

    def forward(self, policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                ref_chosen_logps: torch.Tensor | None = None, ref_rejected_logps: torch.Tensor | None = None,
                kl: torch.Tensor | float | None = None) -> dict[str, torch.Tensor]:
        pc, pr, rc, rr = self.prepare_inputs(policy_chosen_logps, policy_rejected_logps,
                                             ref_chosen_logps, ref_rejected_logps)
        with autocast_off(pc):
            chosen, rejected = self.beta * (pc - rc), self.beta * (pr - rr)
            if self.training:
                self.update_baseline(torch.cat([chosen, rejected]).mean())
            delta = self.running_mean.to(device=pc.device, dtype=pc.dtype, copy=True)  # the buffer moves on
            losses = -F.logsigmoid(chosen - delta) - F.logsigmoid(-(rejected - delta))
            out = {"loss": losses.mean()}
            out.update(reward_metrics(self.beta, pc, pr, rc, rr))
        out["delta"] = delta.detach()
        return out
