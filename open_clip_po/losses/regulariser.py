"""The KL regulariser on clean data (paper Eq. 11) and the total loss (Eq. 14)."""
from __future__ import annotations

import torch

from .distributed import gather_features
from .logps import policy_logps
from .precision import at_least_float32, autocast_off

DIRECTIONS = ("forward", "reverse")


_FAR = 20.0  # beyond log(q/p) = 20 the term is q + p (d − 1), dominated by q: no overflow of e^{−d}


def categorical_kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Row-wise ``KL(p ‖ q)`` from log-probabilities [N, K] → [N], in float32 at least, never negative.

    Summed as ``Σ_k p_k (e^{−d_k} + d_k − 1)`` with ``d = log p − log q``: equal to ``Σ_k p_k d_k`` when
    both rows are normalised (it adds ``Σq − Σp = 0``, so the gradient is the KL's too), but every term is
    ≥ 0 (``e^{−d} ≥ 1 − d``), so rounding cannot make the KL of near-identical distributions negative, and
    ``d = 0`` gives exactly 0. Where q ≫ p the term is written ``q + p (d − 1)`` (same value, no overflow).
    For unnormalised inputs it is the generalised KL ``Σ p log(p/q) − p + q``.
    """
    logp, logq = at_least_float32(logp), at_least_float32(logq)
    with autocast_off(logp):
        d = logp - logq
        p = logp.exp()
        near = p * (torch.expm1(-d.clamp(min=-_FAR)) + d)  # clamped: the discarded branch stays finite
        far = logq.exp() + p * (d - 1)
        # the clamp removes the last ulp of rounding below 0 in expm1(−d) + d for |d| < ~1e-7
        return torch.where(d > -_FAR, near, far).clamp(min=0).sum(dim=-1)


def kl_regulariser(policy_image: torch.Tensor, policy_text: torch.Tensor, ref_image: torch.Tensor,
                   ref_text: torch.Tensor, policy_scale: torch.Tensor | float, ref_scale: torch.Tensor | float,
                   direction: str = "forward", gather: bool = False) -> torch.Tensor:
    """Eq. 11: ``E_{x∈D_reg} KL(π_θ(·|x) ‖ π_ref(·|x))``, a scalar.

    The candidate set is the texts given (the D_reg captions of the batch, [M, D]), the images
    [N, D] are the clean D_reg images; policy and reference features come from the two models,
    each with its own exponentiated logit scale. ``direction="forward"`` (default) is the paper's
    ``KL(π_θ ‖ π_ref)``; ``"reverse"`` is ``KL(π_ref ‖ π_θ)``, what the paper's released code
    computed. ``gather=True`` gathers images and texts of all ranks first (global candidate set,
    mean over the global batch; see ``distributed.py``). Zero, with zero gradient, at θ = ref.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if policy_image.shape != ref_image.shape or policy_text.shape != ref_text.shape:
        raise ValueError(f"kl_regulariser: policy and reference shapes differ: images {tuple(policy_image.shape)} vs "
                         f"{tuple(ref_image.shape)}, texts {tuple(policy_text.shape)} vs {tuple(ref_text.shape)}")
    if gather:
        policy_image, policy_text = gather_features(policy_image), gather_features(policy_text)
        ref_image, ref_text = gather_features(ref_image), gather_features(ref_text)
    policy = policy_logps(policy_image, policy_text, policy_scale)
    ref = policy_logps(ref_image, ref_text, ref_scale)
    kl = categorical_kl(policy, ref) if direction == "forward" else categorical_kl(ref, policy)
    return kl.mean()


def total_loss(pref_loss: torch.Tensor, reg_loss: torch.Tensor | None, reg_lambda: float) -> torch.Tensor:
    """Eq. 14: ``L = L_pref + λ_reg · L_reg``; ``reg_loss=None`` (no D_reg batch) gives ``L_pref``."""
    if reg_loss is None:
        return pref_loss
    return pref_loss + reg_lambda * reg_loss
