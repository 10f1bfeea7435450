"""AOT (Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport")."""
from __future__ import annotations

import torch

from .base import PreferenceLoss
from .dpo import check_label_smoothing, smoothed_sigmoid_loss
from .registry import register_loss


class _SortedLoss(PreferenceLoss):
    """DPO's smoothed sigmoid loss on the difference of two *sorted* batch vectors: AOT compares the
    distributions of two quantities over the batch (first-order stochastic dominance, solved by 1-D optimal
    transport = sorting) instead of pair by pair. The loss is a batch statistic: its [B] per-sample terms
    belong to the k-th order statistics, not to sample k; with ``pair_logps(gather=True)`` the batch
    is the global one. Gradient of term k w.r.t. its sorted difference δ_k: ``−β σ(−βδ_k)`` (ε = 0).
    """

    def __init__(self, beta: float = 1.0, label_smoothing: float = 0.0):
        super().__init__(beta)
        self.label_smoothing = check_label_smoothing(label_smoothing, 0.5, upper_open=False)

    def hparams(self):
        return {"beta": self.beta, "label_smoothing": self.label_smoothing}

    def sorted_difference(self, pc, pr, rc, rr) -> torch.Tensor:
        raise NotImplementedError

    def per_sample_losses(self, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                          ref_rejected_logps) -> torch.Tensor:
        delta = self.sorted_difference(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                       ref_rejected_logps)
        return smoothed_sigmoid_loss(delta, self.beta, self.label_smoothing)


@register_loss("aot")
class AOTLoss(_SortedLoss):
    """``δ = sort(log π_θ(y_w) − log π_θ(y_l)) − sort(log π_ref(y_w) − log π_ref(y_l))`` over the batch, loss
    ``−(1−ε) log σ(βδ) − ε log σ(−βδ)`` (TRL's ``aot``): the policy's margins should dominate the reference's.
    Each sorted vector is of per-sample differences, so the partition function cancels (as Lemma 3.1).

    Hyper-parameters: ``beta`` (default 1.0, as DPO; TRL's is 0.1), ``label_smoothing`` ε ∈ [0, 0.5] (0).
    """

    def sorted_difference(self, pc, pr, rc, rr) -> torch.Tensor:
        return torch.sort(pc - pr, dim=0).values - torch.sort(rc - rr, dim=0).values


@register_loss("aot_pair", "aot_unpaired")
class AOTPairLoss(_SortedLoss):
    """``δ = sort(log π_θ(y_w) − log π_ref(y_w)) − sort(log π_θ(y_l) − log π_ref(y_l))`` over the batch, loss
    ``−(1−ε) log σ(βδ) − ε log σ(−βδ)`` (TRL's ``aot_pair``, renamed ``aot_unpaired`` in later TRL; both
    names work): the chosen log-ratios should dominate the rejected ones, with no pairing between them.
    Sorting mixes rows, so log Z(x) of different images does not cancel: the candidate set matters.

    Hyper-parameters: ``beta`` (default 1.0, as DPO; TRL's is 0.1), ``label_smoothing`` ε ∈ [0, 0.5] (0).
    """

    def sorted_difference(self, pc, pr, rc, rr) -> torch.Tensor:
        return torch.sort(pc - rc, dim=0).values - torch.sort(pr - rr, dim=0).values
