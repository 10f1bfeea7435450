"""The frozen reference π_ref: one strategy per way its features are obtained.

Every strategy answers ``step_features(model, images, texts, need_reference, keys)`` with the policy's and the
reference's :class:`Features` for one step (or ``None`` for the reference when it is not needed), so the
criterion never asks which kind it has:

- :class:`FrozenCopyReference` — a frozen model: by default a copy of the policy taken right after open_clip
  builds it (before resume, locking, the head or DDP touch it), or ``--po-ref-model/--po-ref-pretrained``. Its
  text features are memoised per caption (:class:`TextFeatureCache`): the reference is frozen, so a caption's
  features never change, and PO data repeats captions from step to step. Exact; bounded; keyed by token ids and
  the autocast state. It can follow the policy (TR-DPO: ``θ_ref ← α θ + (1 − α) θ_ref``, :meth:`sync_from`).
- :class:`SharedTextReference` — the same, when the text tower is locked and shared: the reference's text
  features are the policy's (one text forward per step).
- :class:`HeadBaseReference` — linear-head mode: the reference is the policy's own backbone without W, so one
  frozen backbone pass serves both and no second model exists.
- :class:`CachedReference` — ``--po-ref-cache DIR``: features computed once ahead of training
  (``open_clip_po.ref_cache``), joined to the batch by sample key and caption; no reference model at all.

A reference is in eval mode, has ``requires_grad`` off and is never DDP-wrapped.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .head import get_linear_head
from .towers.attention_layout import contiguous_attention_under_autocast
from .towers.unwrap import unwrap


class Features(NamedTuple):
    """L2-normalised image and text features and the exponentiated logit scale of one model."""
    image: torch.Tensor
    text: torch.Tensor
    scale: torch.Tensor

    def detach(self) -> "Features":
        return Features(self.image.detach(), self.text.detach(), self.scale.detach())


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
    """Eval mode, no gradients, and under autocast the policy's GEMM layout for its attention (see
    attention_layout): what every frozen model that stands for π_ref needs."""
    model.eval()
    model.requires_grad_(False)
    contiguous_attention_under_autocast(model)
    return model


def policy_features(model: nn.Module, images: torch.Tensor, texts: torch.Tensor) -> Features:
    """The policy's forward (through DDP when wrapped, so DDP sees exactly one forward per backward)."""
    out = model(images, texts)
    return Features(out["image_features"], out["text_features"], out["logit_scale"])


class FrozenCopyReference:
    """A frozen open_clip model as π_ref."""

    holds_model = True

    def __init__(self, model: nn.Module, text_cache_size: int = 8192):
        self.model = freeze(model)
        self.text_cache = TextFeatureCache(text_cache_size)

    @torch.no_grad()
    def features(self, images: torch.Tensor, texts: torch.Tensor,
                 policy_text_features: torch.Tensor | None = None) -> Features:
        """π_ref's normalised, detached features."""
        self.model.eval()  # open_clip's train() calls never reach it, but be sure dropout stays off
        image = self.model.encode_image(images, normalize=True)
        text = self._text_features(texts, policy_text_features)
        return Features(image, text, self.model.logit_scale.exp())

    def _text_features(self, texts, policy_text_features):
        return self.text_cache.features(texts, lambda t: self.model.encode_text(t, normalize=True))

    def step_features(self, model, images, texts, need_reference: bool = True, keys=None):
        policy = policy_features(model, images, texts)
        return policy, (self.features(images, texts, policy.text) if need_reference else None)

    @torch.no_grad()
    def sync_from(self, policy: nn.Module, alpha: float) -> None:
        """TR-DPO's soft update ``θ_ref ← α θ + (1 − α) θ_ref`` (floating-point entries; α = 1 copies)."""
        live = unwrap(policy).state_dict()
        for name, value in self.model.state_dict().items():
            if value.is_floating_point():
                value.mul_(1 - alpha).add_(live[name].detach().to(value.dtype), alpha=alpha)
        self.text_cache.clear()  # memoised features belong to the old weights

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.model.load_state_dict(state_dict)
        self.text_cache.clear()

    def parameters(self):
        return list(self.model.parameters())


class SharedTextReference(FrozenCopyReference):
    """A frozen copy whose text tower is the policy's own, locked one: its text features are reused."""

    def _text_features(self, texts, policy_text_features):
        if policy_text_features is None:
            return super()._text_features(texts, None)
        return policy_text_features.detach()


class HeadBaseReference:
    """Linear-head mode: π_ref is the policy's backbone without W; only W sees gradients."""

    holds_model = False
    model = None

    def step_features(self, model, images, texts, need_reference: bool = True, keys=None):
        core = unwrap(model)
        with torch.no_grad():
            base_image = core.encode_image_base(images, normalize=False)
            base_text = core.encode_text_base(texts, normalize=False)
        head = get_linear_head(core)
        scale = core.logit_scale.exp()
        policy = Features(F.normalize(head(base_image), dim=-1), F.normalize(head.text(base_text), dim=-1), scale)
        reference = Features(F.normalize(base_image, dim=-1), F.normalize(base_text, dim=-1), scale.detach())
        return policy, reference

    def parameters(self):
        return []


class CachedReference:
    """π_ref's features read from a cache computed ahead of training (``open_clip_po.ref_cache``): no reference
    model in memory and no reference forward. Joined by sample key (images) and by caption tokens (texts)."""

    holds_model = False
    model = None

    def __init__(self, cache):
        self.cache = cache

    def step_features(self, model, images, texts, need_reference: bool = True, keys=None):
        policy = policy_features(model, images, texts)
        if not need_reference:
            return policy, None
        if keys is None or len(keys) != images.shape[0]:
            raise ValueError("a cached reference needs the batch's sample keys (the triplet reader provides them)")
        scale = torch.tensor(self.cache.logit_scale, device=images.device)
        return policy, Features(self.cache.image_features(keys, images.device), self.cache.text_features(texts), scale)

    def parameters(self):
        return []


def make_reference(model: nn.Module | None = None, *, is_base_of_head: bool = False, shares_text: bool = False,
                   text_cache_size: int = 8192):
    """The strategy for a reference model (``None`` with ``is_base_of_head``: the policy's own backbone)."""
    if is_base_of_head:
        if model is not None:
            raise ValueError("a linear-head reference is the policy's own backbone; pass no model")
        return HeadBaseReference()
    if model is None:
        raise ValueError("a reference needs a model unless it is the policy's own backbone (linear head)")
    kind = SharedTextReference if shares_text else FrozenCopyReference
    return kind(model, text_cache_size)
