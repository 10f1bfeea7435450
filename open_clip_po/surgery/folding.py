"""Fold a head W into the last linear map of the towers it acts on, giving a stock open_clip state dict.

Every tower open_clip builds ends its pooled features with a linear map (or a Parameter used as
one); W acts right after it and before normalisation, so it can be multiplied into that map:

* ``x @ P`` (``visual.proj``, ``text_projection`` as Parameters ``[width, D]``): ``P ← P Wᵀ``;
* ``x Aᵀ + b`` (``nn.Linear``: ModifiedResNet ``attnpool.c_proj``, timm heads, Linear text
  projections): ``A ← W A``, ``b ← W b``.

Towers whose output does not end in such a map (SigLIP's attention pooling ends in a residual MLP,
``proj_type='none'``, HF encoders with an identity projection) cannot take W; we say so in one line.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..checkpoint import strip_module_prefix
from ..head import HEAD_ATTR, generator_of_head, get_linear_head, has_linear_head
from ..towers.unwrap import unwrap
from .scaling import SurgeryError, check_head, check_towers, scale_head


@dataclass(frozen=True)
class Projection:
    """The last linear map of one tower, as found in a state dict."""

    tower: str  # "image" | "text"
    architecture: str  # what built it, for messages
    weight_key: str
    layout: str  # "right": features = x @ P, P [in, D]; "linear": features = x Aᵀ + b, A [D, in]
    bias_key: str | None = None

    def out_dim(self, state_dict: dict) -> int:
        weight = state_dict[self.weight_key]
        return int(weight.shape[1] if self.layout == "right" else weight.shape[0])

    def folded(self, state_dict: dict, W: torch.Tensor) -> dict:
        """The replaced tensors (float64 arithmetic, stored back in each tensor's own dtype)."""
        weight = state_dict[self.weight_key]
        W64 = W.detach().to(device=weight.device, dtype=torch.float64)
        if self.layout == "right":
            new = {self.weight_key: weight.to(torch.float64) @ W64.T}
        else:
            new = {self.weight_key: W64 @ weight.to(torch.float64)}
            if self.bias_key is not None:
                new[self.bias_key] = W64 @ state_dict[self.bias_key].to(torch.float64)
        out = {}
        for key, value in new.items():
            value = value.to(state_dict[key].dtype)
            if not bool(torch.isfinite(value).all()):
                raise SurgeryError(f"folding W into {key} gives non-finite values")
            out[key] = value
        return out


# Checked in order; the first hit is the tower's last linear map. TimmModel's own head comes before
# the trunk's classifier, which timm models carry only when open_clip uses it as the projection.
_IMAGE = (
    ("VisionTransformer", "visual.proj", "right"),
    ("ModifiedResNet", "visual.attnpool.c_proj.weight", "linear"),
    ("TimmModel (linear proj)", "visual.head.proj.weight", "linear"),
    ("TimmModel (mlp proj)", "visual.head.mlp.fc2.weight", "linear"),
    # timm's convention: the classifier is the last layer of forward_head.
    ("TimmModel (trunk classifier)", "visual.trunk.head.weight", "linear"),
    ("TimmModel (trunk classifier)", "visual.trunk.head.fc.weight", "linear"),
    ("TimmModel (trunk classifier)", "visual.trunk.fc.weight", "linear"),
    ("TimmModel (trunk classifier)", "visual.trunk.classifier.weight", "linear"),
)
_TEXT = (
    ("TextTransformer", "text_projection", "right"),
    ("TextTransformer (Linear proj)", "text_projection.weight", "linear"),
    ("TextTransformer", "text.text_projection", "right"),
    ("TextTransformer (Linear proj)", "text.text_projection.weight", "linear"),
    ("HFTextEncoder (linear proj)", "text.proj.weight", "linear"),
    ("HFTextEncoder (mlp proj)", "text.proj.2.weight", "linear"),
)
_CANDIDATES = {"image": _IMAGE, "text": _TEXT}


def describe_tower(state_dict: dict, tower: str) -> str:
    """A best guess at what built a tower, for error messages."""
    keys = state_dict.keys()

    def has(prefix):
        return any(k.startswith(prefix) for k in keys)

    if tower == "image":
        if has("visual.trunk."):
            return "timm image tower (TimmModel)"
        if has("visual.attnpool.") or has("visual.layer1."):
            return "ModifiedResNet"
        if has("visual.transformer."):
            return "VisionTransformer" + ("" if "visual.proj" in keys else " without a projection (proj is None)")
        return "unknown image tower" if has("visual.") else "no image tower (no visual.* keys)"
    if has("text.transformer.embeddings.") or has("text.pooler"):
        return "HFTextEncoder" + ("" if has("text.proj.") else " without a projection (proj is Identity)")
    if has("text.transformer.") or has("transformer.resblocks."):
        return "TextTransformer without a projection (proj_type 'none')"
    return "unknown text tower" if has("text.") else "no text tower"


def find_projection(state_dict: dict, tower: str) -> Projection:
    """The last linear map of ``tower`` ("image" | "text") in an unprefixed state dict."""
    for architecture, weight_key, layout in _CANDIDATES[tower]:
        weight = state_dict.get(weight_key)
        if weight is None:
            continue
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise SurgeryError(f"{weight_key} should be a matrix, got {shape}")
        bias_key = None
        if layout == "linear" and weight_key.endswith(".weight"):
            candidate = weight_key[: -len("weight")] + "bias"
            bias_key = candidate if candidate in state_dict else None
        return Projection(tower, architecture, weight_key, layout, bias_key)
    looked = ", ".join(key for _, key, _ in _CANDIDATES[tower])
    raise SurgeryError(f"unsupported architecture: the {tower} tower ({describe_tower(state_dict, tower)}) has no "
                       f"final linear projection to fold W into (looked for {looked}); use --keep-head")


def embedding_dim(state_dict: dict) -> int | None:
    """The output dimension D of the towers, or None when no known projection is found."""
    state_dict = strip_module_prefix(state_dict)
    for tower in ("image", "text"):
        try:
            return find_projection(state_dict, tower).out_dim(state_dict)
        except SurgeryError:
            continue
    return None


def fold_head(state_dict: dict, W: torch.Tensor, towers: str = "both") -> dict:
    """A new stock open_clip state dict whose normalised features are ``normalise(W f)`` on ``towers``
    ("both", or "image": the text tower is left as it is).

    ``f`` are the (un-normalised) features of the model in ``state_dict``. A ``module.`` prefix is
    dropped; the input is not modified (unchanged tensors are shared with it, not copied).
    """
    check_towers(towers)
    W = check_head(W)
    state_dict = strip_module_prefix(state_dict)
    image, text = find_projection(state_dict, "image"), find_projection(state_dict, "text")
    image_dim, text_dim = image.out_dim(state_dict), text.out_dim(state_dict)
    if image_dim != text_dim:
        raise SurgeryError(f"the image projection {image.weight_key} gives {image_dim} features but the text "
                           f"projection {text.weight_key} gives {text_dim}")
    if W.shape[0] != image_dim:
        raise SurgeryError(f"the head W is {W.shape[0]}x{W.shape[1]} but the model's embedding dimension is "
                           f"{image_dim} ({image.weight_key})")
    out = dict(state_dict)
    out.update(image.folded(state_dict, W))
    if towers == "both":
        out.update(text.folded(state_dict, W))
    return out


def head_model_at(model: nn.Module, W: torch.Tensor | None = None, t: float = 1.0,
                  towers: str | None = None, log: torch.Tensor | None = None) -> nn.Module:
    """A stock copy of ``model`` with ``W_t`` folded in: its normalised features are normalise(W_t f) on the
    head's towers.

    ``model`` is a stock open_clip model or one with a linear head attached (then ``W`` — with ``log``, the
    generator of a log-parameterised head — and ``towers`` default to that head's and ``f`` are its un-headed
    features). ``model`` itself is left as it was.
    """
    base = unwrap(model)
    if W is None:
        head = get_linear_head(base)
        W = head.weight.detach()
        log = generator_of_head(head) if log is None else log
    if towers is None:
        towers = get_linear_head(base).towers if has_linear_head(base) else "both"
    head_prefix = HEAD_ATTR + "."
    state_dict = {k: v for k, v in base.state_dict().items() if not k.startswith(head_prefix)}
    folded = fold_head(state_dict, scale_head(W, t, towers, log), towers)
    stock = copy.deepcopy(base)
    # Undo attach_linear_head on the copy: its wrappers live in the instance __dict__ and shadow
    # the class's encode_image / encode_text.
    stock._modules.pop(HEAD_ATTR, None)
    for attr in ("encode_image", "encode_text", "encode_image_base", "encode_text_base"):
        stock.__dict__.pop(attr, None)
    stock.load_state_dict(folded)
    return stock
