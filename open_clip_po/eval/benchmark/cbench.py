"""CLIP_benchmark (``pip install -e .[benchmark]``, pinned to 1.6.2): the one module that imports it.

Its traps in 1.6.2, worked around here:
- ``clip_benchmark.datasets.builder`` imports ``requests`` (through ``imagenetv2``) without declaring it: the
  ``benchmark`` extra declares it, and a missing one is named in a one-line error.
- ``metrics.zeroshot_classification.accuracy()`` calls ``float()`` on a one-element array, which numpy 2 refuses;
  :func:`accuracy` computes the same numbers and :func:`zeroshot_evaluate` runs its ``evaluate`` with it.
- ``zero_shot_classifier`` passes its ``device`` to ``torch.autocast``, which wants a device *type* ("cuda",
  not "cuda:1"), and shows a progress bar per call: we pass the type (the current CUDA device is set per rank)
  and silence the bar on ranks other than 0.
"""
from __future__ import annotations

import contextlib
import json
import warnings
from functools import partial
from pathlib import Path

import torch

from ..errors import EvalError

INSTALL = "pip install -e '.[benchmark]' (clip_benchmark==1.6.2 and requests)"


def modules():
    """``(builder, zeroshot_classification)`` of clip_benchmark, or a one-line error saying what to install."""
    try:
        import requests  # noqa: F401  (clip_benchmark imports it without declaring it)
    except ImportError:
        raise EvalError(f"clip_benchmark needs the 'requests' package: {INSTALL}") from None
    try:
        from clip_benchmark.datasets import builder
        from clip_benchmark.metrics import zeroshot_classification
    except ImportError as e:
        raise EvalError(f"the benchmark needs clip_benchmark ({e}): {INSTALL}") from None
    return builder, zeroshot_classification


def _packaged(filename: str) -> dict:
    builder, _ = modules()
    return json.loads((Path(builder.__file__).parent / filename).read_text(encoding="utf-8"))


def default_classnames(name: str) -> list[str] | None:
    """CLIP_benchmark's English class names for a data set (None where it takes them from the data)."""
    return _packaged("en_classnames.json").get(name)


def default_templates(name: str) -> list[str]:
    """CLIP_benchmark's zero-shot templates for a data set (ImageNet's where it has none), ``{c}`` form."""
    templates = _packaged("en_zeroshot_classification_templates.json")
    return list(templates.get(name) or templates["imagenet1k"])


def build_dataset(name: str, root, split: str):
    """``build_dataset(..., download=False, transform=None)``: images come back as PIL images."""
    builder, _ = modules()
    with warnings.catch_warnings():  # "split argument ignored" for sets without splits: the JSON records the split
        warnings.filterwarnings("ignore", message="split argument ignored")
        return builder.build_dataset(dataset_name=name, root=str(root), transform=None, split=split, download=False,
                                     task="zeroshot_classification")


@contextlib.contextmanager
def _quiet_progress(show: bool):
    _, zsc = modules()
    original = zsc.tqdm
    if not show:
        zsc.tqdm = partial(original, disable=True)
    try:
        yield
    finally:
        zsc.tqdm = original


def zero_shot_classifier(model, tokenizer, classnames, templates, device, amp: bool, show_progress: bool = True):
    """CLIP_benchmark's classifier [D, C] (template-averaged, normalised class embeddings)."""
    _, zsc = modules()
    with _quiet_progress(show_progress):
        return zsc.zero_shot_classifier(model, tokenizer, list(classnames), list(templates),
                                        torch.device(device).type, amp=amp)


def accuracy(output: torch.Tensor, target: torch.Tensor, topk=(1,)) -> list[float]:
    """CLIP_benchmark's ``accuracy`` (correct in the top k / n), without its numpy-2 failure."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [float(correct[:k].reshape(-1).float().sum().item()) / len(target) for k in topk]


def zeroshot_evaluate(model, dataloader, tokenizer, classnames, templates, device, amp: bool = True) -> dict:
    """CLIP_benchmark's own ``zeroshot_classification.evaluate`` (the reference our numbers are checked against),
    run with :func:`accuracy` in place of its numpy-2-broken one."""
    _, zsc = modules()
    original = zsc.accuracy
    zsc.accuracy = accuracy
    try:
        return zsc.evaluate(model, dataloader, tokenizer, list(classnames), list(templates), device, amp=amp)
    finally:
        zsc.accuracy = original
