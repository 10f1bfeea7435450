"""Checkpoint format: open_clip's own, plus our keys outside ``state_dict``.

Written by ``open_clip_po.main`` (``logs/NAME/checkpoints/epoch_N.pt``, ``epoch_latest.pt``)::

    {
      "epoch": int, "name": str, "optimizer": ..., "scaler": ...,   # open_clip's keys
      "state_dict": {...},          # the stock open_clip model ("module." prefix under DDP), never the head
      "po_head": {"weight": W},     # only with --po-linear-head: W [D, D], features f -> W f before normalising
      "po_average": {               # only with --po-average bma|ema
          "kind": "bma" | "ema",
          "state_dict": {...},      # averaged stock model weights (no "module." prefix)
          "po_head": {"weight": W_avg},   # only with a head
          "state": {...},           # the averager's counters, for resume
      },
      "po_version": "0.1.0",
    }

Keeping the head out of ``state_dict`` means every checkpoint loads in stock
``open_clip.create_model_and_transforms(name, pretrained=path)`` (without the head);
``open_clip_po.svd_scale`` folds the head in when it should count.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .atomic import atomic_path

HEAD_KEY = "po_head"
AVERAGE_KEY = "po_average"
WEIGHT_CHOICES = ("raw", "bma", "ema")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line meant for the user."""


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load with ``weights_only=True``; a bare state dict is wrapped as ``{"state_dict": ...}``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, pickle with non-tensor objects, ...
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}".splitlines()[0]) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    if "state_dict" not in obj:
        obj = {"state_dict": obj}
    return obj


def strip_module_prefix(state_dict: dict) -> dict:
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def model_weights(checkpoint: dict, weights: str = "raw", path: str = "checkpoint"):
    """``(state_dict, head_weight or None)`` for ``weights`` in raw|bma|ema, without "module." prefixes."""
    if weights not in WEIGHT_CHOICES:
        raise CheckpointError(f"--weights must be one of {', '.join(WEIGHT_CHOICES)}, got {weights!r}")
    source = checkpoint
    if weights != "raw":
        average = checkpoint.get(AVERAGE_KEY)
        if average is None:
            raise CheckpointError(f"{path} has no averaged weights (train with --po-average {weights})")
        if average.get("kind") != weights:
            raise CheckpointError(f"{path} holds {average.get('kind')} weights, not {weights}")
        source = average
    state_dict = strip_module_prefix(source["state_dict"])
    head = source.get(HEAD_KEY)
    return state_dict, (None if head is None else head["weight"])


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename: never a half-written file."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def create_model_from_checkpoint(model_name: str, path: str | os.PathLike, weights: str = "raw",
                                 device="cpu", **create_kwargs):
    """An open_clip model with the checkpoint's weights and, if it has one, its linear head attached.

    Returns ``(model, preprocess_train, preprocess_val)`` like ``open_clip.create_model_and_transforms``.
    """
    import open_clip

    from .head import attach_linear_head

    checkpoint = load_checkpoint(path)
    state_dict, head = model_weights(checkpoint, weights, str(path))
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        model_name, device=device, **create_kwargs)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise CheckpointError(f"{path} does not fit model {model_name}: {first}") from e
    if head is not None:
        attach_linear_head(model, head.to(device))
    return model, preprocess_train, preprocess_val
