"""A frozen model's self-attention under autocast, fed the contiguous input the policy's forward gives it.

``nn.MultiheadAttention(batch_first=True)`` turns its (N, L, E) input into an (L, N, E) *view* before the
in-projection. With grad on (the policy), torch's ``matmul`` copies that view once and runs one GEMM. Without grad
(a frozen reference) and under autocast, where the fused fast path is off, it does not copy the input: it expands
the in-projection weight to L copies and runs a batched GEMM instead — a transient of L·3E·E elements per layer
(1.6 GB in bf16 for ViT-L/14) and, on CPU, a third of a ViT-B-32 PO step. :func:`contiguous_attention_under_autocast`
makes a frozen model's self-attention make that copy itself under autocast, so it runs the policy's GEMM: the same
rounding as the policy at θ = θ_ref, at the policy's cost. It serves every frozen pass: the online reference, the
reference-cache builder and linear-head mode's backbone. Without autocast, or with grad, nothing changes (torch's
fast path for inference stays available).

It rebinds ``forward`` on the model's own attention instances; their parameters and ``state_dict`` keys stay as
they are, and open_clip's classes are not touched.
"""
from __future__ import annotations

import types

import torch
from torch import nn


def _contiguous_forward(attn: nn.MultiheadAttention, query, key, value, *args, **kwargs):
    self_attention = query is key and key is value
    if not (attn.batch_first and self_attention and query.dim() == 3
            and torch.is_autocast_enabled(query.device.type) and not torch.is_grad_enabled()):
        return type(attn).forward(attn, query, key, value, *args, **kwargs)
    x = query.transpose(0, 1).contiguous()  # (L, N, E), laid out as the policy's folded GEMM reads it
    attn.batch_first = False
    try:
        out, weights = type(attn).forward(attn, x, x, x, *args, **kwargs)
    finally:
        attn.batch_first = True
    return out.transpose(0, 1), weights


def contiguous_attention_under_autocast(model: nn.Module) -> int:
    """Rebind every batch-first ``nn.MultiheadAttention`` in ``model``; returns how many. Idempotent."""
    count = 0
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention) and module.batch_first:
            if "forward" not in vars(module):
                module.forward = types.MethodType(_contiguous_forward, module)
            count += 1
    return count
