"""Preference objectives for contrastive policies (paper Sec. 3), in pure torch.

* log-probabilities: :func:`policy_logps`, :func:`pair_logps` (batch captions or a fixed candidate set)
* objectives by name: :func:`list_losses`, :func:`get_loss`, :func:`loss_hparams`
  (dpo, ipo, kto, hinge, robust, ref_free, ce + any third-party entry point)
* KTO's reference point: :func:`kto_kl_logps` (TRL's mismatched pairs), :func:`kto_reference_point_exact`
* the regulariser of Eq. 11 and the total loss of Eq. 14: :func:`kl_regulariser`, :func:`total_loss`
* distributed: :func:`gather_features`

Typical step (see docs/losses.md)::

    loss_fn = get_loss("dpo", beta=1.0)
    pc, pr, pm = pair_logps(img, txt_w, txt_l, scale, gather=True)
    with torch.no_grad():
        rc, rr, rm = pair_logps(ref_img, ref_txt_w, ref_txt_l, ref_scale, gather=True)
    out = loss_fn(pc, pr, rc, rr)
    loss = total_loss(out["loss"], kl_regulariser(...), reg_lambda)

This package imports neither open_clip nor open_clip_train nor open_clip_po.data.
"""
from .base import PairwiseLoss, PreferenceLoss, policy_ratio, reward_metrics
from .distributed import gather_features, is_distributed, mean_across_ranks, world_info
from .kto import kto_kl_logps, kto_reference_point_exact
from .logps import pair_logps, pick, policy_logps
from .registry import GROUP, LossEntryPointError, get_loss, get_loss_class, list_losses, loss_hparams
from .regulariser import categorical_kl, kl_regulariser, total_loss

__all__ = [
    "GROUP", "LossEntryPointError", "PairwiseLoss", "PreferenceLoss", "categorical_kl", "gather_features",
    "get_loss", "get_loss_class", "is_distributed", "kl_regulariser", "kto_kl_logps", "kto_reference_point_exact",
    "list_losses", "loss_hparams", "mean_across_ranks", "pair_logps", "pick", "policy_logps", "policy_ratio",
    "reward_metrics", "total_loss", "world_info",
]
