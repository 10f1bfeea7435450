"""KTO (paper Eq. 7) on paired data, with TRL's and an exact estimator of the reference point z."""
from __future__ import annotations

import torch

from .base import PreferenceLoss, reward_metrics
from .distributed import mean_across_ranks
from .logps import pick
from .precision import at_least_float32, autocast_off
from .registry import register_loss
from .regulariser import categorical_kl


def kto_kl_logps(policy_logps_matrix: torch.Tensor, ref_logps_matrix: torch.Tensor,
                 chosen_index: torch.Tensor | None = None, shift: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's mismatched pairs: image i with the y_w of image ``(i − shift) mod N`` (y_w rolled by ``shift``).

    Takes the [N, K] matrices returned by ``pair_logps`` for the policy and the reference and returns
    ``(policy_kl_logps, ref_kl_logps)`` [N] to pass to :class:`KTOLoss`. ``chosen_index`` [N] is the
    column of each row's y_w: omit it for the batch-caption candidate set (y_w of row i is column i),
    pass the same ``chosen_index`` as to ``pair_logps`` for a fixed (class-prompt) set. As in TRL,
    a "mismatched" pair may happen to share its caption (two images of one class); N must be ≥ 2.
    """
    if policy_logps_matrix.shape != ref_logps_matrix.shape or policy_logps_matrix.ndim != 2:
        raise ValueError(f"kto_kl_logps: expected two [N, K] matrices of one shape, got "
                         f"{tuple(policy_logps_matrix.shape)} and {tuple(ref_logps_matrix.shape)}")
    n = policy_logps_matrix.shape[0]
    if n < 2:
        raise ValueError("kto_kl_logps needs at least 2 rows to form mismatched pairs")
    if chosen_index is None:
        chosen_index = torch.arange(n, device=policy_logps_matrix.device)
    if chosen_index.shape != (n,):
        raise ValueError(f"kto_kl_logps: chosen_index must have shape [{n}], got {tuple(chosen_index.shape)}")
    if shift % n == 0:
        raise ValueError(f"kto_kl_logps: shift={shift} pairs every image with its own caption (N={n})")
    mismatched = torch.roll(chosen_index, shifts=shift)
    return pick(policy_logps_matrix, mismatched), pick(ref_logps_matrix, mismatched)


def kto_reference_point_exact(policy_logps_matrix: torch.Tensor, ref_logps_matrix: torch.Tensor) -> torch.Tensor:
    """Exact z for a contrastive policy: detached mean over rows of ``KL(π_θ(·|x) ‖ π_ref(·|x))``
    over the candidate distribution ([N, K] log-prob matrices from ``pair_logps``), averaged across
    ranks, clamped at 0. The paper's code used this KL on clean data; pass it as ``kl=``.
    """
    if policy_logps_matrix.shape != ref_logps_matrix.shape or policy_logps_matrix.ndim != 2:
        raise ValueError(f"kto_reference_point_exact: expected two [N, K] matrices of one shape, got "
                         f"{tuple(policy_logps_matrix.shape)} and {tuple(ref_logps_matrix.shape)}")
    with torch.no_grad():
        z = categorical_kl(policy_logps_matrix.detach(), ref_logps_matrix.detach()).mean()
    return mean_across_ranks(z).clamp(min=0)


@register_loss("kto")
class KTOLoss(PreferenceLoss):
    """KTO on paired data: y_w is a desirable, y_l an undesirable example (TRL's ``kto_loss``).

    With ``r = log π_θ(y|x) − log π_ref(y|x)``:
    desirable ``λ_D (1 − σ(β(r_w − z)))``, undesirable ``λ_U (1 − σ(β(z − r_l)))``; the loss is the
    mean over all 2B terms. (The paper writes ``r_KTO = βr`` and ``z_ref = β KL``; same thing.)

    The reference point z, detached and clamped at 0, comes from exactly one of:

    * ``kl=``: given (scalar or [B]), e.g. :func:`kto_reference_point_exact`;
    * ``policy_kl_logps=`` and ``ref_kl_logps=`` [B]: log-probs of mismatched pairs (x_i, y_j), e.g.
      from :func:`kto_kl_logps`; z = mean(policy − ref), averaged across ranks, as TRL does.

    Neither given → ValueError. Unlike DPO/IPO, KTO depends on the candidate set the log-probs were
    normalised over (the partition functions do not cancel).

    Hyper-parameters: ``beta`` (default 1.5, the paper's KTO setting), ``desirable_weight`` λ_D and
    ``undesirable_weight`` λ_U (default 1.0 each, as TRL). Output adds ``"kl"``, the z used.
    """

    needs_kl = True

    def __init__(self, beta: float = 1.5, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
        super().__init__(beta)
        for name, value in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        self.desirable_weight = float(desirable_weight)
        self.undesirable_weight = float(undesirable_weight)

    def hparams(self):
        return {"beta": self.beta, "desirable_weight": self.desirable_weight,
                "undesirable_weight": self.undesirable_weight}

    def reference_point(self, kl, policy_kl_logps, ref_kl_logps, like: torch.Tensor) -> torch.Tensor:
        """z from ``kl`` or from the mismatched-pair log-probs (see the class docstring)."""
        mismatched_given = policy_kl_logps is not None or ref_kl_logps is not None
        if kl is not None:
            if mismatched_given:
                raise ValueError("KTOLoss: give either kl or policy_kl_logps/ref_kl_logps, not both")
            # a Python float must not pass through float32 on its way in
            z = torch.as_tensor(kl, dtype=like.dtype, device=like.device).detach()
            if z.ndim > 0 and z.shape != like.shape:
                raise ValueError(f"KTOLoss: kl must be a scalar or of shape {tuple(like.shape)}, got {tuple(z.shape)}")
            return z.clamp(min=0)
        if policy_kl_logps is None or ref_kl_logps is None:
            raise ValueError("KTOLoss needs its reference point: pass kl= (e.g. kto_reference_point_exact) or both "
                             "policy_kl_logps and ref_kl_logps (e.g. from kto_kl_logps)")
        if policy_kl_logps.shape != ref_kl_logps.shape or policy_kl_logps.ndim != 1:
            raise ValueError(f"KTOLoss: policy_kl_logps and ref_kl_logps must be 1-D of one shape, got "
                             f"{tuple(policy_kl_logps.shape)} and {tuple(ref_kl_logps.shape)}")
        mismatched = at_least_float32(policy_kl_logps) - at_least_float32(ref_kl_logps)
        return mean_across_ranks(mismatched.detach().mean()).clamp(min=0)

    def forward(self, policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                ref_chosen_logps: torch.Tensor | None = None, ref_rejected_logps: torch.Tensor | None = None,
                kl: torch.Tensor | float | None = None, *, policy_kl_logps: torch.Tensor | None = None,
                ref_kl_logps: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps = self.prepare_inputs(
            policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
        with autocast_off(policy_chosen_logps):
            z = self.reference_point(kl, policy_kl_logps, ref_kl_logps, like=policy_chosen_logps)
            z = z.to(device=policy_chosen_logps.device, dtype=policy_chosen_logps.dtype)
            chosen_logratios = policy_chosen_logps - ref_chosen_logps
            rejected_logratios = policy_rejected_logps - ref_rejected_logps
            # 1 − σ(a) written as σ(−a): exact, and no cancellation when σ(a) ≈ 1
            chosen_losses = torch.sigmoid(-self.beta * (chosen_logratios - z))
            rejected_losses = torch.sigmoid(-self.beta * (z - rejected_logratios))
            losses = torch.cat([self.desirable_weight * chosen_losses, self.undesirable_weight * rejected_losses])
            out = {"loss": losses.mean()}
            out.update(reward_metrics(self.beta, policy_chosen_logps, policy_rejected_logps,
                                      ref_chosen_logps, ref_rejected_logps))
        out["kl"] = z.mean()
        return out
