"""Float32 numerics for the few small ops of PO, whatever the autocast dtype.

Under ``torch.autocast`` (bf16/fp16) a matmul runs in the low-precision dtype: with logit scale 100 the
rounding of one cosine is ~0.1 in a logit, larger than the early reward margins PO is meant to
measure, and a KL of near-identical distributions comes out negative. The similarity logits,
log-softmaxes, rewards, the KL and KTO's reference point are cheap (B × 2B × D), so they are
computed in float32 (float64 stays float64) with autocast switched off locally — TRL upcasts its
logits to float32 before the log-softmax for the same reason.
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["at_least_float32", "autocast_off"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def at_least_float32(x):
    """``x`` in float32 if it is a float16/bfloat16 tensor, else unchanged (float32/float64, Python numbers)."""
    if isinstance(x, torch.Tensor) and x.dtype in _LOW_PRECISION:
        return x.float()
    return x


def autocast_off(like: torch.Tensor):
    """A context that disables autocast on ``like``'s device type (a no-op where autocast does not exist)."""
    try:
        return torch.autocast(device_type=like.device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know: nothing to switch off
        return contextlib.nullcontext()
