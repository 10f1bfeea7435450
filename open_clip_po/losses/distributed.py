"""The one place where features cross ranks.

Semantics follow open_clip's ``gather_features`` with ``local_loss=False, gather_with_grad=False``:
every rank all-gathers the batch, puts its own (autograd-tracked) tensor back in its slot and then
computes the loss over the *global* batch. The loss value is identical on every rank, and the
gradient reaching the local shard equals the gradient of the single-process loss on the
concatenated batch w.r.t. that shard. As in open_clip, DDP then averages parameter gradients over
ranks, so the step uses ``∇L / world_size`` (harmless for Adam-type optimisers; multiply the loss
by the world size if the exact scale matters).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def world_info() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when torch.distributed is unavailable or not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    """True when torch.distributed is initialised with more than one rank."""
    return world_info()[1] > 1


def gather_features(features: torch.Tensor) -> torch.Tensor:
    """Concatenate ``features`` [B, ...] from all ranks along dim 0, rank order, gradient kept for the local shard.

    A no-op (returns ``features`` itself) when torch.distributed is not initialised or the world
    size is 1. Every rank must call it with the same B (as open_clip's loaders with drop_last do);
    unequal sizes raise a one-line ValueError instead of hanging or mis-slicing.
    """
    rank, world_size = world_info()
    if world_size == 1:
        return features
    # on the features' device: NCCL only moves CUDA tensors
    sizes = [torch.zeros(1, dtype=torch.long, device=features.device) for _ in range(world_size)]
    dist.all_gather(sizes, torch.tensor([features.shape[0]], dtype=torch.long, device=features.device))
    sizes = [int(s) for s in sizes]
    if len(set(sizes)) != 1:
        raise ValueError(f"gather_features needs the same batch size on every rank, got {sizes} "
                         "(drop the last incomplete batch)")
    gathered = [torch.empty_like(features) for _ in range(world_size)]
    dist.all_gather(gathered, features.detach().contiguous())
    gathered[rank] = features  # all_gather is not differentiable: the local slot carries the gradient
    return torch.cat(gathered, dim=0)


def mean_across_ranks(value: torch.Tensor) -> torch.Tensor:
    """Detached mean of a scalar over ranks (TRL's ``gather_for_metrics(kl).mean()``); identity on one rank."""
    value = value.detach()
    if not is_distributed():
        return value
    total = value.clone().reshape(1).to(torch.float64)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return (total / dist.get_world_size()).reshape(value.shape).to(value.dtype)


def global_moments(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(mean, variance, count)`` of ``values`` pooled over all ranks, in float64, detached (TRL's
    ``get_global_statistics``: the sums and counts are all-reduced, then the squared deviations from the
    global mean). One rank: ``torch.var_mean(values, unbiased=False)`` and ``values.numel()``."""
    values = values.detach().to(torch.float64).reshape(-1)
    if not is_distributed():
        var, mean = torch.var_mean(values, unbiased=False)
        return mean, var, values.numel()
    sum_and_count = torch.stack([values.sum(), torch.tensor(float(values.numel()), dtype=torch.float64,
                                                            device=values.device)])
    dist.all_reduce(sum_and_count, op=dist.ReduceOp.SUM)
    mean = sum_and_count[0] / sum_and_count[1]
    squared_deviations = ((values - mean) ** 2).sum()
    dist.all_reduce(squared_deviations, op=dist.ReduceOp.SUM)
    return mean, squared_deviations / sum_and_count[1], int(sum_and_count[1].item())
