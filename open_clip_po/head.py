"""The learnable linear head W of paper Sec. 3.4.

One matrix W (D×D, identity at init) acts on the features before L2 normalisation: ``f ↦ W f``
(``features @ W.T``). With W = I the model is the base model, so the reference is simply the same
backbone without W and costs nothing extra. Where W acts is the head's ``towers``:

- ``"both"`` (the paper's head): on the image and the text features, so the similarity is
  ``xᵀ WᵀW y`` — a positive semi-definite form, scaled after training as W_t = U Σ^t Vᵀ. It can weaken or
  erase a concept whose image and caption directions are nearly parallel, but not reverse it: reversing
  needs ``Δxᵀ WᵀW Δy < 0``, impossible when the caption direction Δy is a positive mix of the image
  directions, which is where contrastive pre-training puts it.
- ``"image"``: on the image features only, similarity ``(W x)ᵀ y`` — an indefinite form that can map
  the image direction onto the opposite caption direction; scaled as W_t = I + t (W − I).

The head is attached to an open_clip model *instance* as the submodule ``po_head`` and wraps the
instance's ``encode_image``/``encode_text``; ``model.forward`` calls those, so DDP, open_clip's
trainer and zero-shot code all see the head. Checkpoints store W outside the stock ``state_dict``
(see ``open_clip_po.checkpoint``), so a head checkpoint still loads in stock open_clip.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from .towers.unwrap import unwrap

HEAD_ATTR = "po_head"  # the submodule's name on the model, and the checkpoint key that stores W
HEAD_PARAM = f"{HEAD_ATTR}.weight"  # W's name in the model's state_dict
TOWERS = ("both", "image")  # where W acts; see the module docstring


def check_towers(towers: str) -> str:
    if towers not in TOWERS:
        raise ValueError(f"head towers must be one of {', '.join(TOWERS)}, got {towers!r}")
    return towers


class LinearHead(nn.Module):
    def __init__(self, dim: int, weight: torch.Tensor | None = None, towers: str = "both"):
        super().__init__()
        self.towers = check_towers(towers)
        init = torch.eye(dim) if weight is None else weight.detach().clone().float()
        if init.shape != (dim, dim):
            raise ValueError(f"linear head must be {dim}x{dim}, got {tuple(init.shape)}")
        self.weight = nn.Parameter(init)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(features, self.weight.to(features.dtype))

    def text(self, features: torch.Tensor) -> torch.Tensor:
        """W on text features when the head acts on both towers; else the features as they are."""
        return self(features) if self.towers == "both" else features

    def extra_repr(self) -> str:
        return f"dim={self.weight.shape[0]}, towers={self.towers}"


def embed_dim_of(model: nn.Module) -> int:
    """Output feature dimension of an open_clip model (CLIP or CustomTextCLIP)."""
    text_projection = getattr(model, "text_projection", None)
    if isinstance(text_projection, nn.Parameter):
        return text_projection.shape[1]
    if isinstance(text_projection, nn.Linear):
        return text_projection.out_features
    visual = getattr(model, "visual", None)
    if visual is not None and getattr(visual, "output_dim", None):
        return int(visual.output_dim)
    raise ValueError(f"cannot tell the embedding dimension of {type(model).__name__}")


def has_linear_head(model: nn.Module) -> bool:
    return isinstance(getattr(unwrap(model), HEAD_ATTR, None), LinearHead)


def get_linear_head(model: nn.Module) -> LinearHead:
    head = getattr(unwrap(model), HEAD_ATTR, None)
    if not isinstance(head, LinearHead):
        raise ValueError("model has no linear head (attach one with attach_linear_head)")
    return head


def attach_linear_head(model: nn.Module, weight: torch.Tensor | None = None, towers: str = "both") -> LinearHead:
    """Give ``model`` a head W (identity unless ``weight``) acting on ``towers``; returns it."""
    model = unwrap(model)
    if has_linear_head(model):
        raise ValueError("model already has a linear head")
    param = next(model.parameters())
    head = LinearHead(embed_dim_of(model), weight, towers).to(param.device)
    setattr(model, HEAD_ATTR, head)
    # Keep the un-headed encoders reachable: they are the reference in linear-head mode. The wrappers reach them
    # through the instance, not a closure, so that a deep copy of the model runs its own backbone.
    model.encode_image_base, model.encode_text_base = model.encode_image, model.encode_text

    def encode_image(self, image, normalize: bool = False):
        features = getattr(self, HEAD_ATTR)(self.encode_image_base(image, normalize=False))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text, normalize: bool = False):
        features = getattr(self, HEAD_ATTR).text(self.encode_text_base(text, normalize=False))
        return F.normalize(features, dim=-1) if normalize else features

    model.encode_image = types.MethodType(encode_image, model)
    model.encode_text = types.MethodType(encode_text, model)
    return head
