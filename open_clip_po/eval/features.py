"""Models and features for evaluation.

Two ways in:
- the model as it is (``model.encode_image`` / ``encode_text``, head included) — for zero-shot and
  the per-epoch hook, so they see exactly what training and open_clip see;
- the *base* features (backbone without the linear head) computed once, then any head matrix
  applied afterwards — for sweeps over t. Exact, because the head is linear and acts after the
  backbone, before normalisation.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip import build_zero_shot_classifier
from torch import nn
from tqdm import tqdm

from open_clip_po.checkpoint import CheckpointError, create_model_from_checkpoint
from open_clip_po.head import generator_of_head, get_linear_head, has_linear_head
from open_clip_po.towers.unwrap import unwrap

from .data import EvalSet, make_loader
from .errors import EvalError

log = logging.getLogger(__name__)


class _DropRandomInitWarning(logging.Filter):
    # open_clip warns "No pretrained weights loaded ... initialized randomly" before we load the checkpoint.
    def filter(self, record):
        return "No pretrained weights loaded" not in record.getMessage()


def load_eval_model(model_name: str, pretrained: str, *, weights: str = "raw", device="cpu"):
    """``(model in eval mode, preprocess_val)`` from a checkpoint file or an open_clip pretrained tag."""

    if model_name not in open_clip.list_models():
        raise EvalError(f"unknown model {model_name!r} (see open_clip.list_models())")
    try:
        if os.path.exists(pretrained) or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
            quiet = _DropRandomInitWarning()
            logging.getLogger().addFilter(quiet)
            try:
                model, _, preprocess = create_model_from_checkpoint(model_name, pretrained, weights, device=device)
            finally:
                logging.getLogger().removeFilter(quiet)
        else:
            if weights != "raw":
                raise EvalError(f"--weights {weights} needs a checkpoint file, not the pretrained tag {pretrained!r}")
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained,
                                                                         device=device)
    except (CheckpointError, EvalError):
        raise
    except (RuntimeError, ValueError, OSError) as e:  # open_clip's unknown tag, head of the wrong size, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EvalError(f"cannot load {pretrained} as {model_name}: {first}") from e
    return model.eval(), preprocess


def head_weight(model: nn.Module) -> torch.Tensor | None:
    return get_linear_head(model).weight.detach() if has_linear_head(model) else None


def head_generator(model: nn.Module) -> torch.Tensor | None:
    """The generator A (W = exp(A)) of a log-parameterised head; None for a dense head or none."""
    return generator_of_head(get_linear_head(model)) if has_linear_head(model) else None


def head_towers(model: nn.Module) -> str:
    """Where the model's head acts ("both" or "image"); "both" for a model without one."""
    return get_linear_head(model).towers if has_linear_head(model) else "both"


def text_side(weight: torch.Tensor | None, towers: str) -> torch.Tensor | None:
    """The head's matrix as the text features see it: W itself, or none when W acts on the image tower only."""
    return weight if towers == "both" else None


def base_encoders(model: nn.Module) -> tuple[Callable, Callable]:
    """The un-headed image and text encoders (un-normalised features)."""
    model = unwrap(model)
    if has_linear_head(model):
        return model.encode_image_base, model.encode_text_base
    return model.encode_image, model.encode_text


def logit_scale(model: nn.Module) -> float:
    return float(unwrap(model).logit_scale.exp().item())


@torch.no_grad()
def encode_images(encode: Callable, eval_set: EvalSet, *, device="cpu", batch_size: int = 64, workers: int = 0,
                  desc: str = "images") -> dict:
    """Run ``encode`` over a set: ``{"features" [N,D] float32, "labels" [N], "written" [N], "skipped"}``."""
    features, labels, written, skipped = [], [], [], 0
    loader = make_loader(eval_set, batch_size=batch_size, workers=workers)
    for images, batch_labels, batch_written, batch_skipped in tqdm(loader, desc=desc, unit="batch", leave=False):
        skipped += batch_skipped
        if images is None:
            continue
        features.append(encode(images.to(device)).float().cpu())
        labels.append(batch_labels)
        written.append(batch_written)
    if skipped:
        log.warning("%s: skipped %d unreadable samples", eval_set.name, skipped)
    if not features:
        raise EvalError(f"no readable images in {eval_set.name} ({skipped} skipped)")
    return {"features": torch.cat(features), "labels": torch.cat(labels), "written": torch.cat(written),
            "skipped": skipped}


def encode_images_normalized(model: nn.Module, eval_set: EvalSet, **kw) -> dict:
    model = unwrap(model)
    return encode_images(lambda x: model.encode_image(x, normalize=True), eval_set, **kw)


def zero_shot_classifier(model: nn.Module, tokenizer, classnames: Sequence[str], templates: Sequence[str],
                         device="cpu") -> torch.Tensor:
    """open_clip's template-averaged classifier [D, C] from the model as it is (head included)."""
    return build_zero_shot_classifier(unwrap(model), tokenizer, list(classnames), list(templates),
                                      num_classes_per_batch=10, device=device).float().cpu()


def apply_head(features: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """``normalize(W f)`` — what the head does to un-normalised backbone features."""
    if weight is not None:
        features = features @ weight.to(features).T
    return F.normalize(features, dim=-1)


class PromptFeatures:
    """Base text features of every prompt, encoded once; classifiers for any head come from them.

    Goes through open_clip's ``build_zero_shot_classifier`` (so template averaging is open_clip's),
    with a tokenizer that maps a prompt to its row and an encoder that applies the head to that row.
    """

    def __init__(self, encode_text_base: Callable, tokenizer, prompts: Sequence[str], device="cpu",
                 batch_size: int = 256):
        self.index = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        unique = list(self.index)
        rows = []
        with torch.no_grad():
            for start in range(0, len(unique), batch_size):
                tokens = tokenizer(unique[start:start + batch_size]).to(device)
                rows.append(encode_text_base(tokens, normalize=False).float().cpu())
        self.features = torch.cat(rows)
        self.weight: torch.Tensor | None = None

    def _tokenize(self, texts):
        return torch.tensor([self.index[t] for t in texts], dtype=torch.long)

    def encode_text(self, rows: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.features[rows.cpu()]
        if self.weight is not None:
            features = features @ self.weight.to(features).T
        return F.normalize(features, dim=-1) if normalize else features

    def raw(self, texts: Sequence[str]) -> torch.Tensor:
        """Un-normalised base features of ``texts`` (all among the prompts given) [len, D]."""
        return self.features[self._tokenize(texts)]

    def classifier(self, classnames: Sequence[str], templates: Sequence[str],
                   weight: torch.Tensor | None) -> torch.Tensor:
        self.weight = weight
        return build_zero_shot_classifier(self, self._tokenize, list(classnames), list(templates),
                                          num_classes_per_batch=None).float()


def class_prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    return [t.format(c) for c in classnames for t in templates]
