"""Zero-shot predictions of one model on this process's images, and the metrics of the gathered predictions.

The arithmetic is CLIP_benchmark's ``run_classification`` (``100 · normalize(encode_image(x)) @ classifier``
under ``torch.autocast(enabled=amp)``, the classifier from its ``zero_shot_classifier``), batched, so the clean
numbers equal CLIP_benchmark's own evaluation image for image; only each image's top-5 classes and argmax are
kept. The metrics use its result keys: ``acc1``, ``acc5`` (NaN below 5 classes, as there),
``mean_per_class_recall`` (scikit-learn's ``balanced_accuracy_score``, as there); ``written_rate`` is the
fraction of images with a known written class whose prediction is that class.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data import NO_WRITTEN_CLASS
from ..errors import EvalError
from .samples import collate

SPLIT_OF_VIEW = {"clean": "clean", "attacked": "typographic", "real": "typographic"}


@torch.no_grad()
def predict(model, classifier: torch.Tensor, samples, views: Sequence[str], *, device: str, amp: bool = False,
            batch_size: int = 64, workers: int = 0, desc: str = "", show: bool = True,
            on_batch: Callable[[dict], None] | None = None) -> dict:
    """This process's predictions: ``index``, ``label``, ``written``, per view ``argmax`` and ``topk`` [N, ≤5],
    and ``skipped`` (unreadable images)."""
    device_type = torch.device(device).type
    k = min(5, classifier.shape[1])
    out = {"index": [], "label": [], "written": [], "skipped": 0,
           "argmax": {v: [] for v in views}, "topk": {v: [] for v in views}}
    loader = DataLoader(samples, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate)
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not show, leave=False):
        out["skipped"] += batch["skipped"]
        if batch["views"] is None:
            continue
        for position, view in enumerate(views):
            images = batch["views"][:, position].to(device)
            with torch.autocast(device_type, enabled=amp):
                logits = 100.0 * F.normalize(model.encode_image(images), dim=-1) @ classifier
            logits = logits.float().cpu()
            out["argmax"][view].append(logits.argmax(dim=1))
            out["topk"][view].append(logits.topk(k, dim=1).indices)
        for name in ("index", "label", "written"):
            out[name].append(batch[name])
        if on_batch is not None:
            on_batch(batch)
    for name in ("index", "label", "written"):
        out[name] = torch.cat(out[name]) if out[name] else torch.zeros(0, dtype=torch.long)
    for name, shape in (("argmax", (0,)), ("topk", (0, k))):  # a process may have no image at all
        out[name] = {v: torch.cat(t) if t else torch.zeros(shape, dtype=torch.long) for v, t in out[name].items()}
    return out


def merge(parts: list[dict], name: str) -> dict:
    """The predictions of all processes, in image order; each image must come exactly once."""
    merged = {key: torch.cat([p[key] for p in parts]) for key in ("index", "label", "written")}
    merged["skipped"] = sum(p["skipped"] for p in parts)
    for key in ("argmax", "topk"):
        merged[key] = {v: torch.cat([p[key][v] for p in parts]) for v in parts[0][key]}
    order = torch.argsort(merged["index"])
    if order.numel() and torch.unique(merged["index"]).numel() != order.numel():
        raise EvalError(f"{name}: an image was evaluated twice across processes (data split broken)")
    for key in ("index", "label", "written"):
        merged[key] = merged[key][order]
    for key in ("argmax", "topk"):
        merged[key] = {v: t[order] for v, t in merged[key].items()}
    return merged


def metrics(label: torch.Tensor, argmax: torch.Tensor, topk: torch.Tensor, written: torch.Tensor | None,
            num_classes: int, skipped: int) -> dict:
    from sklearn.metrics import balanced_accuracy_score  # clip_benchmark's dependency; heavy to import

    n = int(label.numel())
    if n == 0:
        raise EvalError("no readable image to evaluate")
    out = {"acc1": float((topk[:, 0] == label).sum().item()) / n,
           "acc5": (float((topk[:, :5] == label[:, None]).any(dim=1).sum().item()) / n if num_classes >= 5
                    else math.nan)}
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true": expected on small sets
        warnings.simplefilter("ignore")
        out["mean_per_class_recall"] = float(balanced_accuracy_score(label.numpy(), argmax.numpy()))
    if written is not None:
        known = written != NO_WRITTEN_CLASS
        out["written_rate"] = (float((argmax[known] == written[known]).sum().item()) / int(known.sum())
                               if known.any() else math.nan)
        out["num_written_known"] = int(known.sum())
    out["num_samples"], out["skipped"] = n, int(skipped)
    return out


def split_metrics(merged: dict, num_classes: int) -> dict:
    """``{"clean": {...}, "typographic": {...}}`` of the views evaluated."""
    out = {}
    for view in merged["argmax"]:
        written = merged["written"] if view != "clean" else None
        out[SPLIT_OF_VIEW[view]] = metrics(merged["label"], merged["argmax"][view], merged["topk"][view], written,
                                           num_classes, merged["skipped"])
    return out
