"""Our objectives in open_clip's loss convention, for open_clip's own trainer (entry-point group ``open_clip.losses``).

open_clip (with ``patches/0001-*.patch``) builds the loss named by ``--loss NAME`` from this group and calls it
as every open_clip loss: ``loss(image_features, text_features, logit_scale, output_dict=True, **rest)`` with the
outputs of ``model(images, texts)``. What that means here:

* **y_w and y_l** travel in the text batch: ``texts = torch.cat([chosen_tokens, rejected_tokens])``, so
  ``text_features`` is [2B, D] for B images — rows 0..B-1 are T(y_w), rows B..2B-1 are T(y_l). A dataloader
  yields ``(images [B,...], texts [2B, L])``; the text tower encodes both in one forward. With
  ``--accum-freq > 1`` open_clip concatenates cached chunks ([w1; l1; w2; l2]), which breaks this layout:
  use accum-freq 1.
* **Candidates** are the 2B captions of the (all-gathered) batch, as in ``open_clip_po.losses.pair_logps``.
* **The reference** is open_clip's distillation teacher: ``--distill-model M --distill-pretrained P`` makes
  open_clip run a frozen copy under ``no_grad`` on the same batch and pass its outputs as ``dist_image_features``,
  ``dist_text_features``, ``dist_logit_scale`` (the patched ``create_loss`` lets ``--loss`` win over the
  distillation loss). Without a teacher the reference is the **uniform policy** over the candidates,
  ``log π_ref = −log K``: DPO/IPO then see ``h = log π_θ(y_w|x) − log π_θ(y_l|x)`` (reference-free; nothing holds
  the model near where it started), KTO's rewards are ``log π_θ + log K`` and its z is KL(π_θ ‖ uniform).
* **Not here**: the KL regulariser on clean data (it needs a second data stream) and the linear head; for those
  use ``python -m open_clip_po.main`` (the plugin's own seam), which works without the upstream patch.

The returned dict holds only the loss term (open_clip sums every value of it into the total loss).
Pure torch: this module imports neither open_clip nor open_clip_train.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .distributed import gather_features
from .kto import kto_reference_point_exact
from .logps import pair_logps
from .registry import builtin_losses, get_loss

__all__ = ["OpenClipPreferenceLoss", "to_open_clip_batch", *builtin_losses()]


class OpenClipPreferenceLoss(nn.Module):
    """``open_clip_po.losses.get_loss(objective, **hparams)`` behind open_clip's loss signature (see module doc).

    ``gather``: all-gather the batch across ranks so the loss is the global-batch loss (as open_clip's ClipLoss
    does by default); a no-op on one process.
    """

    def __init__(self, objective: str, gather: bool = True, **hparams):
        super().__init__()
        self.objective_name = objective
        self.objective = get_loss(objective, **hparams)
        self.gather = bool(gather)

    def _split(self, image_features: torch.Tensor, text_features: torch.Tensor, who: str):
        b = image_features.shape[0]
        if text_features.shape[0] != 2 * b:
            raise ValueError(
                f"{self.objective_name} loss: {who} text_features has {text_features.shape[0]} rows for {b} images; "
                f"expected 2B = {2 * b} (texts = torch.cat([y_w tokens, y_l tokens]), accum-freq 1)")
        return text_features[:b], text_features[b:]

    def _logps(self, image_features, text_features, logit_scale, who):
        chosen, rejected = self._split(image_features, text_features, who)
        if self.gather:
            image_features, chosen, rejected = map(gather_features, (image_features, chosen, rejected))
        # pair_logps' candidates: all y_w then all y_l of the (gathered) batch.
        return pair_logps(image_features, chosen, rejected, logit_scale)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                output_dict: bool = False, dist_image_features: torch.Tensor | None = None,
                dist_text_features: torch.Tensor | None = None, dist_logit_scale: torch.Tensor | None = None,
                **unused):
        # **unused: whatever else the model returns (logit_bias, ...); a CLIP policy has no use for it.
        policy_chosen, policy_rejected, policy_matrix = self._logps(
            image_features, text_features, logit_scale, "policy")
        if dist_image_features is not None and dist_text_features is not None:
            with torch.no_grad():
                scale = logit_scale if dist_logit_scale is None else dist_logit_scale
                ref_chosen, ref_rejected, ref_matrix = self._logps(
                    dist_image_features.detach(), dist_text_features.detach(), scale.detach(), "reference")
        elif self.objective.requires_reference or self.objective.needs_kl:
            # No teacher: the uniform policy over the K candidates.
            k = policy_matrix.shape[1]
            ref_matrix = torch.full_like(policy_matrix, -math.log(k)).detach()
            ref_chosen = ref_rejected = ref_matrix[:, 0]
        else:
            ref_matrix = ref_chosen = ref_rejected = None
        kl = None
        if self.objective.needs_kl:
            kl = kto_reference_point_exact(policy_matrix, ref_matrix)
        out = self.objective(policy_chosen, policy_rejected, ref_chosen, ref_rejected, kl=kl)
        loss = out["loss"]
        return {f"{self.objective_name}_loss": loss} if output_dict else loss


def to_open_clip_batch(batch: dict) -> tuple:
    """A triplet batch of ``open_clip_po.data`` (dict with ``images``, ``chosen``, ``rejected``) as open_clip's
    train loop wants it: ``(images, texts = [chosen; rejected], extra)``, ``extra`` being the rest of the dict.
    The third field relies on the patched ``train_one_epoch`` (``images, texts, *extra = batch``)."""
    missing = [k for k in ("images", "chosen", "rejected") if k not in batch]
    if missing:
        raise KeyError(f"to_open_clip_batch: batch lacks {', '.join(missing)} (has {', '.join(batch)})")
    if batch["chosen"].shape != batch["rejected"].shape:
        raise ValueError(f"to_open_clip_batch: chosen {tuple(batch['chosen'].shape)} and rejected "
                         f"{tuple(batch['rejected'].shape)} token shapes differ")
    extra = {k: v for k, v in batch.items() if k not in ("images", "chosen", "rejected")}
    return batch["images"], torch.cat([batch["chosen"], batch["rejected"]]), extra


def _factory(objective: str):
    def build(**hparams) -> OpenClipPreferenceLoss:
        return OpenClipPreferenceLoss(objective, **hparams)

    build.__name__ = build.__qualname__ = objective
    build.__doc__ = f"open_clip ``--loss {objective}``: OpenClipPreferenceLoss({objective!r}, **loss_kwargs)."
    return build


# The targets of this project's ``open_clip.losses`` entry points (pyproject.toml): one per built-in name.
for _name in builtin_losses():
    globals()[_name] = _factory(_name)
del _name
