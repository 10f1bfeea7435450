"""The frozen reference π_ref and the cheapest way to get its features.

- Default: a copy of the policy taken right after open_clip builds it — before resume, locking, the head or
  DDP — so it holds exactly the pre-trained weights. ``--ref-model/--ref-pretrained`` build another one.
- Linear-head mode: the reference is the policy's own backbone without W; no second model exists.
- Locked, shared text tower: the reference's text features are the policy's (one text forward per step).

The reference is in eval mode, has ``requires_grad`` off, is never DDP-wrapped and never saved.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


class Reference:
    def __init__(self, model: nn.Module | None, *, is_base_of_head: bool = False, shares_text: bool = False):
        if model is None and not is_base_of_head:
            raise ValueError("a reference needs a model unless it is the policy's own backbone (linear head)")
        self.model = None if model is None else freeze(model)
        self.is_base_of_head = is_base_of_head
        self.shares_text = shares_text

    @classmethod
    def copy_of(cls, policy: nn.Module, **kwargs) -> "Reference":
        return cls(copy.deepcopy(policy), **kwargs)

    @torch.no_grad()
    def features(self, images: torch.Tensor, texts: torch.Tensor, policy_text_features: torch.Tensor | None = None):
        """(image features, text features, logit scale) of π_ref, normalised and detached."""
        if self.model is None:
            raise RuntimeError("linear-head reference features come from the policy's backbone (criterion)")
        self.model.eval()  # open_clip's train() calls never reach it, but be sure dropout stays off
        image = self.model.encode_image(images, normalize=True)
        if self.shares_text and policy_text_features is not None:
            text = policy_text_features.detach()
        else:
            text = self.model.encode_text(texts, normalize=True)
        return image, text, self.model.logit_scale.exp()

    def parameters(self):
        return [] if self.model is None else list(self.model.parameters())
