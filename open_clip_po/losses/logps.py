"""Log-probabilities of a contrastive policy (paper Sec. 3.1).

``π(y|x) = softmax_y(s · I(x)ᵀ T(y))`` over a finite candidate set of captions, with ``s`` the
*exponentiated* logit scale (open_clip's ``model(...)["logit_scale"]``). Features are used as given;
open_clip's model outputs are already L2-normalised. Everything goes through ``log_softmax``: no
probability is ever divided or logged. The logits and the log-softmax are computed in float32 (at
least) with autocast off, whatever the autocast dtype of the forward (see ``precision.py``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .distributed import gather_features
from .precision import at_least_float32, autocast_off


def policy_logps(image_features: torch.Tensor, candidate_features: torch.Tensor,
                 logit_scale: torch.Tensor | float) -> torch.Tensor:
    """``log π(y_k | x_b) = log_softmax(s · I Tᵀ)`` as a [B, K] matrix (rows sum to 1 in probability).

    image_features [B, D], candidate_features [K, D], logit_scale: the exponentiated scale s (scalar).
    bf16/fp16 inputs are upcast and the result is float32 (float64 inputs stay float64), also under autocast.
    """
    if image_features.ndim != 2 or candidate_features.ndim != 2:
        raise ValueError(f"policy_logps expects image [B, D] and candidate [K, D] features, got "
                         f"{tuple(image_features.shape)} and {tuple(candidate_features.shape)}")
    if image_features.shape[1] != candidate_features.shape[1]:
        raise ValueError(f"feature dims differ: image {image_features.shape[1]}, "
                         f"candidates {candidate_features.shape[1]}")
    image_features, candidate_features, logit_scale = map(at_least_float32,
                                                          (image_features, candidate_features, logit_scale))
    with autocast_off(image_features):
        return F.log_softmax(logit_scale * image_features @ candidate_features.T, dim=-1)


def pick(logps_matrix: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Entries ``logps_matrix[b, index[b]]`` as a [B] tensor."""
    return logps_matrix.gather(1, index.long().unsqueeze(1)).squeeze(1)


def pair_logps(image_features: torch.Tensor, chosen_features: torch.Tensor | None,
               rejected_features: torch.Tensor | None, logit_scale: torch.Tensor | float,
               candidates: torch.Tensor | None = None, gather: bool = False, *,
               chosen_index: torch.Tensor | None = None, rejected_index: torch.Tensor | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of y_w and y_l for each image, and the full [N, K] log-prob matrix.

    Two candidate sets:

    * **batch captions** (``candidates=None``): pass chosen_features and rejected_features [B, D];
      the candidates are all y_w then all y_l of the batch, ``K = 2N``; row i's y_w is column i and
      its y_l column N + i.
    * **fixed set** (``candidates`` [K, D], e.g. one prompt per class, identical on every rank):
      pass ``chosen_features=None, rejected_features=None`` and the LongTensors ``chosen_index`` /
      ``rejected_index`` [B] (row i's y_w is ``candidates[chosen_index[i]]``).

    ``gather=True`` all-gathers images, captions and indices across ranks first
    (:func:`~open_clip_po.losses.distributed.gather_features`), so ``N = world_size · B`` rows come
    back in rank order on every rank (identical values everywhere; the local rows keep their
    gradient) and the loss computed from them is the global-batch loss. Without it (or on one
    process) ``N = B``.

    Returns ``(chosen_logps [N], rejected_logps [N], logps_matrix [N, K])``.
    """
    if candidates is None:
        if chosen_features is None or rejected_features is None:
            raise ValueError("pair_logps: give chosen_features and rejected_features, or candidates with "
                             "chosen_index/rejected_index")
        if chosen_index is not None or rejected_index is not None:
            raise ValueError("pair_logps: chosen_index/rejected_index only go with candidates=[K, D]")
        if not (image_features.shape[0] == chosen_features.shape[0] == rejected_features.shape[0]):
            raise ValueError(f"pair_logps: batch sizes differ: images {image_features.shape[0]}, "
                             f"chosen {chosen_features.shape[0]}, rejected {rejected_features.shape[0]}")
        if gather:
            image_features = gather_features(image_features)
            chosen_features = gather_features(chosen_features)
            rejected_features = gather_features(rejected_features)
        n = image_features.shape[0]
        matrix = policy_logps(image_features, torch.cat([chosen_features, rejected_features]), logit_scale)
        # diagonals are views: cheaper backward than fancy indexing
        return matrix[:, :n].diagonal(), matrix[:, n:].diagonal(), matrix

    if chosen_features is not None or rejected_features is not None:
        raise ValueError("pair_logps: with candidates=[K, D] pass chosen_features=None, rejected_features=None "
                         "and chosen_index/rejected_index [B]")
    if chosen_index is None or rejected_index is None:
        raise ValueError("pair_logps: candidates=[K, D] needs chosen_index and rejected_index (LongTensors [B])")
    batch, k = image_features.shape[0], candidates.shape[0]
    for name, index in (("chosen_index", chosen_index), ("rejected_index", rejected_index)):
        if index.shape != (batch,):
            raise ValueError(f"pair_logps: {name} must have shape [{batch}], got {tuple(index.shape)}")
        in_range = index.numel() == 0 or 0 <= int(index.min()) <= int(index.max()) < k
        if index.dtype not in (torch.int64, torch.int32) or not in_range:
            raise ValueError(f"pair_logps: {name} must hold integers in [0, {k})")
    if gather:
        image_features = gather_features(image_features)
        chosen_index = gather_features(chosen_index.long())
        rejected_index = gather_features(rejected_index.long())
    matrix = policy_logps(image_features, candidates, logit_scale)
    return pick(matrix, chosen_index), pick(matrix, rejected_index), matrix
