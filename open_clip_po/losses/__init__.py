"""Preference objectives for contrastive policies (paper Sec. 3), in pure torch.

* log-probabilities: :func:`policy_logps`, :func:`pair_logps` (batch captions or a fixed candidate set),
  in float32 whatever the autocast dtype
* objectives by name (timm-style registry): :func:`list_losses` (fnmatch wildcards), :func:`get_loss`,
  :func:`loss_hparams`, :func:`register_loss`; DPO (+ f-divergences), IPO, KTO, hinge, robust, ref_free, CE and
  TRL's exo_pair, nca_pair, bco_pair, sppo_hard, aot, aot_pair, apo_zero, apo_down, discopop, simpo, orpo,
  plus any third-party entry point
* weighted mixtures (MPO, RPO = dpo + α·ce): :func:`build_objective`, :func:`parse_hparams`, :func:`parse_weights`
* KTO's reference point: :func:`kto_kl_logps` (TRL's mismatched pairs), :func:`kto_reference_point_exact`
* the regulariser of Eq. 11 and the total loss of Eq. 14: :func:`kl_regulariser`, :func:`total_loss`
* distributed: :func:`gather_features`

Typical step (see docs/losses.md)::

    loss_fn = build_objective("dpo,ce", weights=[1.0, 0.1], hparams={"beta": 1.0})
    pc, pr, pm = pair_logps(img, txt_w, txt_l, scale, gather=True)
    with torch.no_grad():
        rc, rr, rm = pair_logps(ref_img, ref_txt_w, ref_txt_l, ref_scale, gather=True)
    out = loss_fn(pc, pr, rc, rr)
    loss = total_loss(out["loss"], kl_regulariser(...), reg_lambda)

This package imports neither open_clip nor open_clip_train nor open_clip_po.data.
"""
# The objective modules register themselves with the registry on import (``@register_loss``).
from . import aot, apo, bco, ce, discopop, dpo, exo, hinge, ipo, kto, nca, orpo, ref_free, robust, simpo, sppo  # noqa
from .base import PairwiseLoss, PreferenceLoss, policy_ratio, reward_metrics
from .distributed import gather_features, global_moments, is_distributed, mean_across_ranks, world_info
from .kto import kto_kl_logps, kto_reference_point_exact
from .logps import pair_logps, pick, policy_logps
from .mixture import MixtureLoss, build_objective, parse_hparams, parse_spec, parse_weights
from .registry import (GROUP, LossEntryPointError, builtin_losses, get_loss, get_loss_class, is_loss, list_losses,
                       loss_hparams, register_loss)
from .regulariser import categorical_kl, kl_regulariser, total_loss

__all__ = [
    "GROUP", "LossEntryPointError", "MixtureLoss", "PairwiseLoss", "PreferenceLoss", "build_objective",
    "builtin_losses", "categorical_kl", "gather_features", "get_loss", "get_loss_class", "global_moments",
    "is_distributed", "is_loss", "kl_regulariser", "kto_kl_logps", "kto_reference_point_exact", "list_losses",
    "loss_hparams", "mean_across_ranks", "pair_logps", "parse_hparams", "parse_spec", "parse_weights", "pick",
    "policy_logps", "policy_ratio", "register_loss", "reward_metrics", "total_loss", "world_info",
]
