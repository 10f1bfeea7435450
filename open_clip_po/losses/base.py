"""What every objective shares: the input contract, the policy ratio h (Eq. 8) and TRL's reward metrics."""
from __future__ import annotations

import math

import torch
from torch import nn

from .precision import at_least_float32, autocast_off

__all__ = ["PreferenceLoss", "PairwiseLoss", "policy_ratio", "reward_metrics"]


def policy_ratio(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                 ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor) -> torch.Tensor:
    """Eq. 8, per sample: ``h = (log π_θ(y_w|x) − log π_ref(y_w|x)) − (log π_θ(y_l|x) − log π_ref(y_l|x))``."""
    return (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)


def reward_metrics(beta: float, policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                   ref_chosen_logps: torch.Tensor | None, ref_rejected_logps: torch.Tensor | None
                   ) -> dict[str, torch.Tensor]:
    """TRL's implicit rewards ``β (log π − log π_ref)`` as detached batch means.

    Without a reference (``ref_*`` None, allowed for objectives with ``requires_reference=False``)
    the reference log-prob counts as 0, i.e. the reward is ``β log π``.
    """
    with torch.no_grad():
        chosen = beta * (policy_chosen_logps - (0 if ref_chosen_logps is None else ref_chosen_logps))
        rejected = beta * (policy_rejected_logps - (0 if ref_rejected_logps is None else ref_rejected_logps))
        return {
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "rewards/margins": (chosen - rejected).mean(),
            "rewards/accuracies": (chosen > rejected).to(chosen.dtype).mean(),
        }


def _check_positive(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


class PreferenceLoss(nn.Module):
    """Base of the objectives: validates the four [B] log-prob inputs and adds the reward metrics.

    ``forward(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
    kl=None)`` returns ``{"loss": scalar mean over the batch, "rewards/...": detached means}``.
    Inputs are log-probabilities from a log-softmax over a candidate set (see ``pair_logps``).
    ``kl`` is only used by objectives with ``needs_kl`` (KTO); the others accept and ignore it so
    the trainer can call every objective the same way.

    Class attributes read by the trainer:

    * ``requires_reference``: False → the ref inputs may be None and the reference forward skipped.
    * ``needs_kl``: True → the objective needs KTO's reference point (``kl`` or its mismatched-pair inputs).
    """

    requires_reference: bool = True
    needs_kl: bool = False

    def __init__(self, beta: float):
        super().__init__()
        self.beta = _check_positive("beta", beta)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.hparams().items())

    def hparams(self) -> dict[str, object]:
        """The hyper-parameters this instance was built with."""
        return {"beta": self.beta}

    def _check_inputs(self, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps):
        named = {"policy_chosen_logps": policy_chosen_logps, "policy_rejected_logps": policy_rejected_logps,
                 "ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps}
        if self.requires_reference and (ref_chosen_logps is None or ref_rejected_logps is None):
            raise ValueError(f"{type(self).__name__} needs ref_chosen_logps and ref_rejected_logps "
                             "(requires_reference=True)")
        shape = policy_chosen_logps.shape
        if len(shape) != 1 or shape[0] == 0:
            raise ValueError(f"{type(self).__name__}: log-probs must be non-empty 1-D tensors [B], "
                             f"got policy_chosen_logps of shape {tuple(shape)}")
        for name, value in named.items():
            if value is not None and value.shape != shape:
                raise ValueError(f"{type(self).__name__}: {name} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(shape)} like policy_chosen_logps")

    def prepare_inputs(self, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps):
        """Checked inputs, bf16/fp16 ones upcast to float32 (losses and rewards are never computed in low precision)."""
        self._check_inputs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
        return tuple(map(at_least_float32, (policy_chosen_logps, policy_rejected_logps,
                                            ref_chosen_logps, ref_rejected_logps)))

    def forward(self, policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                ref_chosen_logps: torch.Tensor | None = None, ref_rejected_logps: torch.Tensor | None = None,
                kl: torch.Tensor | float | None = None) -> dict[str, torch.Tensor]:
        logps = self.prepare_inputs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
        with autocast_off(logps[0]):
            out = {"loss": self.per_sample_losses(*logps).mean()}
            out.update(reward_metrics(self.beta, *logps))
        return out

    def per_sample_losses(self, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                          ref_rejected_logps) -> torch.Tensor:
        """Loss of each sample, [B]; ``forward`` takes the mean."""
        raise NotImplementedError


class PairwiseLoss(PreferenceLoss):
    """An objective that is a function of the policy ratio h alone (DPO with the reverse KL, IPO, hinge, robust,
    EXO, DiscoPOP).

    The partition function cancels in h (Lemma 3.1), so these objectives do not depend on which
    candidate set the log-probs were normalised over.
    """

    def per_sample_losses(self, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                          ref_rejected_logps) -> torch.Tensor:
        return self.loss_of_ratio(policy_ratio(policy_chosen_logps, policy_rejected_logps,
                                               ref_chosen_logps, ref_rejected_logps))

    def loss_of_ratio(self, h: torch.Tensor) -> torch.Tensor:
        """Per-sample loss as a function of h [B]."""
        raise NotImplementedError
