"""Plain cross-entropy fine-tuning on y_w: the paper's baseline (Fig. 5)."""
from __future__ import annotations

import torch

from .base import PreferenceLoss
from .registry import register_loss


@register_loss("ce", "sft")
class CELoss(PreferenceLoss):
    """``−log π_θ(y_w|x)`` per sample: cross-entropy towards y_w over the candidate set.

    This is a cross-entropy only because ``policy_chosen_logps`` already are log-softmax values over
    the candidate set: pass the ``chosen_logps`` of :func:`~open_clip_po.losses.pair_logps` (batch
    captions or class prompts), never raw similarities. ``policy_rejected_logps`` and the ref inputs
    do not enter the loss (y_l is simply one of the candidates, pushed down by the softmax); they
    only feed the reward metrics, which use β = 1 here, i.e. plain log-ratios. No hyper-parameters;
    ``requires_reference = False``. Also registered as ``sft``, TRL's ``loss_type`` for the NLL of y_w
    (MPO's generation term; RPO is ``dpo,ce`` with weights ``1,α``).
    """

    requires_reference = False

    def __init__(self):
        super().__init__(beta=1.0)

    def hparams(self):
        return {}

    def per_sample_losses(self, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                          ref_rejected_logps) -> torch.Tensor:
        return -policy_chosen_logps
