"""The one place that looks through wrappers (DDP, our linear-head stand-in, ``torch.compile``) to the model."""
from __future__ import annotations

from torch import nn

WRAPPER_ATTRS = ("module", "_orig_mod")  # DDP / LocalReplica keep the model in .module, torch.compile in ._orig_mod


def unwrap(model: nn.Module) -> nn.Module:
    """The open_clip model inside any stack of wrappers."""
    for attr in WRAPPER_ATTRS:
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module):
            return unwrap(inner)
    return model
