"""W_t: exp(t A) for a log-parameterised head W = exp(A); for a dense head U Σ^t Vᵀ on both towers (paper Eq. 16)
or I + t (W − I) on the image tower; and the numbers that say how far W is from orthogonal (App. E)."""
from __future__ import annotations

import math

import torch

from ..checkpoint import CheckpointError
from ..head import check_towers as head_towers_checked
from ..head import exp_head, generator_of, one_linalg_thread


class SurgeryError(CheckpointError):
    """A head or checkpoint the surgery cannot use; the message is one line meant for the user."""


def check_towers(towers: str) -> str:
    """``towers`` if it names where a head can act (``head.check_towers``), else a SurgeryError."""
    try:
        return head_towers_checked(towers)
    except ValueError as e:
        raise SurgeryError(str(e)) from None


def check_head(W) -> torch.Tensor:
    """``W`` as a tensor, or a SurgeryError: it must be a finite, square, floating-point matrix."""
    if not isinstance(W, torch.Tensor):
        raise SurgeryError(f"the head W must be a tensor, got {type(W).__name__}")
    if W.ndim != 2 or W.shape[0] != W.shape[1]:
        raise SurgeryError(f"the head W must be a square matrix, got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise SurgeryError(f"the head W must be floating point, got {W.dtype}")
    if not bool(torch.isfinite(W).all()):
        bad = int((~torch.isfinite(W)).sum())
        raise SurgeryError(f"the head W has {bad} non-finite value(s) (NaN or inf)")
    return W


def scale_head(W: torch.Tensor, t: float, towers: str = "both", log: torch.Tensor | None = None) -> torch.Tensor:
    """W_t for a head acting on ``towers``; same dtype and device as ``W``. t = 1 gives W back, t = 0 the base
    model's similarities, t > 1 strengthens and t < 0 reverses what the head learned.

    - ``log`` given (a log-parameterised head, W = exp(A), ``log`` = A): ``W_t = exp(t A)``, exact for every t:
      W_0 = I, W_{-t} = W_t⁻¹, W_a scaled by b is W_{ab}. On both towers A is symmetric (its symmetric part is
      taken) and exp(t A) = U Σ^t Vᵀ of W, the rule below, without the round trip through W's rounding.
    - a dense W on "both": ``W_t = U Σ^t Vᵀ`` where ``W = U Σ Vᵀ`` (paper Eq. 16). At t = 0 it is the orthogonal
      factor U Vᵀ, which leaves the similarities xᵀ W_tᵀ W_t y = xᵀ V Σ^{2t} Vᵀ y those of the base model. The SVD
      runs in float64 so that a t-sweep does not pile up float32 error.
    - a dense W on "image": ``W_t = I + t (W − I)``. The similarity (W x)ᵀ y sees W's left factor, so U Σ^t Vᵀ
      would not give the base model at t = 0; the straight line does, and moves each similarity linearly in t.
    """
    W = check_head(W)
    t = float(t)
    if not math.isfinite(t):
        raise SurgeryError(f"t must be a finite number, got {t}")
    check_towers(towers)
    if log is not None:
        return _exp_scaled(W, check_head(log), t, towers)
    if towers == "image":
        eye = torch.eye(W.shape[0], dtype=torch.float64, device=W.device)
        return (eye + t * (W.detach().to(torch.float64) - eye)).to(W.dtype)
    with one_linalg_thread(W.shape[0]):
        U, S, Vh = torch.linalg.svd(W.detach().to(torch.float64))
    if t < 0:
        # A singular value that is zero at W's own precision has no finite negative power.
        tol = S.max() * torch.finfo(W.dtype).eps
        if S.min() <= tol:
            raise SurgeryError(f"the head W is singular (smallest singular value {S.min().item():.3g}); "
                               f"t = {t:g} < 0 would invert a zero singular value")
    W_t = (U * S.pow(t)) @ Vh
    W_t = W_t.to(W.dtype)
    if not bool(torch.isfinite(W_t).all()):
        raise SurgeryError(f"W_t has non-finite values at t = {t:g} (singular values {S.min().item():.3g}.."
                           f"{S.max().item():.3g} overflow {W.dtype} when raised to t)")
    return W_t


def _exp_scaled(W: torch.Tensor, log: torch.Tensor, t: float, towers: str) -> torch.Tensor:
    if log.shape != W.shape:
        raise SurgeryError(f"the head's generator is {tuple(log.shape)} but W is {tuple(W.shape)}")
    W_t = exp_head(generator_of(log.to(W.device), towers), t).to(W.dtype)
    if not bool(torch.isfinite(W_t).all()):
        raise SurgeryError(f"W_t = exp(t A) has non-finite values at t = {t:g} (it overflows {W.dtype})")
    return W_t


def head_stats(W: torch.Tensor) -> dict:
    """Singular values and ``‖WᵀW − I‖`` (Frobenius, spectral), as plain Python numbers for JSON."""
    W = check_head(W).detach().to(torch.float64)
    with one_linalg_thread(W.shape[0]):
        singular_values = torch.linalg.svdvals(W)
    residual = W.T @ W - torch.eye(W.shape[0], dtype=W.dtype)
    return {
        "dim": W.shape[0],
        "singular_values": singular_values.tolist(),
        "sigma_max": singular_values.max().item(),
        "sigma_min": singular_values.min().item(),
        "gram_minus_identity_fro": torch.linalg.matrix_norm(residual, ord="fro").item(),
        "gram_minus_identity_spectral": torch.linalg.matrix_norm(residual, ord=2).item(),
        "distance_to_identity_fro": torch.linalg.matrix_norm(W - torch.eye(W.shape[0], dtype=W.dtype)).item(),
    }
