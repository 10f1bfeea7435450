"""The frozen reference π_ref and the cheapest way to get its features.

- Default: a copy of the policy taken right after open_clip builds it — before resume, locking, the head or
  DDP — so it holds exactly the pre-trained weights. ``--ref-model/--ref-pretrained`` build another one.
- Linear-head mode: the reference is the policy's own backbone without W; no second model exists.
- Locked, shared text tower: the reference's text features are the policy's (one text forward per step).
- Otherwise the reference's text features are memoised per caption (``TextFeatureCache``): the reference is
  frozen, so a caption's features never change, and PO data repeats captions from step to step (class prompts,
  class-template y_w / y_l). Exact; bounded; keyed by token ids and the autocast state.

The reference is in eval mode, has ``requires_grad`` off, is never DDP-wrapped and never saved.
"""
from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import nn


class TextFeatureCache:
    """Least-recently-used memo of a frozen text encoder's features, one entry per caption (token row)."""

    def __init__(self, max_entries: int = 8192):
        if max_entries < 0:
            raise ValueError(f"max_entries must be >= 0, got {max_entries}")
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def features(self, texts: torch.Tensor, encode) -> torch.Tensor:
        """``encode(texts)``, running ``encode`` only on the rows not seen before."""
        if self.max_entries == 0:
            return encode(texts)
        # Autocast changes the features' dtype and rounding: features made under one state are not reused in another.
        kind = texts.device.type
        autocast = (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)) if kind in ("cuda", "cpu") \
            else (False, None)
        keys = [(autocast, row.tobytes()) for row in texts.cpu().numpy()]
        missing = [i for i, k in enumerate(keys) if k not in self._entries]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        fresh = {}
        if missing:
            encoded = encode(texts[missing])
            fresh = {keys[i]: f for i, f in zip(missing, encoded)}
        out = torch.stack([fresh[k] if k in fresh else self._entries[k].to(texts.device) for k in keys])
        for k in keys:  # most recently used last
            if k in fresh:
                self._entries[k] = fresh[k]
            self._entries.move_to_end(k)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return out


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


class Reference:
    def __init__(self, model: nn.Module | None, *, is_base_of_head: bool = False, shares_text: bool = False,
                 text_cache_size: int = 8192):
        if model is None and not is_base_of_head:
            raise ValueError("a reference needs a model unless it is the policy's own backbone (linear head)")
        self.model = None if model is None else freeze(model)
        self.is_base_of_head = is_base_of_head
        self.shares_text = shares_text
        self.text_cache = TextFeatureCache(text_cache_size)

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
            text = self.text_cache.features(texts, lambda t: self.model.encode_text(t, normalize=True))
        return image, text, self.model.logit_scale.exp()

    def parameters(self):
        return [] if self.model is None else list(self.model.parameters())
